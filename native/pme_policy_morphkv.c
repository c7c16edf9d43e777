/* MorphKV (Ghadia et al., ICML 2025, arXiv 2503.00979): keep the W most recent tokens plus the
 * older tokens that those W tokens attend to most. The attention rows of the last W tokens are
 * kept in a ring over cells and fused by sum or max at each eviction.
 *
 * Prefill chunks use a persistent per-cell score, max(decay*old, chunk max), instead of the ring:
 * the question that makes an old token matter has usually not arrived yet. */
#include "pme_internal.h"
#include <stdlib.h>
#include <string.h>

void pme_policy_reset(pme_state * st) {
    const size_t nc = (size_t) st->cfg.n_cells;
    memset(st->ring, 0, (size_t) st->cfg.window * nc * sizeof(float));
    memset(st->pscore, 0, nc * sizeof(float));
    st->ring_head = 0;
    st->ring_count = 0;
}

void pme_policy_forget_cell(pme_state * st, int32_t cell) {
    const size_t nc = (size_t) st->cfg.n_cells;
    for (int32_t r = 0; r < st->cfg.window; ++r) st->ring[(size_t) r * nc + (size_t) cell] = 0.0f;
    st->pscore[cell] = 0.0f;
}

void pme_policy_observe(pme_state * st) {
    const size_t nc = (size_t) st->cfg.n_cells;
    for (int32_t r = 0; r < st->ub_rows; ++r) {
        memcpy(st->ring + (size_t) st->ring_head * nc, st->ub_row_acc + (size_t) r * nc, nc * sizeof(float));
        st->ring_head = (st->ring_head + 1) % st->cfg.window;
        if (st->ring_count < st->cfg.window) st->ring_count++;
    }
    const float d = st->cfg.prefill_decay;
    for (size_t c = 0; c < nc; ++c) {
        const float decayed = d * st->pscore[c];
        const float fresh = st->ub_chunk_acc[c];
        st->pscore[c] = fresh > decayed ? fresh : decayed;
    }
}

static void fuse_ring(pme_state * st) {
    const size_t nc = (size_t) st->cfg.n_cells;
    memset(st->score, 0, nc * sizeof(float));
    for (int32_t r = 0; r < st->ring_count; ++r) {
        const float * row = st->ring + (size_t) r * nc;
        if (st->cfg.fusion == PME_FUSION_MAX) {
            for (size_t c = 0; c < nc; ++c) if (row[c] > st->score[c]) st->score[c] = row[c];
        } else {
            for (size_t c = 0; c < nc; ++c) st->score[c] += row[c];
        }
    }
}

static int by_score_then_age(const void * a, const void * b) {
    const pme_candidate * x = a, * y = b;
    if (x->score < y->score) return -1;
    if (x->score > y->score) return 1;
    /* equal scores: the older token goes first, as in a recency fallback */
    return (x->pos > y->pos) - (x->pos < y->pos);
}

static int by_pos(const void * a, const void * b) {
    const pme_candidate * x = a, * y = b;
    return (x->pos > y->pos) - (x->pos < y->pos);
}

/* Max-pool scores over neighbouring positions (SnapKV's clustering): a multi-token fact such as a
 * number split into digit tokens survives whole when any of its tokens scores high. */
static void pool_scores(pme_candidate * cand, int32_t n, int32_t radius, float * scratch) {
    qsort(cand, (size_t) n, sizeof(pme_candidate), by_pos);
    for (int32_t i = 0; i < n; ++i) {
        float best = cand[i].score;
        for (int32_t j = i - 1; j >= 0 && cand[i].pos - cand[j].pos <= radius; --j) if (cand[j].score > best) best = cand[j].score;
        for (int32_t j = i + 1; j < n && cand[j].pos - cand[i].pos <= radius; ++j) if (cand[j].score > best) best = cand[j].score;
        scratch[i] = best;
    }
    for (int32_t i = 0; i < n; ++i) cand[i].score = scratch[i];
}

/* Writes the positions to evict (lowest score first) and returns how many. */
int pme_policy_select(pme_state * st, int32_t next_pos, int32_t * out_pos, int32_t cap) {
    const int64_t excess = st->n_live - st->cfg.budget;
    if (excess <= 0) return 0;

    if (st->ub_prefill) {
        memcpy(st->score, st->pscore, (size_t) st->cfg.n_cells * sizeof(float));
    } else {
        fuse_ring(st);
    }

    const int32_t protect_from = next_pos - st->cfg.protect_recent;
    int32_t n_cand = 0;
    for (int32_t c = 0; c < st->cfg.n_cells; ++c) {
        const int32_t p = st->cell_pos[c];
        if (p >= 0 && p < protect_from) st->cand[n_cand++] = (pme_candidate) { st->score[c], p };
    }
    if (st->cfg.pool_radius > 0) pool_scores(st->cand, n_cand, st->cfg.pool_radius, st->tmp);
    qsort(st->cand, (size_t) n_cand, sizeof(pme_candidate), by_score_then_age);

    int32_t n = (int32_t) (excess < n_cand ? excess : n_cand);
    if (n > cap) n = cap;
    for (int32_t i = 0; i < n; ++i) out_pos[i] = st->cand[i].pos;
    return n;
}
