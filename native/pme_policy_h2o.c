/* H2O (Zhang et al., NeurIPS 2023, arXiv 2306.14048): heavy hitters. A token's score is the
 * attention it has received from every query so far (prompt and generated), summed. */
#include "pme_internal.h"

#include <string.h>

static void h2o_observe(pme_state * st) {
    for (int32_t c = 0; c < st->cfg.n_cells; ++c) {
        st->pscore[c] += st->ub_sum_acc[c];
    }
}

static void h2o_score(pme_state * st) {
    memcpy(st->score, st->pscore, (size_t) st->cfg.n_cells * sizeof(float));
}

const pme_policy_ops pme_h2o_ops = { 1, h2o_observe, h2o_score, pme_policy_always };
