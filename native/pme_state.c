/* State lifetime, errors, the cell map and stats. */
#include "pme_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void pme_set_error(pme_state * st, const char * fmt, ...) {
    /* keep the first error: later ones are usually consequences of it */
    if (st->failed) {
        return;
    }
    st->failed = 1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(st->err, sizeof(st->err), fmt, ap);
    va_end(ap);
}

static void write_err(char * err, size_t len, const char * msg) {
    if (err && len) {
        snprintf(err, len, "%s", msg);
    }
}

pme_state * pme_create(const pme_config * cfg, char * err, size_t err_len) {
    if (!cfg) {
        write_err(err, err_len, "pme_create: cfg is NULL");
        return NULL;
    }
    if (cfg->n_cells <= 0 || cfg->budget <= 0 || cfg->window <= 0 || cfg->n_head <= 0 || cfg->n_head_kv <= 0 ||
        cfg->n_head % cfg->n_head_kv != 0 || cfg->n_layer <= 0 || cfg->max_ubatch <= 0 || cfg->pool_radius < 0) {
        char buf[PME_ERR_LEN];
        snprintf(buf, sizeof buf,
                 "pme_create: invalid config (n_cells=%d budget=%d window=%d n_head=%d n_head_kv=%d n_layer=%d "
                 "max_ubatch=%d)",
                 cfg->n_cells, cfg->budget, cfg->window, cfg->n_head, cfg->n_head_kv, cfg->n_layer, cfg->max_ubatch);
        write_err(err, err_len, buf);
        return NULL;
    }
    if (cfg->fusion != PME_FUSION_SUM && cfg->fusion != PME_FUSION_MAX) {
        write_err(err, err_len, "pme_create: unknown fusion");
        return NULL;
    }
    if (cfg->aggregate != PME_AGG_MEAN && cfg->aggregate != PME_AGG_MAX) {
        write_err(err, err_len, "pme_create: unknown aggregate");
        return NULL;
    }
    if (!pme_policy_lookup(cfg->policy)) {
        write_err(err, err_len, "pme_create: unknown policy");
        return NULL;
    }
    if (cfg->score_layers < 0) {
        write_err(err, err_len, "pme_create: score_layers < 0");
        return NULL;
    }
    if (cfg->n_sink < 0) {
        write_err(err, err_len, "pme_create: n_sink < 0");
        return NULL;
    }
    if (cfg->policy == PME_POLICY_H2O && !(cfg->forget > 0.0f && cfg->forget <= 1.0f)) {
        write_err(err, err_len, "pme_create: H2O needs forget in (0, 1]");
        return NULL;
    }

    pme_state * st = calloc(1, sizeof *st);
    if (!st) {
        write_err(err, err_len, "pme_create: out of memory");
        return NULL;
    }
    st->cfg         = *cfg;
    st->ops         = pme_policy_lookup(cfg->policy);
    const size_t nc = (size_t) cfg->n_cells, w = (size_t) cfg->window;
    st->cell_pos     = malloc(nc * sizeof(int32_t));
    st->cell_lpos    = malloc(nc * sizeof(int64_t));
    st->layer_group  = malloc((size_t) cfg->n_layer);
    st->layer_on     = calloc((size_t) cfg->n_layer, 1);
    st->layer_rank   = malloc((size_t) cfg->n_layer * sizeof(int16_t));
    st->ub_pos       = malloc((size_t) cfg->max_ubatch * sizeof(int32_t));
    st->ub_cell      = malloc((size_t) cfg->max_ubatch * sizeof(int32_t));
    st->kl_seen      = calloc((size_t) cfg->n_layer, 1);
    st->kl_scale     = calloc((size_t) cfg->n_layer, sizeof(float));
    st->ub_row_acc   = calloc(w * nc, sizeof(float));
    st->ub_chunk_acc = calloc(nc, sizeof(float));
    st->ub_sum_acc   = calloc(nc, sizeof(float));
    st->tmp          = calloc(nc, sizeof(float));
    st->row_sum      = calloc(nc, sizeof(double));
    st->ring         = calloc(w * nc, sizeof(float));
    st->grp_sfx      = calloc(w * nc, sizeof(float));
    st->grp_valid    = calloc(nc, 1);
    st->pscore       = calloc(nc, sizeof(float));
    st->score        = calloc(nc, sizeof(float));
    st->cand         = malloc(nc * sizeof(pme_candidate));
    st->victim_pos   = malloc(nc * sizeof(int32_t));
    st->calib_target = malloc((size_t) cfg->max_ubatch * sizeof(int32_t));
    st->calib_cell   = malloc((size_t) cfg->max_ubatch * sizeof(int32_t));
    st->calib_acc    = calloc((size_t) cfg->n_layer * (size_t) cfg->n_head_kv, sizeof(float));
    if (!st->cell_pos || !st->cell_lpos || !st->layer_group || !st->layer_on || !st->layer_rank || !st->ub_pos ||
        !st->ub_cell || !st->kl_seen || !st->kl_scale || !st->ub_row_acc || !st->ub_chunk_acc || !st->ub_sum_acc ||
        !st->tmp || !st->row_sum || !st->ring || !st->grp_sfx || !st->grp_valid || !st->pscore || !st->score ||
        !st->cand || !st->victim_pos || !st->calib_target || !st->calib_cell || !st->calib_acc) {
        pme_free(st);
        write_err(err, err_len, "pme_create: out of memory");
        return NULL;
    }
    pme_reset(st);
    return st;
}

void pme_free(pme_state * st) {
    if (!st) {
        return;
    }
    for (int i = 0; i < PME_COPY_SLOTS; ++i) {
        free(st->dev_copy[i]);
    }
    pme_kmirror_free(st);
    pme_dev_free(st);
    free(st->kl_k);
    free(st->kl_q);
    free(st->kl_scale);
    free(st->kl_seen);
    free(st->ub_cell);
    free(st->fa_k);
    free(st->fa_rows);
    free(st->fa_mask);
    free(st->fa_q);
    free(st->fa_check_v);
    free(st->head_w);
    free(st->calib_acc);
    free(st->calib_cell);
    free(st->calib_target);
    free(st->victim_pos);
    free(st->cand);
    free(st->score);
    free(st->pscore);
    free(st->ring);
    free(st->grp_sfx);
    free(st->grp_valid);
    free(st->row_sum);
    free(st->tmp);
    free(st->ub_sum_acc);
    free(st->ub_chunk_acc);
    free(st->ub_row_acc);
    free(st->ub_pos);
    free(st->layer_group);
    free(st->layer_on);
    free(st->layer_rank);
    free(st->cell_lpos);
    free(st->cell_pos);
    pme_kvstore_enable(st, 0); /* frees the KV store */
    free(st);
}

void pme_reset(pme_state * st) {
    if (!st) {
        return;
    }
    for (int32_t c = 0; c < st->cfg.n_cells; ++c) {
        st->cell_pos[c] = -1;
    }
    memset(st->layer_group, -1, (size_t) st->cfg.n_layer);
    memset(st->kl_seen, 0, (size_t) st->cfg.n_layer);
    st->n_groups   = 0;
    st->main_group = -1;
    st->n_live = st->peak = st->evicted = st->evict_calls = st->ubatches = st->compactions = 0;
    st->lpos_offset                                                                        = 0;
    memset(st->d2h_bytes, 0, sizeof st->d2h_bytes);
    pme_kmirror_invalidate(st);
    memset(st->syncs, 0, sizeof st->syncs);
    memset(st->ub_kind_count, 0, sizeof st->ub_kind_count);
    st->pin_lo = st->pin_hi = 0; /* n_keep (pin_prefix) is a setting and stays */
    st->ub_n = st->ub_layers = st->ub_rows = 0;
    st->failed                             = 0;
    st->err[0]                             = 0;
    pme_kvstore_clear(st); /* a new sequence reuses the logical positions */
    pme_policy_reset(st);
}

const char * pme_last_error(const pme_state * st) {
    return st && st->failed ? st->err : "";
}

void pme_cell_assign(pme_state * st, int32_t cell, int32_t pos) {
    if (st->cell_pos[cell] < 0) {
        st->n_live++;
    } else {
        /* llama.cpp reused a cell we still thought live: its old token is gone, forget its scores */
        pme_policy_forget_cell(st, cell);
    }
    st->cell_pos[cell]  = pos;
    st->cell_lpos[cell] = pos + st->lpos_offset;
}

void pme_cell_free(pme_state * st, int32_t cell) {
    if (st->cell_pos[cell] < 0) {
        return;
    }
    st->cell_pos[cell] = -1;
    st->n_live--;
    pme_policy_forget_cell(st, cell);
}

void pme_get_stats(const pme_state * st, pme_stats * out) {
    if (!st || !out) {
        return;
    }
    out->cells_in_use     = st->n_live;
    out->peak_cells       = st->peak;
    out->tokens_evicted   = st->evicted;
    out->evict_calls      = st->evict_calls;
    out->ubatches         = st->ubatches;
    out->layers_scored    = st->ub_layers;
    out->compactions      = st->compactions;
    out->decode_steps     = st->ub_kind_count[0];
    out->decode_d2h_bytes = st->d2h_bytes[0];
    out->decode_syncs     = st->syncs[0];
    out->prompt_chunks    = st->ub_kind_count[1];
    out->prompt_d2h_bytes = st->d2h_bytes[1];
    out->prompt_syncs     = st->syncs[1];
}

int pme_cell_positions(const pme_state * st, int32_t * out, int32_t cap) {
    if (!st || !out || cap < 0) {
        return -1;
    }
    int32_t n = st->cfg.n_cells < cap ? st->cfg.n_cells : cap;
    memcpy(out, st->cell_pos, (size_t) n * sizeof(int32_t));
    return n;
}

int pme_begin_ubatch(pme_state * st, const int32_t * pos, int32_t n_tokens, int32_t flags) {
    if (!st || st->failed) {
        return -1;
    }
    if (!pos) {
        pme_set_error(st, "pme_begin_ubatch: pos is NULL");
        return -1;
    }
    if (n_tokens <= 0 || n_tokens > st->cfg.max_ubatch) {
        pme_set_error(st, "pme_begin_ubatch: n_tokens=%d outside [1, %d]", n_tokens, st->cfg.max_ubatch);
        return -1;
    }
    memcpy(st->ub_pos, pos, (size_t) n_tokens * sizeof(int32_t));
    st->ub_n     = n_tokens;
    st->ub_flags = flags;
    st->ub_kind_count[pme_ub_kind(st)]++;
    st->ub_serial++;
    /* graphs may be rebuilt between decodes, so cache groups are re-learned from each graph */
    memset(st->group_mapped, 0, sizeof st->group_mapped);
    memset(st->layer_group, -1, (size_t) st->cfg.n_layer);
    memset(st->kl_seen, 0, (size_t) st->cfg.n_layer);
    for (int32_t i = 0; i < n_tokens; ++i) {
        st->ub_cell[i] = -1;
    }
    st->n_groups   = 0;
    st->main_group = -1;
    pme_ubatch_reset_acc(st);
    return 0;
}

/* Which layers of the scored cache to read from now on: cfg.score_layers of them, evenly spaced from the first
 * to the last (all when there are no more). Each read layer splits the graph, and on a GPU or RPC synchronises the
 * backend, and costs its fold (with flash attention on, a recompute of its attention rows); the mean over a spread
 * of layers ranks tokens much as the mean over all of them (docs/scoring.md). Chosen once: a graph's layers do not
 * change, and the first ubatch has read every layer. */
static void choose_layers(pme_state * st) {
    if (st->layers_chosen) {
        return;
    }
    int32_t n = 0;
    for (int32_t il = 0; il < st->cfg.n_layer; ++il) {
        n += st->layer_group[il] == st->main_group;
    }
    const int32_t k = st->cfg.score_layers;
    for (int32_t il = 0, j = 0; il < st->cfg.n_layer; ++il) {
        if (st->layer_group[il] != st->main_group) {
            st->layer_on[il]   = 0;
            st->layer_rank[il] = -1;
            continue;
        }
        /* layer j of the n is read when some i in [0, k) maps to it: i * (n - 1) / (k - 1), rounded */
        int on = k == 0 || n <= k;
        for (int32_t i = 0; !on && i < k; ++i) {
            on = k > 1 ? (int32_t) ((2 * (int64_t) i * (n - 1) + (k - 1)) / (2 * (k - 1))) == j : j == n - 1;
        }
        st->layer_on[il]   = (uint8_t) (PME_LAYER_MAIN | (on ? PME_LAYER_READ : 0));
        st->layer_rank[il] = (int16_t) (j < INT16_MAX ? j : INT16_MAX);
        ++j;
    }
    st->n_main        = n;
    st->layers_chosen = 1;
}

int pme_end_ubatch(pme_state * st) {
    if (!st || st->failed) {
        return -1;
    }
    if (st->ub_n == 0) {
        pme_set_error(st, "pme_end_ubatch: no ubatch begun");
        return -1;
    }
    if (st->main_group < 0 || !st->group_mapped[st->main_group]) {
        pme_set_error(
            st, "pme_end_ubatch: the decode wrote no cells of the %d-cell cache (is the eval callback installed?)",
            st->cfg.n_cells);
        return -1;
    }
    if (st->ub_flags & PME_UB_RESTORE) { /* saved rows written (pme_kvstore.c), nothing observed */
        st->peak = st->n_live > st->peak ? st->n_live : st->peak;
        st->ub_n = 0;
        return 0;
    }
    if (st->ub_flags & PME_UB_QUERY) {
        /* a query probe for the key log: read, not observed, and removed by the caller; its cells count */
        st->peak = st->n_live > st->peak ? st->n_live : st->peak;
        st->ub_n = 0;
        return 0;
    }
    if (st->ub_layers == 0 && st->ops->needs_attention) {
        pme_set_error(st,
                      "pme_end_ubatch: no attention node (kq_soft_max or flash attention) of a scored layer was read");
        return -1;
    }
    if (!(st->ub_flags & PME_UB_PROBE)) {
        pme_kvstore_capture(st); /* before the tokens leave the sliding window (iSWA models) */
    }
    choose_layers(st);
    pme_dev_collect(st);
    pme_ubatch_finish_acc(st);
    pme_policy_observe(st);
    st->ubatches++;
    if (st->n_live > st->peak) {
        st->peak = st->n_live;
    }
    st->ub_n = 0;
    return 0;
}
