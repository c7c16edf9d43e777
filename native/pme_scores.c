/* Reduce one layer's post-softmax attention into per-cell scores.
 *
 * Input layout is llama.cpp's kq_soft_max node: ne = [n_kv, n_tokens, n_head], so element
 * (cell c, token t, head h) sits at byte offset c*4 + t*nb1 + h*nb2.
 * Query heads of one GQA group are summed (they read the same K/V cell), then the KV heads and
 * the layers are combined by cfg.aggregate, because a llama.cpp cell is shared by all of them. */
#include "pme_internal.h"

#include <string.h>

void pme_ubatch_reset_acc(pme_state * st) {
    const size_t nc   = (size_t) st->cfg.n_cells;
    int32_t      rows = st->ub_n < st->cfg.window ? st->ub_n : st->cfg.window;
    st->ub_rows       = rows;
    st->ub_layers     = 0;
    st->ub_grp_dev    = 0;
    memset(st->ub_row_acc, 0, (size_t) rows * nc * sizeof(float));
    memset(st->ub_chunk_acc, 0, nc * sizeof(float));
    memset(st->ub_sum_acc, 0, nc * sizeof(float));
}

static inline void fold(float * acc, const float * v, int64_t n, int agg) {
    if (agg == PME_AGG_MAX) {
        for (int64_t c = 0; c < n; ++c) {
            if (v[c] > acc[c]) {
                acc[c] = v[c];
            }
        }
    } else {
        for (int64_t c = 0; c < n; ++c) {
            acc[c] += v[c];
        }
    }
}

void pme_group_row(const pme_state * st,
                   const float *     attn,
                   int64_t           n_kv,
                   int64_t           t,
                   size_t            nb1,
                   size_t            nb2,
                   float             w,
                   float *           out) {
    const int32_t q_per_kv = st->cfg.n_head / st->cfg.n_head_kv;
    memset(out, 0, (size_t) n_kv * sizeof(float));
    for (int32_t q = 0; q < q_per_kv; ++q) {
        const float * row = (const float *) ((const char *) attn + t * nb1 + q * nb2);
        for (int64_t c = 0; c < n_kv; ++c) {
            out[c] += row[c];
        }
    }
    if (w != 1.0f) {
        for (int64_t c = 0; c < n_kv; ++c) {
            out[c] *= w;
        }
    }
}

int pme_fold_begin(pme_state * st, int64_t n_kv, int64_t n_tokens, int64_t n_head) {
    if (n_tokens != st->ub_n) {
        pme_set_error(st, "attention has %lld token rows but the ubatch has %d", (long long) n_tokens, st->ub_n);
        return -1;
    }
    if (n_head != st->cfg.n_head) {
        pme_set_error(st, "attention has %lld heads, expected %d", (long long) n_head, st->cfg.n_head);
        return -1;
    }
    if (n_kv > st->cfg.n_cells) {
        pme_set_error(st, "attention spans %lld cells but the cache has %d", (long long) n_kv, st->cfg.n_cells);
        return -1;
    }
    if (st->calib_armed == 1) {
        pme_calib_resolve(st);
    }
    return 0;
}

/* pme_fold_group for the cells [c0, c0 + n): attn, and every per-cell array, from cell c0 on. Cells are
 * independent and each sees the same adds in the same order, so any split of the cells gives the same floats. */
static void fold_cells(pme_state *   st,
                       const float * attn,
                       int64_t       n,
                       int64_t       n_tokens,
                       size_t        nb1,
                       size_t        nb2,
                       float         w,
                       int32_t       hi,
                       int64_t       c0) {
    const int     agg      = st->cfg.aggregate;
    const size_t  nc       = (size_t) st->cfg.n_cells;
    float *       tmp      = st->tmp + c0;
    const int32_t q_per_kv = st->cfg.n_head / st->cfg.n_head_kv;
    const int     reads    = st->ops ? st->ops->reads : (PME_READS_MAX | PME_READS_SUM);
    /* the per-cell max and sum over the rows are only worked out for a policy that reads them (a decode step's one
     * row is its own max and sum); every row is visited only for them or for a calibration */
    const int     want_max = (reads & PME_READS_MAX) != 0, want_sum = (reads & PME_READS_SUM) != 0;
    const int64_t first = (want_max || want_sum || st->calib_armed) ? 0 : n_tokens - st->ub_rows;
    const int64_t ring0 = n_tokens - st->ub_rows; /* rows kept for the MorphKV window: the last ub_rows */
    /* persistent score: max over every row of the ubatch, so a token attended once in its own
     * prefill chunk keeps a mark until a later question needs it (the prefill variants in benchmarks/results/passkey_variants/) */
    float *       best  = st->score + c0; /* scratch: selection recomputes score before reading it */
    double *      total = st->row_sum + c0;
    if (want_max) {
        memset(best, 0, (size_t) n * sizeof(float));
    }
    if (want_sum) {
        memset(total, 0, (size_t) n * sizeof(double));
    }
    /* each row's group sum once, for the window, the max, the sum and the calibration alike */
    for (int64_t t = first; t < n_tokens; ++t) {
        pme_group_row(st, attn, n, t, nb1, nb2, w, tmp);
        if (t >= ring0) {
            fold(st->ub_row_acc + (size_t) (t - ring0) * nc + c0, tmp, n, agg);
        }
        if (st->calib_armed && t < st->calib_n && st->calib_cell[t] >= c0 && st->calib_cell[t] < c0 + n) {
            st->calib_acc[hi] += tmp[st->calib_cell[t] - c0] / (w * (float) q_per_kv);
        }
        if (want_max) {
            for (int64_t c = 0; c < n; ++c) {
                if (tmp[c] > best[c]) {
                    best[c] = tmp[c];
                }
            }
        }
        if (want_sum) {
            for (int64_t c = 0; c < n; ++c) {
                total[c] += (double) tmp[c];
            }
        }
    }
    if (want_max) {
        fold(st->ub_chunk_acc + c0, best, n, agg);
    }
    /* the row sum in double, rounded once: ggml's sum_rows does the same, so scores reduced on a device
     * (pme_devscore.c, on an RPC server's CPU) match these bit for bit */
    if (want_sum) {
        for (int64_t c = 0; c < n; ++c) {
            tmp[c] = (float) total[c];
        }
        fold(st->ub_sum_acc + c0, tmp, n, agg);
    }
}

float pme_group_weight(const pme_state * st, int32_t g) {
    /* Weights serve recall of the prompt (passkey 2/24 -> 23/24 on SmolLM2); during decode they
     * raised the KL to the full model (4.1e-3 vs 2.5e-3 uniform, smollm2-135m-b512-decode-ablation),
     * because the next token depends on the local heads they mute. So prompt ubatches only. */
    return (st->head_w && pme_ub_is_prompt(st)) ? st->head_w[st->cur_layer * st->cfg.n_head_kv + g] : 1.0f;
}

void pme_fold_window_row(pme_state * st, int32_t r, const float * v, int64_t n) {
    fold(st->ub_row_acc + (size_t) r * (size_t) st->cfg.n_cells, v, n, st->cfg.aggregate);
}

void pme_fold_chunk_max(pme_state * st, const float * best, int64_t n) {
    fold(st->ub_chunk_acc, best, n, st->cfg.aggregate);
}

void pme_fold_group(pme_state *   st,
                    const float * attn,
                    int64_t       n_kv,
                    int64_t       n_tokens,
                    int32_t       g,
                    size_t        nb1,
                    size_t        nb2) {
    const int32_t hi  = st->cur_layer * st->cfg.n_head_kv + g;
    const float   w   = pme_group_weight(st, g);
    /* A prompt chunk's rows are a memory-bound pass over n_tokens x n_kv x q_per_kv floats per group (9 MB on
     * SmolLM2 at 1536 cells): the callback runs between llama.cpp's graph splits, while the CPU backend's OpenMP
     * workers wait, so they share it by blocks of cells. A calibration sums over cells in row order: one thread. */
    const int64_t blk = 128, n_blk = (n_kv + blk - 1) / blk;
    if (st->calib_armed || n_tokens * n_kv < (1 << 16) || n_blk < 2) {
        fold_cells(st, attn, n_kv, n_tokens, nb1, nb2, w, hi, 0);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n_blk; ++b) {
        const int64_t c0 = b * blk, n = (c0 + blk < n_kv ? blk : n_kv - c0);
        fold_cells(st, attn + c0, n, n_tokens, nb1, nb2, w, hi, c0);
    }
}

int pme_fold_softmax(pme_state *   st,
                     const float * attn,
                     int64_t       n_kv,
                     int64_t       n_tokens,
                     int64_t       n_head,
                     size_t        nb1,
                     size_t        nb2) {
    if (pme_fold_begin(st, n_kv, n_tokens, n_head) != 0) {
        return -1;
    }
    const int32_t q_per_kv = st->cfg.n_head / st->cfg.n_head_kv;
    for (int32_t g = 0; g < st->cfg.n_head_kv; ++g) {
        pme_fold_group(st, (const float *) ((const char *) attn + (size_t) (g * q_per_kv) * nb2), n_kv, n_tokens, g,
                       nb1, nb2);
    }
    st->ub_layers++;
    return 0;
}

void pme_ubatch_finish_acc(pme_state * st) {
    st->calib_armed = 0; /* a calibration covers one ubatch */
    if (st->cfg.aggregate != PME_AGG_MEAN || st->ub_layers == 0) {
        return;
    }
    const size_t nc  = (size_t) st->cfg.n_cells;
    const float  inv = 1.0f / (float) (st->ub_layers * st->cfg.n_head_kv);
    for (size_t i = 0; i < (size_t) st->ub_rows * nc; ++i) {
        st->ub_row_acc[i] *= inv;
    }
    for (size_t c = 0; c < nc; ++c) {
        st->ub_chunk_acc[c] *= inv;
    }
    for (size_t c = 0; c < nc; ++c) {
        st->ub_sum_acc[c] *= inv;
    }
}
