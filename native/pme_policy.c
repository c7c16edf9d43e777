/* What every policy shares: per-cell state lifetime, candidate filtering (recent window, sliding
 * window, sinks), optional position pooling and lowest-score-first selection. */
#include "pme_internal.h"

#include <stdlib.h>
#include <string.h>

const pme_policy_ops * pme_policy_lookup(int32_t kind) {
    switch (kind) {
        case PME_POLICY_MORPHKV:
            return &pme_morphkv_ops;
        case PME_POLICY_H2O:
            return &pme_h2o_ops;
        case PME_POLICY_TOVA:
            return &pme_tova_ops;
        case PME_POLICY_SNAPKV:
            return &pme_snapkv_ops;
        case PME_POLICY_STREAMING:
            return &pme_streaming_ops;
        default:
            return NULL;
    }
}

void pme_policy_reset(pme_state * st) {
    const size_t nc = (size_t) st->cfg.n_cells;
    memset(st->ring, 0, (size_t) st->cfg.window * nc * sizeof(float));
    memset(st->pscore, 0, nc * sizeof(float));
    st->ring_head   = 0;
    st->ring_count  = 0;
    st->grp_on      = PME_GRP_NONE;
    st->grp_fetched = -1;
}

void pme_policy_forget_cell(pme_state * st, int32_t cell) {
    const size_t nc = (size_t) st->cfg.n_cells;
    for (int32_t r = 0; r < st->cfg.window; ++r) {
        st->ring[(size_t) r * nc + (size_t) cell] = 0.0f;
    }
    st->pscore[cell]    = 0.0f;
    st->grp_valid[cell] = 0;
}

void pme_policy_observe(pme_state * st) {
    if (st->ops->observe) {
        st->ops->observe(st);
    }
}

static int by_score_then_age(const void * a, const void * b) {
    const pme_candidate *x = a, *y = b;
    if (x->score < y->score) {
        return -1;
    }
    if (x->score > y->score) {
        return 1;
    }
    /* equal scores: the older token goes first, as in a recency fallback */
    return (x->pos > y->pos) - (x->pos < y->pos);
}

static int by_pos(const void * a, const void * b) {
    const pme_candidate *x = a, *y = b;
    return (x->pos > y->pos) - (x->pos < y->pos);
}

/* Max-pool scores over neighbouring positions (SnapKV's clustering): a multi-token fact such as a
 * number split into digit tokens survives whole when any of its tokens scores high. Neighbours are
 * judged by logical position, so tokens that compaction brought together do not pool. */
static void pool_scores(pme_candidate * cand, int32_t n, int32_t radius, int32_t after, float * scratch) {
    qsort(cand, (size_t) n, sizeof(pme_candidate), by_pos);
    const int32_t back = after > radius ? after : radius;
    for (int32_t i = 0; i < n; ++i) {
        float best = cand[i].score;
        for (int32_t j = i - 1; j >= 0 && cand[i].lpos - cand[j].lpos <= back; --j) {
            if (cand[j].score > best) {
                best = cand[j].score;
            }
        }
        for (int32_t j = i + 1; j < n && cand[j].lpos - cand[i].lpos <= radius; ++j) {
            if (cand[j].score > best) {
                best = cand[j].score;
            }
        }
        scratch[i] = best;
    }
    for (int32_t i = 0; i < n; ++i) {
        cand[i].score = scratch[i];
    }
}

/* Writes the positions to evict (lowest score first) and returns how many. */
int pme_policy_select(pme_state * st, int32_t next_pos, int32_t * out_pos, int32_t cap) {
    const int64_t excess = st->n_live - st->cfg.budget;
    if (excess <= 0 || !st->ops->evicts_now(st)) {
        return 0;
    }
    st->ops->score(st);

    const int32_t protect_from = next_pos - st->cfg.protect_recent;
    int32_t       n_cand       = 0;
    for (int32_t c = 0; c < st->cfg.n_cells; ++c) {
        const int32_t p = st->cell_pos[c];
        if (p >= st->cfg.n_sink && p < protect_from && !pme_is_pinned(st, p)) {
            st->cand[n_cand++] = (pme_candidate) { st->score[c], p, st->cell_lpos[c] };
        }
    }
    /* Pooling keeps a prompt's facts whole for the question that comes later; at a decode step the cells it
     * lends to a high scorer's neighbours are taken from the context the next tokens need (it cost MorphKV
     * ppl 1.212x against 1.136x at budget 256 on SmolLM2, benchmarks/results/smollm2-135m-b256-ppl-ablation) */
    if ((st->cfg.pool_radius > 0 || st->cfg.pool_after > 0) && (pme_ub_is_prompt(st) || !st->cfg.pool_prompt_only)) {
        pool_scores(st->cand, n_cand, st->cfg.pool_radius, st->cfg.pool_after, st->tmp);
    }
    qsort(st->cand, (size_t) n_cand, sizeof(pme_candidate), by_score_then_age);

    int32_t n = (int32_t) (excess < n_cand ? excess : n_cand);
    if (n > cap) {
        n = cap;
    }
    for (int32_t i = 0; i < n; ++i) {
        out_pos[i] = st->cand[i].pos;
    }
    return n;
}

int pme_policy_always(const pme_state * st) {
    (void) st;
    return 1;
}
