/* How the flash-attention scorer (pme_fattn.c) makes one layer's attention rows from Q, K and the mask: a token's
 * query rows rounded as ggml-cpu rounds them, its logits through the kernels of pme_kdot.c, softmax, and three ways
 * to share the work among llama.cpp's OpenMP threads: a decode step's groups in one region (pme_attn_decode), a
 * prompt chunk folded row by row as the rows are made (pme_attn_chunk), or a group's rows all kept
 * (pme_attn_rows: check mode, calibration, a policy that reads the row sum). */
#include "ggml.h"
#include "pme_fattn.h"

#include <math.h>
#include <string.h>

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
    /* no softcap and no ALiBi: logits are scale * dot + mask */
    const int                  plain = shared_mask && j->softcap == 0.0f && !(j->max_bias > 0.0f);
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
            if (plain) {
                /* cell_logits for four cells, head by head (a slope of 1 leaves the mask as it is) */
                const float * m = j->md ? r.mrow + c : NULL;
                for (int64_t jh = 0; jh < nq; ++jh) {
                    float * out = j->abuf + (jh * n_tokens + tk) * n_kv + c;
                    for (int jc = 0; jc < 4; ++jc) {
                        const float x = s[jc * nq + jh] * j->scale, mv = m ? m[jc] : 0.0f;
                        out[jc] = mv == -INFINITY ? -INFINITY : x + mv;
                    }
                }
            } else {
                for (int jc = 0; jc < 4; ++jc) {
                    cell_logits(j, tk, c + jc, shared_mask, slope, r, s + jc * nq);
                }
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
int pme_attn_decode(const attn_job * j) {
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

/* A prompt chunk, folded as its rows are made: each thread computes one token's row for KV group g, sums its query
 * heads and folds that into the window row (the last ub_rows tokens) and its own per-cell max, merged at the end (a
 * max in any order is the same float). The rows never exist together: attn_rows writes n_tokens x n_kv x q_per_kv
 * floats (6 MB a group on SmolLM2 at 1024 cells) that pme_fold_group reads again. A policy that reads no max (TOVA,
 * SnapKV) has only its window's rows computed. Same floats as attn_rows + pme_fold_group. */
void pme_attn_chunk(pme_state * st, const attn_job * j, int64_t g) {
    const int64_t      d = j->d, n_kv = j->n_kv, nq = j->q_per_kv, n_tokens = j->n_tokens;
    const pme_kdot_fn  kdot        = pme_kdot_pick(j->k->type, d);
    const pme_kdot4_fn kdot4       = kdot && nq <= PME_FA_MAX_Q ? pme_kdot4_pick(j->k->type, d) : NULL;
    const pme_kdotq_fn kdotq       = pme_kdotq_pick(j->k->type, d);
    const int          want_max    = (st->ops->reads & PME_READS_MAX) != 0;
    const int64_t      ring0       = n_tokens - st->ub_rows;
    const int64_t      first       = want_max ? 0 : ring0;
    const int          shared_mask = !j->md || j->mask->ne[2] == 1;
    const float        w           = pme_group_weight(st, (int32_t) g);
    const int64_t      slot        = (nq + 2) * n_kv; /* a thread's row (nq, n_kv), group sum, max */
    float              slope[PME_FA_MAX_Q];
    group_slopes(j, g, slope);
    for (int th = 0; th < j->n_threads; ++th) {
        memset(j->abuf + th * slot + (nq + 1) * n_kv, 0, (size_t) n_kv * sizeof(float));
    }
#pragma omp parallel num_threads(j->n_threads) if (j -> n_threads > 1)
    {
        const int         th   = pme_thread_num();
        float *           arow = j->abuf + th * slot, *sum = arow + nq * n_kv, *best = sum + n_kv;
        const row_scratch r  = scratch_of(j, th);
        attn_job          jt = *j; /* one token's rows: abuf is this thread's row */
        jt.abuf              = arow;
        jt.n_tokens          = 1;
#pragma omp for schedule(static)
        for (int64_t t = first; t < n_tokens; ++t) {
            row_prepare(j, g, t, shared_mask, kdotq != NULL, r);
            row_logits(&jt, g, 0, shared_mask, slope, kdot, kdot4, kdotq, r, 0, n_kv);
            row_softmax(&jt, g, 0);
            pme_group_row(st, arow, n_kv, 0, (size_t) (nq * n_kv) * sizeof(float), (size_t) n_kv * sizeof(float), w,
                          sum);
            if (t >= ring0) {
                pme_fold_window_row(st, (int32_t) (t - ring0), sum, n_kv);
            }
            for (int64_t c = 0; want_max && c < n_kv; ++c) {
                best[c] = sum[c] > best[c] ? sum[c] : best[c];
            }
        }
    }
    if (want_max) {
        float * best = j->abuf + (nq + 1) * n_kv;
        for (int th = 1; th < j->n_threads; ++th) {
            const float * other = j->abuf + th * slot + (nq + 1) * n_kv;
            for (int64_t c = 0; c < n_kv; ++c) {
                best[c] = other[c] > best[c] ? other[c] : best[c];
            }
        }
        pme_fold_chunk_max(st, best, n_kv);
    }
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
