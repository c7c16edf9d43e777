/* Pins and recalled blocks: positions the policy may not evict, whatever their scores.
 *
 * n_keep pins the first tokens (llama.cpp's n_keep, a system prompt). A recalled block (evicted text brought
 * back for a new turn, pymorph_edge/engine/recall.py) is pinned only while the text it was recalled for is
 * decoded: that text's attention is what tells the policy whether the block is worth keeping. */
#include "pme_internal.h"

int pme_set_pins(pme_state * st, int32_t n_keep, int32_t lo, int32_t hi) {
    if (!st || st->failed) {
        return -1;
    }
    if (n_keep < 0 || lo < 0 || hi < 0) {
        pme_set_error(st, "pme_set_pins: negative n_keep %d or range [%d, %d)", n_keep, lo, hi);
        return -1;
    }
    st->pin_prefix = n_keep;
    st->pin_lo     = lo;
    st->pin_hi     = hi > lo ? hi : lo;
    return 0;
}

int pme_mark_recalled(pme_state * st, int32_t pos0, int32_t n, const int64_t * lpos) {
    if (!st || st->failed) {
        return -1;
    }
    if (n < 0 || pos0 < 0 || (n > 0 && !lpos)) {
        pme_set_error(st, "pme_mark_recalled: pos0 %d, n %d", pos0, n);
        return -1;
    }
    pme_kvstore_untag(st, pos0 + st->lpos_offset, n);
    int32_t found = 0;
    for (int32_t c = 0; c < st->cfg.n_cells; ++c) {
        const int32_t p = st->cell_pos[c];
        if (p >= pos0 && p < pos0 + n) {
            st->cell_lpos[c] = lpos[p - pos0];
            ++found;
        } else if (p >= pos0 + n) {
            /* the new text decoded in the block's own ubatch, after it: its logical positions were counted as if
             * the block were text of the sequence */
            st->cell_lpos[c] -= n;
        }
    }
    if (found != n) {
        pme_set_error(st, "pme_mark_recalled: %d of the block's %d positions are live", found, n);
        return -1;
    }
    st->lpos_offset -= n;
    return 0;
}

int pme_cell_lpos(const pme_state * st, int64_t * out, int32_t cap) {
    if (!st || cap < st->cfg.n_cells) {
        return -1;
    }
    for (int32_t c = 0; c < st->cfg.n_cells; ++c) {
        out[c] = st->cell_pos[c] >= 0 ? st->cell_lpos[c] : -1;
    }
    return st->cfg.n_cells;
}

int pme_is_pinned(const pme_state * st, int32_t pos) {
    return pos < st->pin_prefix || (pos >= st->pin_lo && pos < st->pin_hi);
}

int pme_skip_positions(pme_state * st, int32_t n) {
    if (!st || st->failed) {
        return -1;
    }
    if (n < 0) {
        pme_set_error(st, "pme_skip_positions: n %d", n);
        return -1;
    }
    st->lpos_offset += n;
    return 0;
}
