/* Apply the policy's victims: merge positions into ranges and remove them with llama_memory_seq_rm. */
#include "llama.h"
#include "pme_internal.h"

#include <stdlib.h>

static int contains(const int32_t * sorted, int32_t n, int32_t v) {
    const int32_t i = pme_lower_bound(sorted, n, v);
    return i < n && sorted[i] == v;
}

int pme_evict(pme_state * st, void * llama_memory, int32_t seq_id, int32_t next_pos) {
    if (!st || st->failed) {
        return -1;
    }
    if (!llama_memory) {
        pme_set_error(st, "pme_evict: llama_memory is NULL");
        return -1;
    }
    int32_t *     v = st->victim_pos;
    const int32_t n = pme_policy_select(st, next_pos, v, st->cfg.n_cells);
    if (n <= 0) {
        return n;
    }
    qsort(v, (size_t) n, sizeof(int32_t), pme_cmp_i32);

    int32_t i = 0;
    while (i < n) {
        int32_t j = i + 1;
        while (j < n && v[j] == v[j - 1] + 1) {
            ++j;
        }
        if (!llama_memory_seq_rm((llama_memory_t) llama_memory, seq_id, v[i], v[j - 1] + 1)) {
            pme_set_error(st, "llama_memory_seq_rm(seq %d, [%d, %d)) failed", seq_id, v[i], v[j - 1] + 1);
            return -1;
        }
        st->evict_calls++;
        i = j;
    }
    for (int32_t c = 0; c < st->cfg.n_cells; ++c) {
        if (st->cell_pos[c] >= 0 && contains(v, n, st->cell_pos[c])) {
            pme_kvstore_save(st, c);
            pme_cell_free(st, c);
        }
    }
    st->evicted += n;
    return n;
}

int pme_drop_range(pme_state * st, void * llama_memory, int32_t seq_id, int32_t p0, int32_t p1) {
    if (!st || st->failed) {
        return -1;
    }
    if (!llama_memory || p0 < 0 || p1 < p0) {
        pme_set_error(st, "pme_drop_range: llama_memory %p, [%d, %d)", llama_memory, p0, p1);
        return -1;
    }
    if (!llama_memory_seq_rm((llama_memory_t) llama_memory, seq_id, p0, p1)) {
        pme_set_error(st, "llama_memory_seq_rm(seq %d, [%d, %d)) failed", seq_id, p0, p1);
        return -1;
    }
    int32_t n = 0;
    for (int32_t c = 0; c < st->cfg.n_cells; ++c) {
        if (st->cell_pos[c] >= p0 && st->cell_pos[c] < p1) {
            pme_kvstore_save(st, c); /* as pme_evict: the rows stay in the freed cell until it is reused */
            pme_cell_free(st, c);
            ++n;
        }
    }
    return n;
}

/* Roll the sequence back to from_pos (a chat turn that diverged from the cached history). */
int pme_truncate(pme_state * st, void * llama_memory, int32_t seq_id, int32_t from_pos) {
    if (!st || st->failed) {
        return -1;
    }
    if (!llama_memory || from_pos < 0) {
        pme_set_error(st, "pme_truncate: llama_memory %p, from_pos %d", llama_memory, from_pos);
        return -1;
    }
    if (!llama_memory_seq_rm((llama_memory_t) llama_memory, seq_id, from_pos, -1)) {
        pme_set_error(st, "llama_memory_seq_rm(seq %d, [%d, end)) failed", seq_id, from_pos);
        return -1;
    }
    int32_t n = 0;
    for (int32_t c = 0; c < st->cfg.n_cells; ++c) {
        if (st->cell_pos[c] >= from_pos) {
            pme_cell_free(st, c);
            ++n;
        }
    }
    /* the ring rows came from the dropped tokens; the next decodes refill it */
    return n;
}

int32_t pme_min_live_tail(const pme_state * st, int32_t next_pos) {
    if (!st || next_pos < 0) {
        return -1;
    }
    /* mark which of the last positions are live, walking down from next_pos - 1 */
    int32_t   p    = next_pos;
    int32_t   span = st->cfg.n_cells < next_pos ? st->cfg.n_cells : next_pos;
    uint8_t * live = calloc((size_t) span + 1, 1);
    if (!live) {
        return next_pos;
    }
    for (int32_t c = 0; c < st->cfg.n_cells; ++c) {
        const int32_t q = st->cell_pos[c];
        if (q >= next_pos - span && q < next_pos) {
            live[q - (next_pos - span)] = 1;
        }
    }
    while (p > next_pos - span && live[p - 1 - (next_pos - span)]) {
        --p;
    }
    free(live);
    return p;
}
