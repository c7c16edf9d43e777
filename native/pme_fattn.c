/* Attention rows with flash attention on.
 *
 * Flash attention never materialises softmax(QK^T), so for each scored layer the callback asks for the
 * GGML_OP_FLASH_ATTN_EXT node and recomputes, from that node's own sources, the rows the policies read:
 *   src[0] Q    (d, n_tokens, n_head)     f32, a permuted view
 *   src[1] K    (d, n_kv, n_head_kv)      a view of the K cache, f16/bf16/f32 or quantized
 *   src[3] mask (n_kv, n_tokens_pad, 1|n_head) f16, -inf where a token may not look
 *   src[4] sinks (n_head) f32 or NULL
 *   op_params: scale, max_bias (ALiBi), logit_softcap
 * ggml-alloc never runs FLASH_ATTN_EXT in place, and the callback runs right after the node, so the
 * sources are still intact (tests/test_llama_cpp_facts.py recomputes the node's output from them).
 *
 * The arithmetic follows ggml-cpu's flash attention: Q is rounded to the type K is multiplied in (f16 for
 * an f16 cache, q8_0 for q8_0/q4_0), the scale goes inside the softcap, ALiBi slopes scale the mask.
 * Rows are computed one KV head's group at a time so the scratch is (q_per_kv, n_tokens, n_kv), not the
 * whole layer's (n_head, n_tokens, n_kv) that flash attention exists to avoid. */
#include "pme_fattn.h"

#include "ggml.h"
#include "pme_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#    include <omp.h>

static int pme_max_threads(void) {
    return omp_get_max_threads();
}

static int pme_thread_num(void) {
    return omp_get_thread_num();
}
#else
static int pme_max_threads(void) {
    return 1;
}

static int pme_thread_num(void) {
    return 0;
}
#endif

#define PME_FA_MAX_Q 64 /* query heads per KV head */

/* the type ggml-cpu converts Q to before its K dot products (ggml-cpu.c type_traits_cpu[].vec_dot_type) */
static enum ggml_type query_type_for(enum ggml_type k) {
    switch (k) {
        case GGML_TYPE_F16:
        case GGML_TYPE_BF16:
        case GGML_TYPE_F32:
            return k;
        case GGML_TYPE_Q4_0:
        case GGML_TYPE_Q5_0:
        case GGML_TYPE_Q8_0:
        case GGML_TYPE_IQ4_NL:
            return GGML_TYPE_Q8_0;
        case GGML_TYPE_Q4_1:
        case GGML_TYPE_Q5_1:
            return GGML_TYPE_Q8_1;
        default:
            return GGML_TYPE_COUNT; /* not a KV cache type llama.cpp offers */
    }
}

void * pme_fa_grow(pme_state * st, void ** buf, size_t * cap, size_t need, const char * what) {
    if (need > *cap) {
        void * p = realloc(*buf, need);
        if (!p) {
            pme_set_error(st, "out of memory for %s (%zu bytes)", what, need);
            return NULL;
        }
        *buf = p;
        *cap = need;
    }
    return *buf;
}

/* q rounded as ggml-cpu rounds it; scratch holds one row of the query type */
static void round_query(enum ggml_type qt, float * q, int64_t d, void * scratch) {
    if (qt == GGML_TYPE_F32) {
        return;
    }
    if (qt == GGML_TYPE_F16) {
        for (int64_t i = 0; i < d; ++i) {
            q[i] = ggml_fp16_to_fp32(ggml_fp32_to_fp16(q[i]));
        }
        return;
    }
    if (qt == GGML_TYPE_BF16) {
        for (int64_t i = 0; i < d; ++i) {
            q[i] = ggml_bf16_to_fp32(ggml_fp32_to_bf16(q[i]));
        }
        return;
    }
    const struct ggml_type_traits * tr = ggml_get_type_traits(qt);
    if (tr->from_float_ref && tr->to_float && d % tr->blck_size == 0) {
        tr->from_float_ref(q, scratch, d);
        tr->to_float(scratch, q, d);
    }
}

static inline float dot(const float * restrict a, const float * restrict b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) {
        s += a[i] * b[i];
    }
    return s;
}

int pme_attn_prepare(pme_state * st, attn_job * j, int32_t layer) {
    const struct ggml_tensor *q = j->q, *k = j->k, *mask = j->mask, *sinks = j->sinks;
    if (!q || !k || q->type != GGML_TYPE_F32 || q->nb[0] != sizeof(float) || q->ne[3] != 1 || k->ne[3] != 1 ||
        k->ne[0] != q->ne[0] || k->nb[0] != ggml_type_size(k->type) ||
        (mask && mask->type != GGML_TYPE_F16 && mask->type != GGML_TYPE_F32) ||
        (sinks && sinks->type != GGML_TYPE_F32)) {
        pme_set_error(st, "attention of layer %d: unexpected sources (q type %d, k type %d)", layer,
                      q ? (int) q->type : -1, k ? (int) k->type : -1);
        return -1;
    }
    j->d = q->ne[0], j->n_tokens = q->ne[1], j->n_head = q->ne[2], j->n_kv = k->ne[1], j->n_head_kv = k->ne[2];
    if (j->n_head_kv != st->cfg.n_head_kv || j->n_head % j->n_head_kv != 0) {
        pme_set_error(st, "attention of layer %d has %lld KV heads, expected %d", layer, (long long) j->n_head_kv,
                      st->cfg.n_head_kv);
        return -1;
    }
    j->q_per_kv = j->n_head / j->n_head_kv;
    if (j->q_per_kv > PME_FA_MAX_Q) {
        pme_set_error(st, "attention of layer %d: %lld query heads per KV head (at most %d)", layer,
                      (long long) j->q_per_kv, PME_FA_MAX_Q);
        return -1;
    }
    j->qt = query_type_for(k->type);
    if (j->qt == GGML_TYPE_COUNT || !ggml_get_type_traits(k->type)->to_float) {
        pme_set_error(st, "flash attention scoring does not support a %s K cache", ggml_type_name(k->type));
        return -1;
    }
    /* each source from host memory, or copied out of a GPU buffer into its own slot */
    j->qd = pme_host_or_copy(st, q, 0);
    j->kd = j->qd ? pme_k_rows(st, k, layer) : NULL;
    j->md = (j->kd && mask) ? pme_mask_rows(st, mask, j->n_tokens) : NULL;
    j->sd = (j->kd && sinks) ? pme_host_or_copy(st, sinks, 3) : NULL;
    if (!j->kd || (mask && !j->md) || (sinks && !j->sd)) {
        return -1;
    }
    const int64_t d = j->d, n_kv = j->n_kv;
    j->kbuf            = pme_fa_grow(st, &st->fa_k, &st->fa_k_cap, (size_t) (n_kv * d) * sizeof(float), "K rows");
    /* a decode step's rows for every group at once (attn_decode), a prompt chunk's one group at a time */
    const int64_t rows = j->n_tokens == 1 ? j->n_head : j->q_per_kv * j->n_tokens;
    j->abuf = pme_fa_grow(st, &st->fa_rows, &st->fa_rows_cap, (size_t) (rows * n_kv) * sizeof(float), "attention rows");
    j->n_threads   = pme_max_threads();
    /* scratch slots: one per thread, and one per group for a decode step */
    const size_t T = (size_t) (j->n_threads > j->n_head_kv ? j->n_threads : j->n_head_kv);
    j->mrow =
        pme_fa_grow(st, &st->fa_mask, &st->fa_mask_cap, T * (size_t) (j->q_per_kv * n_kv) * sizeof(float), "mask rows");
    j->qrow = pme_fa_grow(st, &st->fa_q, &st->fa_q_cap, T * (size_t) ((2 * j->q_per_kv + 1) * d + 64) * sizeof(float),
                          "query rows");
    return (j->kbuf && j->abuf && j->mrow && j->qrow) ? 0 : -1;
}

/* per-thread scratch for one token row: the group's query rows (nq, d) plus rounding space, the same rows
 * quantised for an integer kernel (qq), its mask rows */
typedef struct row_scratch {
    float * qrows;
    void *  qq;
    float * mrow;
} row_scratch;

static row_scratch scratch_of(const attn_job * j, int th) {
    float *     base = j->qrow + (size_t) th * (size_t) ((2 * j->q_per_kv + 1) * j->d + 64);
    row_scratch r    = { base, base + (j->q_per_kv + 1) * j->d + 64,
                         j->mrow + (size_t) th * (size_t) (j->q_per_kv * j->n_kv) };
    return r;
}

/* query rows of token tk (rounded as ggml-cpu rounds them, or quantised for an integer kernel) and its mask
 * row(s) */
static void row_prepare(const attn_job * j, int64_t g, int64_t tk, int shared_mask, int quantised, row_scratch r) {
    const struct ggml_tensor *q = j->q, *mask = j->mask;
    const int64_t             d = j->d, nq = j->q_per_kv, n_kv = j->n_kv;
    for (int64_t jh = 0; jh < nq; ++jh) {
        float * qr = r.qrows + jh * d;
        memcpy(qr, j->qd + tk * q->nb[1] + (g * nq + jh) * q->nb[2], (size_t) d * sizeof(float));
        if (quantised) {
            ggml_get_type_traits(j->qt)->from_float_ref(qr, (char *) r.qq + jh * ggml_row_size(j->qt, d), d);
        } else {
            round_query(j->qt, qr, d, r.qrows + nq * d);
        }
    }
    for (int64_t jh = 0; j->md && jh < (shared_mask ? 1 : nq); ++jh) {
        const char * mp  = j->md + tk * mask->nb[1] + ((g * nq + jh) % mask->ne[2]) * mask->nb[2];
        float *      dst = r.mrow + jh * n_kv;
        if (mask->type == GGML_TYPE_F16) {
            pme_f16_to_f32((const uint16_t *) mp, dst, n_kv);
        } else {
            memcpy(dst, mp, (size_t) n_kv * sizeof(float));
        }
    }
}

/* cell c's logits for every head of the group from its dot products s[0..nq), into abuf (-inf where masked) */
static inline void cell_logits(const attn_job * j,
                               int64_t          tk,
                               int64_t          c,
                               int              shared_mask,
                               const float *    slope,
                               row_scratch      r,
                               const float *    s) {
    const int64_t nq = j->q_per_kv, n_kv = j->n_kv, n_tokens = j->n_tokens;
    for (int64_t jh = 0; jh < nq; ++jh) {
        float x = s[jh] * j->scale;
        if (j->softcap != 0.0f) {
            x = j->softcap * tanhf(x);
        }
        const float mv                           = j->md ? slope[jh] * r.mrow[(shared_mask ? 0 : jh * n_kv) + c] : 0.0f;
        j->abuf[(jh * n_tokens + tk) * n_kv + c] = mv == -INFINITY ? -INFINITY : x + mv;
    }
}

/* logits of token tk for cells [c0, c1), every head of the group, into abuf (-inf where masked) */
static void row_logits(const attn_job * j,
                       int64_t          g,
                       int64_t          tk,
                       int              shared_mask,
                       const float *    slope,
                       pme_kdot_fn      kdot,
                       pme_kdot4_fn     kdot4,
                       pme_kdotq_fn     kdotq,
                       row_scratch      r,
                       int64_t          c0,
                       int64_t          c1) {
    const struct ggml_tensor * k = j->k;
    const int64_t              d = j->d, nq = j->q_per_kv, n_kv = j->n_kv, n_tokens = j->n_tokens;
    const char *               kg = j->kd + g * k->nb[2];
    float                      s[4 * PME_FA_MAX_Q];
    for (int64_t c = c0; c < c1;) {
        /* a cell every head of the row masks (shared mask) costs no dot product */
        const int masked = j->md && shared_mask && r.mrow[c] == -INFINITY;
        if ((kdot4 || kdotq) && !masked && c + 4 <= c1) {
            /* four cells in one pass over their K rows (a masked one among them still ends -inf) */
            if (kdotq) {
                kdotq(r.qq, nq, kg + c * k->nb[1], k->nb[1], 4, d, s);
            } else {
                kdot4(r.qrows, nq, kg + c * k->nb[1], k->nb[1], d, s);
            }
            for (int jc = 0; jc < 4; ++jc) {
                cell_logits(j, tk, c + jc, shared_mask, slope, r, s + jc * nq);
            }
            c += 4;
            continue;
        }
        if (masked) {
            for (int64_t jh = 0; jh < nq; ++jh) {
                j->abuf[(jh * n_tokens + tk) * n_kv + c] = -INFINITY;
            }
            ++c;
            continue;
        }
        if (kdotq) {
            kdotq(r.qq, nq, kg + c * k->nb[1], k->nb[1], 1, d, s);
        } else if (kdot) {
            kdot(r.qrows, nq, kg + c * k->nb[1], d, s);
        } else {
            for (int64_t jh = 0; jh < nq; ++jh) {
                s[jh] = dot(r.qrows + jh * d, j->kbuf + c * d, d);
            }
        }
        cell_logits(j, tk, c, shared_mask, slope, r, s);
        ++c;
    }
}

static void row_softmax(const attn_job * j, int64_t g, int64_t tk) {
    for (int64_t jh = 0; jh < j->q_per_kv; ++jh) {
        const float sink = j->sd ? ((const float *) j->sd)[g * j->q_per_kv + jh] : -INFINITY;
        pme_softmax_row(j->abuf + (jh * j->n_tokens + tk) * j->n_kv, j->n_kv, sink);
    }
}

/* ALiBi slopes of group g's query heads (1 without ALiBi) */
static void group_slopes(const attn_job * j, int64_t g, float * slope) {
    const uint32_t n_head_log2 = 1u << (uint32_t) floorf(log2f((float) j->n_head));
    const float    m0          = powf(2.0f, -j->max_bias / (float) n_head_log2);
    const float    m1          = powf(2.0f, -(j->max_bias / 2.0f) / (float) n_head_log2);
    for (int64_t jh = 0; jh < j->q_per_kv; ++jh) {
        const int64_t h = g * j->q_per_kv + jh;
        slope[jh] = j->max_bias > 0.0f ? (h < (int64_t) n_head_log2 ? powf(m0, (float) (h + 1)) :
                                                                      powf(m1, (float) (2 * (h - n_head_log2) + 1))) :
                                         1.0f;
    }
}

#define PME_FA_MAX_GROUPS 64

/* A decode step: every group's row into j->abuf, laid out (n_head, 1, n_kv), in one parallel region over
 * (group, block of cells) and then heads. Per group, as attn_rows does it, the step opened a parallel region
 * per group: 90 a token on SmolLM2, whose joins showed as libgomp time (perf). Returns 0, or 1 where this
 * path does not apply (no kernel for the K type, too many groups). */
static int attn_decode(const attn_job * j) {
    const int64_t      d = j->d, n_kv = j->n_kv, nq = j->q_per_kv, G = j->n_head_kv;
    const pme_kdot_fn  kdot  = pme_kdot_pick(j->k->type, d);
    const pme_kdot4_fn kdot4 = kdot && nq <= PME_FA_MAX_Q ? pme_kdot4_pick(j->k->type, d) : NULL;
    const pme_kdotq_fn kdotq = pme_kdotq_pick(j->k->type, d);
    if (!kdot || G > PME_FA_MAX_GROUPS) {
        return 1;
    }
    const int   shared_mask = !j->md || j->mask->ne[2] == 1;
    attn_job    jg[PME_FA_MAX_GROUPS];
    row_scratch rg[PME_FA_MAX_GROUPS];
    float       slope[PME_FA_MAX_GROUPS][PME_FA_MAX_Q];
    for (int64_t g = 0; g < G; ++g) {
        jg[g]      = *j;
        jg[g].abuf = j->abuf + g * nq * n_kv;
        rg[g]      = scratch_of(j, (int) g);
        group_slopes(j, g, slope[g]);
        row_prepare(j, g, 0, shared_mask, kdotq != NULL, rg[g]);
    }
    const int64_t blk = 128, n_blk = (n_kv + blk - 1) / blk;
#pragma omp parallel num_threads(j->n_threads) if (j -> n_threads > 1)
    {
#pragma omp for schedule(static)
        for (int64_t x = 0; x < G * n_blk; ++x) {
            const int64_t g = x / n_blk, b = x % n_blk;
            row_logits(&jg[g], g, 0, shared_mask, slope[g], kdot, kdot4, kdotq, rg[g], b * blk,
                       (b + 1) * blk < n_kv ? (b + 1) * blk : n_kv);
        }
#pragma omp for schedule(static)
        for (int64_t g = 0; g < G; ++g) {
            row_softmax(&jg[g], g, 0);
        }
    }
    return 0;
}

/* j->abuf = the attention rows of KV head g's query heads, laid out (q_per_kv, n_tokens, n_kv).
 * The callback runs on llama.cpp's main thread while the CPU backend's OpenMP workers wait, so the work is
 * shared among them: by token rows for a prompt chunk, by cells for a decode step. */
void pme_attn_rows(const attn_job * j, int64_t g) {
    const struct ggml_tensor *      k   = j->k;
    const struct ggml_type_traits * ktr = ggml_get_type_traits(k->type);
    const int64_t                   d = j->d, n_kv = j->n_kv, n_tokens = j->n_tokens, nq = j->q_per_kv;
    const pme_kdot_fn               kdot  = pme_kdot_pick(k->type, d);
    const pme_kdot4_fn              kdot4 = kdot && j->q_per_kv <= PME_FA_MAX_Q ? pme_kdot4_pick(k->type, d) : NULL;
    const pme_kdotq_fn              kdotq = pme_kdotq_pick(k->type, d);

    if (!kdot) {
        const char * kg = j->kd + g * k->nb[2];
        for (int64_t c = 0; c < n_kv; ++c) {
            ktr->to_float(kg + c * k->nb[1], j->kbuf + c * d, d);
        }
    }
    float slope[PME_FA_MAX_Q];
    group_slopes(j, g, slope);
    /* one mask row serves every head unless the mask has a head dimension (then each head reads its own) */
    const int shared_mask = !j->md || j->mask->ne[2] == 1;

    if (n_tokens == 1) {
        const row_scratch r = scratch_of(j, 0);
        row_prepare(j, g, 0, shared_mask, kdotq != NULL, r);
        const int64_t blk = 128, n_blk = (n_kv + blk - 1) / blk;
#pragma omp parallel for schedule(static) num_threads(j->n_threads) if (j->n_threads > 1 && n_blk > 1)
        for (int64_t b = 0; b < n_blk; ++b) {
            row_logits(j, g, 0, shared_mask, slope, kdot, kdot4, kdotq, r, b * blk,
                       (b + 1) * blk < n_kv ? (b + 1) * blk : n_kv);
        }
        row_softmax(j, g, 0);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(j->n_threads) if (j->n_threads > 1)
    for (int64_t tk = 0; tk < n_tokens; ++tk) {
        const row_scratch r = scratch_of(j, pme_thread_num());
        row_prepare(j, g, tk, shared_mask, kdotq != NULL, r);
        row_logits(j, g, tk, shared_mask, slope, kdot, kdot4, kdotq, r, 0, n_kv);
        row_softmax(j, g, tk);
    }
}

int pme_fold_fattn(pme_state * st, const struct ggml_tensor * t, int32_t layer) {
    attn_job j = { .q = t->src[0], .k = t->src[1], .mask = t->src[3], .sinks = t->src[4] };
    float    params[3];
    memcpy(params, t->op_params, sizeof params);
    j.softcap  = params[2];
    j.scale    = j.softcap != 0.0f ? params[0] / j.softcap : params[0]; /* ggml-cpu: the scale goes inside tanh */
    j.max_bias = params[1];
    if (pme_attn_prepare(st, &j, layer) != 0 || pme_fold_begin(st, j.n_kv, j.n_tokens, j.n_head) != 0) {
        return -1;
    }
    const int all_groups = j.n_tokens == 1 && !st->fa_check && attn_decode(&j) == 0;
    for (int64_t g = 0; g < j.n_head_kv; ++g) {
        if (all_groups) {
            pme_fold_group(st, j.abuf + g * j.q_per_kv * j.n_kv, j.n_kv, 1, (int32_t) g,
                           (size_t) j.n_kv * sizeof(float), (size_t) j.n_kv * sizeof(float));
            continue;
        }
        pme_attn_rows(&j, g);
        if (st->fa_check && pme_fattn_check_output(st, t, j.abuf, g, j.q_per_kv, j.n_tokens, j.n_kv) != 0) {
            return -1;
        }
        /* rows laid out (q_per_kv, n_tokens, n_kv), as the softmax node's (n_head, n_tokens, n_kv) */
        pme_fold_group(st, j.abuf, j.n_kv, j.n_tokens, (int32_t) g, (size_t) j.n_kv * sizeof(float),
                       (size_t) (j.n_tokens * j.n_kv) * sizeof(float));
    }
    st->ub_layers++;
    return 0;
}
