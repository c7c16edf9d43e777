/* A host copy of each scored layer's K cache, for a cache that is not in host memory (a GPU's, or RPC's).
 *
 * With flash attention on, the scorer recomputes attention from the node's Q and K view (pme_fattn.c). Copying
 * the whole K view every ubatch costs n_kv x n_embd_k_gqa per layer (18 MB a decoded token on SmolLM2 at 1536
 * cells). But a cell's K row changes only when a token is written to it, and this ubatch's writes are known
 * (ub_cell, from the SET_ROWS indices): so the mirror is copied whole once, then only the rows this ubatch
 * wrote are fetched. It is refreshed whole after anything that rewrites K in place: a position compaction (K is
 * re-rotated by llama.cpp's K-shift), a restored session, a reset. Rows of cells the mirror missed (a query
 * probe's, removed right after) are stale but finite, and such cells are masked until rewritten. */
#include "ggml-backend.h"
#include "ggml.h"
#include "pme_internal.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void pme_kmirror_invalidate(pme_state * st) {
    if (st->km_valid) {
        memset(st->km_valid, 0, (size_t) st->cfg.n_layer);
    }
}

void pme_kmirror_free(pme_state * st) {
    if (st->km) {
        for (int32_t il = 0; il < st->cfg.n_layer; ++il) {
            free(st->km[il]);
        }
    }
    free(st->km);
    free(st->km_nb1);
    free(st->km_valid);
    free(st->km_serial);
    st->km        = NULL;
    st->km_nb1    = NULL;
    st->km_valid  = NULL;
    st->km_serial = NULL;
}

/* The KQ mask's first n_tokens rows in host memory. Layers of one cache share one mask input, so it is copied
 * once per ubatch, and without the padding rows past n_tokens that nothing reads. */
const char * pme_mask_rows(pme_state * st, const struct ggml_tensor * mask, int64_t n_tokens) {
    if (!pme_needs_copy(st, mask)) {
        return mask->data;
    }
    if (mask->ne[2] != 1 || mask->ne[3] != 1 || n_tokens > mask->ne[1]) {
        return pme_host_or_copy(st, mask, 2); /* a per-head mask: whole */
    }
    if (st->mask_of == mask && st->mask_serial == st->ub_serial) {
        return st->dev_copy[2];
    }
    const char * rows = pme_copy_prefix(st, mask, 2, (size_t) n_tokens * mask->nb[1]);
    if (rows) {
        st->mask_of     = mask;
        st->mask_serial = st->ub_serial;
    }
    return rows;
}

/* k: a layer's K view (d, n_kv, n_head_kv), cells n_kv apart by nb1. Returns its rows in host memory. */
const char * pme_k_rows(pme_state * st, const struct ggml_tensor * k, int32_t layer) {
    if (!pme_needs_copy(st, k)) {
        return k->data;
    }
    const int64_t n_kv = k->ne[1];
    const size_t  nb1 = k->nb[1], used = (size_t) k->ne[2] * k->nb[2];
    /* the mirror needs a cell's heads inside its row; any other layout is copied whole */
    if (layer < 0 || layer >= st->cfg.n_layer || k->ne[3] != 1 || used > nb1 || n_kv > st->cfg.n_cells ||
        ggml_nbytes(k) < (size_t) (n_kv - 1) * nb1 + used) {
        return pme_host_or_copy(st, k, 1);
    }
    if (!st->km) {
        st->km        = calloc((size_t) st->cfg.n_layer, sizeof *st->km);
        st->km_nb1    = calloc((size_t) st->cfg.n_layer, sizeof *st->km_nb1);
        st->km_valid  = calloc((size_t) st->cfg.n_layer, 1);
        st->km_serial = calloc((size_t) st->cfg.n_layer, sizeof *st->km_serial);
        if (!st->km || !st->km_nb1 || !st->km_valid || !st->km_serial) {
            pme_set_error(st, "out of memory for the K mirror");
            return NULL;
        }
    }
    if (!st->km[layer] || st->km_nb1[layer] != nb1) {
        free(st->km[layer]);
        /* zeroed: a cell never written holds finite keys, so a masked cell's logit stays -inf, never NaN */
        st->km[layer]       = calloc((size_t) st->cfg.n_cells, nb1);
        st->km_nb1[layer]   = nb1;
        st->km_valid[layer] = 0;
        if (!st->km[layer]) {
            pme_set_error(st, "out of memory for layer %d's K mirror (%zu bytes)", layer,
                          (size_t) st->cfg.n_cells * nb1);
            return NULL;
        }
    }
    char *    m    = st->km[layer];
    const int kind = pme_ub_kind(st);
    if (!st->km_valid[layer]) {
        const size_t n = (size_t) (n_kv - 1) * nb1 + used;
        ggml_backend_tensor_get(k, m, 0, n);
        st->d2h_bytes[kind] += (int64_t) n;
        st->km_valid[layer]  = 1;
        st->km_serial[layer] = st->ub_serial;
        return m;
    }
    if (st->km_serial[layer] == st->ub_serial) {
        return m; /* this ubatch's rows are in already (the key log and the scorer both read this layer) */
    }
    st->km_serial[layer] = st->ub_serial;
    /* every read is a round trip on RPC (and a synchronisation on a GPU): a ubatch's cells are usually one
     * contiguous slot, fetched in one read; scattered cells one at a time */
    int32_t lo = INT32_MAX, hi = -1, n_in = 0;
    for (int32_t i = 0; i < st->ub_n; ++i) {
        const int32_t c = st->ub_cell[i];
        if (c >= 0 && c < n_kv) {
            lo = c < lo ? c : lo;
            hi = c > hi ? c : hi;
            n_in++;
        }
    }
    if (n_in == 0) {
        return m;
    }
    if (hi - lo + 1 <= 2 * n_in) {
        const size_t off = (size_t) lo * nb1, n = (size_t) (hi - lo) * nb1 + used;
        ggml_backend_tensor_get(k, m + off, off, n);
        st->d2h_bytes[kind] += (int64_t) n;
        return m;
    }
    for (int32_t i = 0; i < st->ub_n; ++i) {
        const int32_t c = st->ub_cell[i];
        if (c >= 0 && c < n_kv) {
            ggml_backend_tensor_get(k, m + (size_t) c * nb1, (size_t) c * nb1, used);
            st->d2h_bytes[kind] += (int64_t) used;
        }
    }
    return m;
}
