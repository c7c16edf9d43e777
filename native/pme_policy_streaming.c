/* StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453): keep the first n_sink tokens (attention
 * sinks) and the most recent ones. No attention is read: every score is equal, so the oldest
 * non-sink tokens go first. */
#include "pme_internal.h"

#include <string.h>

static void streaming_score(pme_state * st) {
    memset(st->score, 0, (size_t) st->cfg.n_cells * sizeof(float));
}

const pme_policy_ops pme_streaming_ops = {
    .needs_attention = 0,
    .reads           = 0,
    .observe         = NULL,
    .score           = streaming_score,
    .evicts_now      = pme_policy_always,
};
