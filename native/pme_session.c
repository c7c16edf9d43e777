/* Save and restore the scorer's state with a conversation (pymorph_edge/session_file.py).
 *
 * llama_state_seq_set_data puts a saved sequence back into an empty cache as one contiguous slot, cells
 * 0..n-1, in the order llama_state_seq_get_data wrote them, which is cell order. So the live cells are
 * written here in cell order and read back into cells 0..n-1, and the map matches llama.cpp's again
 * (tests/test_sessions.py checks it against llama.cpp's own record). Only live cells are written, so
 * the size is bounded by the budget, not by how long the conversation has been. */
#include "pme_internal.h"

#include <string.h>

#define SESSION_MAGIC   0x53454d50u /* "PMES" little-endian */
#define SESSION_VERSION 2u          /* 2: the ring group's suffix sums (version 1 files have none, grp_left 0) */

typedef struct session_header {
    uint32_t magic;
    uint32_t version;
    int32_t  policy;
    int32_t  n_cells;
    int32_t  window;
    int32_t  ring_head;
    int32_t  ring_count;
    int32_t  grp_left; /* rows of a whole-window group still in the ring (pme_ring_group.c), 0 none */
    int64_t  n_live;
    int64_t  peak;
    int64_t  evicted;
    int64_t  evict_calls;
    int64_t  ubatches;
    int64_t  compactions;
    int64_t  lpos_offset;
} session_header;

/* bytes per live cell: position, logical position, persistent score, ring_count ring values, then the group's
 * suffix sums still in use (grp_left of them) */
static int64_t per_cell(int32_t ring_count, int32_t grp_left) {
    return (int64_t) (sizeof(int32_t) + sizeof(int64_t) + sizeof(float)) +
           (int64_t) (ring_count + grp_left) * (int64_t) sizeof(float);
}

static int32_t grp_left(const pme_state * st) {
    return st->grp_on != PME_GRP_NONE ? st->cfg.window - st->grp_out : 0;
}

int64_t pme_session_size(const pme_state * st) {
    if (!st) {
        return -1;
    }
    return (int64_t) sizeof(session_header) + st->n_live * per_cell(st->ring_count, grp_left(st));
}

int64_t pme_session_save(pme_state * st, void * buf, int64_t cap) {
    if (!st || !buf) {
        return -1;
    }
    const int64_t need = pme_session_size(st);
    if (cap < need) {
        pme_set_error(st, "pme_session_save: buffer of %lld bytes, %lld needed", (long long) cap, (long long) need);
        return -1;
    }
    if (pme_ring_group_fetch_all(st) != 0) { /* sums still on a device come over once */
        return -1;
    }
    const int32_t  left = grp_left(st);
    session_header h    = { SESSION_MAGIC, SESSION_VERSION, st->cfg.policy, st->cfg.n_cells, st->cfg.window,
                            st->ring_head, st->ring_count,  left,           st->n_live,      st->peak,
                            st->evicted,   st->evict_calls, st->ubatches,   st->compactions, st->lpos_offset };
    char *         p    = (char *) buf;
    memcpy(p, &h, sizeof h);
    p += sizeof h;
    const size_t nc = (size_t) st->cfg.n_cells;
    for (int32_t c = 0; c < st->cfg.n_cells; ++c) {
        if (st->cell_pos[c] < 0) {
            continue;
        }
        memcpy(p, &st->cell_pos[c], sizeof(int32_t));
        p += sizeof(int32_t);
        memcpy(p, &st->cell_lpos[c], sizeof(int64_t));
        p += sizeof(int64_t);
        memcpy(p, &st->pscore[c], sizeof(float));
        p += sizeof(float);
        for (int32_t r = 0; r < st->ring_count; ++r) {
            memcpy(p, &st->ring[(size_t) r * nc + (size_t) c], sizeof(float));
            p += sizeof(float);
        }
        for (int32_t k = st->cfg.window - left; k < st->cfg.window; ++k) {
            const float v = st->grp_valid[c] ? st->grp_sfx[(size_t) k * nc + (size_t) c] : 0.0f;
            memcpy(p, &v, sizeof(float));
            p += sizeof(float);
        }
    }
    return need;
}

int pme_session_load(pme_state * st, const void * buf, int64_t size) {
    if (!st || !buf) {
        return -1;
    }
    session_header h;
    if (size < (int64_t) sizeof h) {
        pme_set_error(st, "scorer state of %lld bytes is shorter than its header", (long long) size);
        return -1;
    }
    memcpy(&h, buf, sizeof h);
    /* every check comes before the state is touched: a bad file leaves the running state as it was */
    if (h.magic != SESSION_MAGIC || h.version < 1 || h.version > SESSION_VERSION) {
        pme_set_error(st, "not a scorer state (magic %08x, version %u)", h.magic, h.version);
        return -1;
    }
    if (h.policy != st->cfg.policy || h.n_cells != st->cfg.n_cells || h.window != st->cfg.window) {
        pme_set_error(st, "scorer state for policy %d, %d cells, window %d; this one is policy %d, %d cells, window %d",
                      h.policy, h.n_cells, h.window, st->cfg.policy, st->cfg.n_cells, st->cfg.window);
        return -1;
    }
    if (h.n_live < 0 || h.n_live > st->cfg.n_cells || h.ring_count < 0 || h.ring_count > st->cfg.window ||
        h.ring_head < 0 || h.ring_head >= (h.window > 0 ? h.window : 1) || h.peak < h.n_live || h.evicted < 0 ||
        h.grp_left < 0 || h.grp_left > h.ring_count || (h.version < 2 && h.grp_left != 0)) {
        pme_set_error(st, "scorer state has out-of-range counts (n_live %lld, ring %d/%d, group %d)",
                      (long long) h.n_live, h.ring_count, h.ring_head, h.grp_left);
        return -1;
    }
    if (size != (int64_t) sizeof h + h.n_live * per_cell(h.ring_count, h.grp_left)) {
        pme_set_error(st, "scorer state of %lld bytes, expected %lld", (long long) size,
                      (long long) ((int64_t) sizeof h + h.n_live * per_cell(h.ring_count, h.grp_left)));
        return -1;
    }
    const char * p = (const char *) buf + sizeof h;
    for (int64_t i = 0; i < h.n_live; ++i) { /* cells hold positions in any order, but none is negative */
        int32_t pos;
        memcpy(&pos, p + i * per_cell(h.ring_count, h.grp_left), sizeof pos);
        if (pos < 0) {
            pme_set_error(st, "scorer state has a negative position (%d) in cell %lld", pos, (long long) i);
            return -1;
        }
    }
    pme_reset(st);
    const size_t  nc   = (size_t) st->cfg.n_cells;
    const int32_t out0 = st->cfg.window - h.grp_left; /* the group's first suffix sum in use */
    memset(st->grp_valid, 0, nc);                     /* cells past the loaded ones hold nothing the sums measured */
    for (int64_t i = 0; i < h.n_live; ++i) {
        const int32_t c = (int32_t) i;
        memcpy(&st->cell_pos[c], p, sizeof(int32_t));
        p += sizeof(int32_t);
        memcpy(&st->cell_lpos[c], p, sizeof(int64_t));
        p += sizeof(int64_t);
        memcpy(&st->pscore[c], p, sizeof(float));
        p += sizeof(float);
        for (int32_t r = 0; r < h.ring_count; ++r) {
            memcpy(&st->ring[(size_t) r * nc + (size_t) c], p, sizeof(float));
            p += sizeof(float);
        }
        for (int32_t k = out0; k < st->cfg.window; ++k) {
            memcpy(&st->grp_sfx[(size_t) k * nc + (size_t) c], p, sizeof(float));
            p += sizeof(float);
        }
        st->grp_valid[c] = 1;
    }
    st->n_live      = h.n_live;
    st->peak        = h.peak;
    st->evicted     = h.evicted;
    st->evict_calls = h.evict_calls;
    st->ubatches    = h.ubatches;
    st->compactions = h.compactions;
    st->lpos_offset = h.lpos_offset;
    st->ring_head   = h.ring_head;
    st->ring_count  = h.ring_count;
    if (h.grp_left > 0) { /* the next rows written replace the group's, oldest first, from ring_head */
        st->grp_on   = PME_GRP_HOST;
        st->grp_out  = out0;
        st->grp_head = (h.ring_head - out0 + st->cfg.window) % st->cfg.window;
        st->grp_n_kv = st->cfg.n_cells;
    }
    return 0;
}
