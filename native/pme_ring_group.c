/* The MorphKV ring's rows from one prompt ubatch that filled the whole window, kept as suffix sums.
 *
 * A prompt chunk (or a probe) of at least W tokens writes all W rows of the ring at once. The decode steps after it
 * overwrite them one by one, oldest first, so at any time the rows of that chunk still in the ring are its last
 * W - k, and all the fused score needs of them is their sum: suffix sum k, S_k = rows k..W-1 summed in order, in
 * double (the way ggml's sum_rows adds). Where the rows were reduced on a device (pme_devring.c), the W suffix sums
 * stay there and the host reads only the one in use: S_0 with the chunk, then one row with each decode step, instead
 * of all W rows with the chunk (issue 21: 132 bytes a cell per chunk). The host path keeps the same sums, so a run
 * scores the same floats on the CPU and on any backend.
 *
 * A cell freed since the chunk (evicted, or reused by llama.cpp) takes no part of the sums: grp_valid. Sum fusion only;
 * max fusion keeps every row. */
#include "pme_internal.h"

#include <string.h>

int pme_ring_groups(const pme_state * st) {
    return st->ops == &pme_morphkv_ops && st->cfg.fusion == PME_FUSION_SUM && st->ub_n > 1 &&
           st->ub_rows == st->cfg.window && !(st->ub_flags & PME_UB_SUPERSEDED);
}

void pme_ring_roll(pme_state * st, int32_t rows) {
    if (st->grp_on == PME_GRP_NONE) {
        return;
    }
    st->grp_out += rows;
    if (st->grp_out >= st->cfg.window) {
        st->grp_on      = PME_GRP_NONE;
        st->grp_fetched = -1;
    }
}

int pme_ring_slot_grouped(const pme_state * st, int32_t slot) {
    const int32_t w = st->cfg.window;
    return st->grp_on != PME_GRP_NONE && (slot - st->grp_head + w) % w >= st->grp_out;
}

/* S_k of the ubatch's (normalised) rows, for every k */
static void suffix_sums(pme_state * st) {
    const size_t  nc = (size_t) st->cfg.n_cells;
    const int32_t w  = st->cfg.window;
    double *      s  = st->row_sum;
    for (int32_t k = 0; k < w; ++k) {
        memset(s, 0, nc * sizeof(double));
        for (int32_t j = k; j < w; ++j) {
            const float * row = st->ub_row_acc + (size_t) j * nc;
            for (size_t c = 0; c < nc; ++c) {
                s[c] += (double) row[c];
            }
        }
        float * out = st->grp_sfx + (size_t) k * nc;
        for (size_t c = 0; c < nc; ++c) {
            out[c] = (float) s[c];
        }
    }
}

void pme_ring_group_new(pme_state * st) {
    const size_t nc = (size_t) st->cfg.n_cells;
    st->grp_head    = st->ring_head;
    st->grp_out     = 0;
    memset(st->grp_valid, 1, nc);
    if (st->ub_grp_dev) {
        st->grp_on      = PME_GRP_DEV; /* pme_dev_collect put S_0 in grp_sfx row 0 and set grp_n_kv */
        st->grp_fetched = 0;
    } else {
        suffix_sums(st);
        st->grp_on      = PME_GRP_HOST;
        st->grp_fetched = -1;
        st->grp_n_kv    = st->cfg.n_cells;
    }
}

const float * pme_ring_group_row(pme_state * st) {
    if (st->grp_on == PME_GRP_NONE) {
        return NULL;
    }
    const int32_t k = st->grp_out;
    if (st->grp_on == PME_GRP_DEV && st->grp_fetched != k && pme_devring_read(st, k, k + 1) != 0) {
        return NULL; /* the error is set on st */
    }
    return st->grp_sfx + (size_t) k * (size_t) st->cfg.n_cells;
}

int pme_ring_group_fetch_all(pme_state * st) {
    if (st->grp_on != PME_GRP_DEV) {
        return 0;
    }
    if (pme_devring_read(st, st->grp_out, st->cfg.window) != 0) {
        return -1;
    }
    st->grp_on      = PME_GRP_HOST; /* every sum still in use is on the host now */
    st->grp_fetched = -1;
    return 0;
}
