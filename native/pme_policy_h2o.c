/* H2O (Zhang et al., NeurIPS 2023, arXiv 2306.14048): heavy hitters. A token's score is the
 * attention it has received from every query so far (prompt and generated), summed.
 *
 * With forget < 1 the sum fades by that factor per token observed (A2SF, Jo & Shin 2024, arXiv
 * 2407.20485). A plain sum never lets a token that arrived late catch up with one that has been
 * collecting attention for thousands of steps, so over a long answer the heavy set freezes on stale
 * tokens. The rows of a prompt chunk arrive already summed, so a chunk of n tokens fades the old sum
 * by forget^n and adds its own undecayed; for decode (n = 1) that is exact. */
#include "pme_internal.h"

#include <math.h>
#include <string.h>

static void h2o_observe(pme_state * st) {
    const float keep = st->cfg.forget < 1.0f ? powf(st->cfg.forget, (float) st->ub_n) : 1.0f;
    for (int32_t c = 0; c < st->cfg.n_cells; ++c) {
        st->pscore[c] = keep * st->pscore[c] + st->ub_sum_acc[c];
    }
}

static void h2o_score(pme_state * st) {
    memcpy(st->score, st->pscore, (size_t) st->cfg.n_cells * sizeof(float));
}

const pme_policy_ops pme_h2o_ops = {
    .needs_attention = 1,
    .reads           = PME_READS_SUM,
    .observe         = h2o_observe,
    .score           = h2o_score,
    .evicts_now      = pme_policy_always,
};
