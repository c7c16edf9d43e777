/* Position compaction: renumber the live positions 0..n_live-1, in order, so that the span the model
 * sees (oldest kept token to newest) stays within what it was trained on.
 *
 * Eviction never renumbers, so a kept old token drifts ever farther back in RoPE distance; past the
 * trained context the model breaks down (SmolLM2: ppl 17 -> 1000+ at ~1.5x n_ctx_train). Every run of
 * consecutive live positions moves down with one llama_memory_seq_add, which llama.cpp turns into a
 * K re-rotation at the next decode (the context-shift mechanism). Order is kept and nothing is evicted:
 * only the gaps that eviction left close up. */
#include "llama.h"
#include "pme_internal.h"

#include <stdlib.h>

int32_t pme_compact(pme_state * st, void * llama_memory, int32_t seq_id, int32_t next_pos) {
    if (!st || st->failed) {
        return -1;
    }
    if (!llama_memory) {
        pme_set_error(st, "pme_compact: llama_memory is NULL");
        return -1;
    }
    int32_t * live = st->victim_pos; /* scratch (n_cells): no eviction is in flight during a compaction */
    int32_t   n    = 0;
    for (int32_t c = 0; c < st->cfg.n_cells; ++c) {
        const int32_t p = st->cell_pos[c];
        if (p < 0) {
            continue;
        }
        if (p >= next_pos) {
            pme_set_error(st, "pme_compact: cell %d holds position %d >= next_pos %d", c, p, next_pos);
            return -1;
        }
        live[n++] = p;
    }
    if (n == 0) {
        return 0;
    }
    qsort(live, (size_t) n, sizeof(int32_t), pme_cmp_i32);

    /* runs in ascending order: a run moves down to its rank, below the next run's old positions,
     * so no run lands on positions a later seq_add still has to select */
    int32_t i = 0;
    while (i < n) {
        int32_t j = i + 1;
        while (j < n && live[j] == live[j - 1] + 1) {
            ++j;
        }
        const int32_t delta = i - live[i];
        if (delta != 0) {
            llama_memory_seq_add((llama_memory_t) llama_memory, seq_id, live[i], live[j - 1] + 1, delta);
        }
        i = j;
    }
    for (int32_t c = 0; c < st->cfg.n_cells; ++c) {
        if (st->cell_pos[c] >= 0) {
            st->cell_pos[c] = pme_lower_bound(live, n, st->cell_pos[c]);
        }
    }
    if (st->pin_hi > st->pin_lo) { /* the recalled block moves with its cells */
        st->pin_lo = pme_lower_bound(live, n, st->pin_lo);
        st->pin_hi = pme_lower_bound(live, n, st->pin_hi);
    }
    const int32_t shift = next_pos - n;
    st->lpos_offset += shift;   /* tokens decoded from now on keep their logical position */
    st->compactions++;
    pme_kmirror_invalidate(st); /* llama.cpp re-rotates every moved K row before the next ubatch */
    return shift;
}
