/* TOVA (Oren et al., 2024, arXiv 2401.06104): evict the tokens the current token attends to least.
 * Only the last query row of the ubatch counts; nothing is remembered between steps. */
#include "pme_internal.h"

#include <string.h>

static void tova_score(pme_state * st) {
    const size_t nc = (size_t) st->cfg.n_cells;
    memcpy(st->score, st->ub_row_acc + (size_t) (st->ub_rows - 1) * nc, nc * sizeof(float));
}

const pme_policy_ops pme_tova_ops = {
    .needs_attention = 1,
    .reads           = PME_READS_LAST_ROW,
    .observe         = NULL,
    .score           = tova_score,
    .evicts_now      = pme_policy_always,
};
