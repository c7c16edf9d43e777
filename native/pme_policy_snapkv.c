/* SnapKV (Li et al., NeurIPS 2024, arXiv 2404.14469): compress the prompt once, scoring each token
 * by the attention of the prompt's last W tokens (the observation window), pooled over neighbouring
 * positions. Generated tokens are never evicted, so the cache grows again during generation. */
#include "pme_internal.h"

#include <string.h>

static void snapkv_score(pme_state * st) {
    const size_t nc = (size_t) st->cfg.n_cells;
    memset(st->score, 0, nc * sizeof(float));
    for (int32_t r = 0; r < st->ub_rows; ++r) {
        const float * row = st->ub_row_acc + (size_t) r * nc;
        for (size_t c = 0; c < nc; ++c) {
            st->score[c] += row[c];
        }
    }
}

static int snapkv_at_prompt_end(const pme_state * st) {
    return (st->ub_flags & PME_UB_PREFILL) && (st->ub_flags & PME_UB_LAST);
}

const pme_policy_ops pme_snapkv_ops = {
    .needs_attention = 1,
    .reads           = PME_READS_ROWS,
    .observe         = NULL,
    .score           = snapkv_score,
    .evicts_now      = snapkv_at_prompt_end,
};
