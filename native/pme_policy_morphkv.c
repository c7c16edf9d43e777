/* MorphKV (Ghadia et al., ICML 2025, arXiv 2503.00979): keep the W most recent tokens plus the
 * older tokens that those W tokens attend to most. The attention rows of the last W tokens are
 * kept in a ring over cells and fused by sum or max at each eviction.
 *
 * Prompt chunks keep a persistent per-cell score, max(decay*old, chunk max). A prompt longer than the
 * cache has its chunks evicted before its question is read, so with prefill_probe the engine decodes the
 * prompt's last W tokens after each chunk (a probe, removed again) and their rows score the cache, as
 * SnapKV's observation window does once the whole prompt is in. */
#include "pme_internal.h"

#include <string.h>

static void morphkv_observe(pme_state * st) {
    const size_t nc = (size_t) st->cfg.n_cells;
    pme_ring_roll(st, st->ub_rows); /* the rows written now replace a whole-window group's oldest */
    const int group = pme_ring_groups(st);
    for (int32_t r = 0; r < st->ub_rows; ++r) {
        /* a group's rows live in its suffix sums (pme_ring_group.c); on a device they never came over */
        if (st->ub_grp_dev) {
            memset(st->ring + (size_t) st->ring_head * nc, 0, nc * sizeof(float));
        } else {
            memcpy(st->ring + (size_t) st->ring_head * nc, st->ub_row_acc + (size_t) r * nc, nc * sizeof(float));
        }
        st->ring_head = (st->ring_head + 1) % st->cfg.window;
        if (st->ring_count < st->cfg.window) {
            st->ring_count++;
        }
    }
    if (group) {
        pme_ring_group_new(st); /* ring_head is back where the group began */
    }
    const float d = st->cfg.prefill_decay;
    for (size_t c = 0; c < nc; ++c) {
        const float decayed = d * st->pscore[c];
        const float fresh   = st->ub_chunk_acc[c];
        st->pscore[c]       = fresh > decayed ? fresh : decayed;
    }
}

static void morphkv_score(pme_state * st) {
    const size_t nc     = (size_t) st->cfg.n_cells;
    const int    prompt = pme_ub_is_prompt(st);
    if (prompt && !st->cfg.prefill_probe) {
        memcpy(st->score, st->pscore, nc * sizeof(float));
        return;
    }
    /* decode: the fused rows of the last W tokens. A prompt with a probe: the fused rows of its last
     * tokens (the probe, or the final chunk, which holds the question) plus the persistent score, so
     * that both what the question points at and what was salient on the way survive. */
    if (prompt) {
        memcpy(st->score, st->pscore, nc * sizeof(float));
    } else {
        memset(st->score, 0, nc * sizeof(float));
    }
    float * fused = st->tmp;
    memset(fused, 0, nc * sizeof(float));
    const float * group = pme_ring_group_row(st); /* a whole-window chunk's rows still in the ring, summed */
    for (size_t c = 0; group && c < nc; ++c) {
        fused[c] = st->grp_valid[c] ? group[c] : 0.0f;
    }
    for (int32_t r = 0; r < st->ring_count; ++r) {
        if (pme_ring_slot_grouped(st, r)) {
            continue;
        }
        const float * row = st->ring + (size_t) r * nc;
        if (st->cfg.fusion == PME_FUSION_MAX) {
            for (size_t c = 0; c < nc; ++c) {
                if (row[c] > fused[c]) {
                    fused[c] = row[c];
                }
            }
        } else {
            for (size_t c = 0; c < nc; ++c) {
                fused[c] += row[c];
            }
        }
    }
    for (size_t c = 0; c < nc; ++c) {
        st->score[c] += fused[c];
    }
}

const pme_policy_ops pme_morphkv_ops = {
    .needs_attention = 1,
    .reads           = PME_READS_ROWS | PME_READS_MAX,
    .observe         = morphkv_observe,
    .score           = morphkv_score,
    .evicts_now      = pme_policy_always,
};
