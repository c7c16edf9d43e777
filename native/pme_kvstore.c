/* Evicted tokens' K/V rows kept on the host (opt-in: EngineConfig(recall_kv_bytes)), and written back into cells
 * llama.cpp allocates itself, so that recall restores a block's text instead of recomputing it (docs/recall.md,
 * "Restoring instead of recomputing"). Host buffers and one KV cache only (not iSWA): elsewhere nothing is saved and
 * recall recomputes as before.
 *
 * Saving: pme_evict calls pme_kvstore_save for each victim cell before it frees it; the rows come from the cache
 * tensors as the graph's SET_ROWS nodes showed them (their data pointer and strides; host buffers only). A ring of
 * slots, the oldest overwritten, each tagged with the token's logical position and the position its K was rotated
 * for.
 * Restoring: the caller arms the slots for a run of logical positions (pme_kvstore_arm, which also returns their
 * positions), then decodes the run's tokens as a PME_UB_RESTORE ubatch on an empty second sequence at those
 * positions: the callback asks for layer 0's K write, writes every layer's saved rows into the cells that node
 * names, and stops the graph. The caller then moves the run with llama_memory_seq_add (llama.cpp re-rotates K),
 * gives it to sequence 0 (seq_cp, seq_rm) and places the cells in the map (pme_kvstore_place). */
#include "ggml-backend.h"
#include "pme_internal.h"

#include <stdlib.h>
#include <string.h>

/* where one layer's caches are and how a cell's rows lie in them, as its SET_ROWS nodes showed them */
struct kv_layer {
    char * k_data; /* the K cache's first byte (host), NULL until seen */
    char * v_data;
    size_t k_nb1;  /* bytes from one cell's K row to the next */
    size_t k_row;  /* bytes of one cell's K row */
    size_t v_nb1;  /* V not transposed: bytes between cells' rows */
    size_t v_row;  /* V: bytes of one cell's values (n_embd_v elements) */
    size_t v_el;   /* V transposed: bytes of one element (cells are v_el apart, dims n_cells * v_el) */
};

struct pme_kvstore {
    struct kv_layer * layer; /* (n_layer) */
    int               v_trans;
    size_t            budget, tok_bytes;
    int32_t           cap, n, next;
    char *            buf;
    int64_t *         lpos;
    int32_t *         pos;
    int32_t *         armed; /* (max_ubatch) slot per token of the armed restore ubatch */
    int32_t           n_armed;
};

int pme_kvstore_enable(pme_state * st, int64_t bytes) {
    if (!st || bytes < 0) {
        return -1;
    }
    if (st->kvs) {
        free(st->kvs->layer);
        free(st->kvs->buf);
        free(st->kvs->lpos);
        free(st->kvs->pos);
        free(st->kvs->armed);
        free(st->kvs);
        st->kvs = NULL;
    }
    if (bytes == 0) {
        return 0;
    }
    struct pme_kvstore * s = calloc(1, sizeof *s);
    if (!s || !(s->layer = calloc((size_t) st->cfg.n_layer, sizeof *s->layer)) ||
        !(s->armed = malloc((size_t) st->cfg.max_ubatch * sizeof(int32_t)))) {
        free(s ? s->layer : NULL);
        free(s);
        pme_set_error(st, "out of memory for the KV store");
        return -1;
    }
    s->budget = (size_t) bytes;
    st->kvs   = s;
    return 0;
}

/* a SET_ROWS node into layer il's K or V cache (ask phase): remember where that cache is and how it is laid out */
void pme_kvstore_note(pme_state * st, const struct ggml_tensor * t) {
    struct pme_kvstore * s = st->kvs;
    if (!s || !t->data || !t->buffer || !ggml_backend_buffer_is_host(t->buffer)) {
        return;
    }
    int il = pme_parse_layer(t->name, "cache_k_l");
    if (il >= 0 && il < st->cfg.n_layer && t->ne[1] == st->cfg.n_cells) {
        struct kv_layer * l = &s->layer[il];
        l->k_data           = t->data;
        l->k_nb1            = t->nb[1];
        l->k_row            = ggml_row_size(t->type, t->ne[0]);
        return;
    }
    il = pme_parse_layer(t->name, "cache_v_l");
    if (il < 0 || il >= st->cfg.n_layer) {
        return;
    }
    struct kv_layer * l = &s->layer[il];
    l->v_data           = t->data;
    if (t->ne[0] == 1) { /* transposed V (flash attention off): one element per row, dims n_cells apart */
        s->v_trans = 1;
        l->v_el    = ggml_type_size(t->type);
        l->v_row   = (size_t) (t->ne[1] / st->cfg.n_cells) * l->v_el;
        l->v_nb1   = 0;
    } else if (t->ne[1] == st->cfg.n_cells) {
        l->v_nb1 = t->nb[1];
        l->v_row = ggml_row_size(t->type, t->ne[0]);
    }
}

static int layout_known(pme_state * st) {
    struct pme_kvstore * s = st->kvs;
    if (s->buf) {
        return 1;
    }
    size_t tok = 0;
    for (int32_t il = 0; il < st->cfg.n_layer; ++il) {
        if (!s->layer[il].k_data || !s->layer[il].v_data || !s->layer[il].v_row) {
            return 0; /* a layer not seen yet (or off the host): nothing is saved */
        }
        tok += s->layer[il].k_row + s->layer[il].v_row;
    }
    s->tok_bytes = tok;
    s->cap       = (int32_t) (s->budget / tok < INT32_MAX ? s->budget / tok : INT32_MAX);
    if (s->cap < 1) {
        return 0;
    }
    s->buf  = malloc((size_t) s->cap * tok);
    s->lpos = malloc((size_t) s->cap * sizeof(int64_t));
    s->pos  = malloc((size_t) s->cap * sizeof(int32_t));
    if (!s->buf || !s->lpos || !s->pos) {
        free(s->buf);
        free(s->lpos);
        free(s->pos);
        s->buf = NULL;
        pme_set_error(st, "out of memory for a %d-token KV store", s->cap);
        return 0;
    }
    return 1;
}

/* copy cell's rows (every layer) to or from one token's bytes */
static void move_rows(const struct pme_kvstore * s,
                      int32_t                    n_layer,
                      int32_t                    n_cells,
                      int32_t                    cell,
                      char *                     tok,
                      int                        to_store) {
    for (int32_t il = 0; il < n_layer; ++il) {
        const struct kv_layer * l = &s->layer[il];
        char *                  k = l->k_data + (size_t) cell * l->k_nb1;
        to_store ? memcpy(tok, k, l->k_row) : memcpy(k, tok, l->k_row);
        tok += l->k_row;
        if (s->v_trans) {
            for (size_t d = 0; d < l->v_row / l->v_el; ++d) {
                char * v = l->v_data + (d * (size_t) n_cells + (size_t) cell) * l->v_el;
                to_store ? memcpy(tok + d * l->v_el, v, l->v_el) : memcpy(v, tok + d * l->v_el, l->v_el);
            }
        } else {
            char * v = l->v_data + (size_t) cell * l->v_nb1;
            to_store ? memcpy(tok, v, l->v_row) : memcpy(v, tok, l->v_row);
        }
        tok += l->v_row;
    }
}

void pme_kvstore_save(pme_state * st, int32_t cell) {
    struct pme_kvstore * s = st->kvs;
    if (!s || st->n_groups > 1 || !layout_known(st)) {
        return;
    }
    const int32_t slot = s->next;
    move_rows(s, st->cfg.n_layer, st->cfg.n_cells, cell, s->buf + (size_t) slot * s->tok_bytes, 1);
    s->lpos[slot] = st->cell_lpos[cell];
    s->pos[slot]  = st->cell_pos[cell];
    s->next       = (s->next + 1) % s->cap;
    s->n          = s->n < s->cap ? s->n + 1 : s->cap;
}

/* save the rows of the live cells holding these logical positions too (a recalled sentence is often half kept:
 * the block restores all of it, as recomputing it would); returns how many were live */
int32_t pme_kvstore_save_live(pme_state * st, const int64_t * lpos, int32_t n) {
    if (!st || !st->kvs || n < 0 || (n > 0 && !lpos)) {
        return -1;
    }
    int32_t found = 0;
    for (int32_t c = 0; c < st->cfg.n_cells; ++c) {
        if (st->cell_pos[c] < 0) {
            continue;
        }
        for (int32_t i = 0; i < n; ++i) {
            if (st->cell_lpos[c] == lpos[i]) {
                pme_kvstore_save(st, c);
                ++found;
                break;
            }
        }
    }
    return found;
}

int32_t pme_kvstore_arm(pme_state * st, const int64_t * lpos, int32_t n, int32_t * pos_out) {
    struct pme_kvstore * s = st ? st->kvs : NULL;
    if (!s || n < 0 || n > st->cfg.max_ubatch || (n > 0 && (!lpos || !pos_out))) {
        return -1;
    }
    s->n_armed = 0;
    for (int32_t i = 0; i < n; ++i) {
        int32_t slot = -1;
        for (int32_t j = 0; j < s->n && slot < 0; ++j) {
            const int32_t k = (s->next - 1 - j + s->cap) % s->cap; /* newest first: a token evicted twice */
            slot            = s->lpos[k] == lpos[i] ? k : -1;
        }
        if (slot < 0) {
            return i; /* not all saved: the caller recomputes */
        }
        s->armed[i] = slot;
        pos_out[i]  = s->pos[slot];
    }
    s->n_armed = n;
    return n;
}

/* the restore ubatch's layer 0 K write just ran: put every layer's saved rows into the cells it named */
void pme_kvstore_write(pme_state * st) {
    struct pme_kvstore * s = st->kvs;
    if (!s || s->n_armed != st->ub_n) {
        pme_set_error(st, "restore ubatch of %d tokens, %d armed", st->ub_n, s ? s->n_armed : 0);
        return;
    }
    for (int32_t i = 0; i < st->ub_n; ++i) {
        move_rows(s, st->cfg.n_layer, st->cfg.n_cells, st->ub_cell[i], s->buf + (size_t) s->armed[i] * s->tok_bytes, 0);
    }
    s->n_armed = 0;
}

int pme_kvstore_place(pme_state * st, int32_t pos0, const int64_t * lpos, int32_t n) {
    if (!st || st->failed || n < 0 || (n > 0 && !lpos) || n > st->cfg.max_ubatch) {
        return -1;
    }
    for (int32_t i = 0; i < n; ++i) {
        const int32_t c = st->ub_cell[i];
        if (c < 0 || st->cell_pos[c] < 0) {
            pme_set_error(st, "pme_kvstore_place: token %d of the restore has no live cell", i);
            return -1;
        }
        st->cell_pos[c]  = pos0 + i;
        st->cell_lpos[c] = lpos[i];
    }
    return 0;
}

int64_t pme_kvstore_bytes(const pme_state * st) {
    return st && st->kvs && st->kvs->buf ? (int64_t) st->kvs->n * (int64_t) st->kvs->tok_bytes : 0;
}
