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
 * The rows themselves are made in pme_fattn_rows.c: a prompt chunk's are folded as they are made, so the scratch
 * is a row per thread, not the layer's (n_head, n_tokens, n_kv) that flash attention exists to avoid. */
#include "pme_fattn.h"

#include "ggml.h"
#include "pme_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

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
    j->n_threads       = pme_max_threads();
    /* a prompt chunk's rows are folded as they are made (attn_chunk) unless the policy reads the row sum (its order
     * in double is pinned, pme_scores.c), a calibration watches them or check mode needs them all */
    const int reads    = st->ops ? st->ops->reads : PME_READS_SUM;
    j->fused           = j->n_tokens > 1 && !st->fa_check && !st->calib_armed && !(reads & PME_READS_SUM) &&
                         pme_kdot_pick(k->type, d) != NULL;
    /* a decode step's rows for every group at once (attn_decode), a fused chunk's one row per thread, else a prompt
     * chunk's whole group at a time */
    const int64_t rows = j->n_tokens == 1 ? j->n_head :
                         j->fused         ? (int64_t) j->n_threads * (j->q_per_kv + 2) :
                                            j->q_per_kv * j->n_tokens;
    j->abuf = pme_fa_grow(st, &st->fa_rows, &st->fa_rows_cap, (size_t) (rows * n_kv) * sizeof(float), "attention rows");
    /* scratch slots: one per thread, and one per group for a decode step */
    const size_t T = (size_t) (j->n_threads > j->n_head_kv ? j->n_threads : j->n_head_kv);
    j->mrow =
        pme_fa_grow(st, &st->fa_mask, &st->fa_mask_cap, T * (size_t) (j->q_per_kv * n_kv) * sizeof(float), "mask rows");
    j->qrow = pme_fa_grow(st, &st->fa_q, &st->fa_q_cap, T * (size_t) ((2 * j->q_per_kv + 1) * d + 64) * sizeof(float),
                          "query rows");
    return (j->kbuf && j->abuf && j->mrow && j->qrow) ? 0 : -1;
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
    const int all_groups = j.n_tokens == 1 && !st->fa_check && pme_attn_decode(&j) == 0;
    for (int64_t g = 0; g < j.n_head_kv; ++g) {
        if (j.fused) {
            pme_attn_chunk(st, &j, g);
            continue;
        }
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
