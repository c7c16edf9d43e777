/* Evicted tokens' K/V rows kept on the host (opt-in: EngineConfig(recall_kv_bytes)), and written back into cells
 * llama.cpp allocates itself, so that recall restores a block's text instead of recomputing it (docs/recall.md,
 * "Restoring instead of recomputing"). Host buffers only: elsewhere nothing is saved and recall recomputes as before.
 *
 * Sliding-window (iSWA) models have a second cache for their sliding-window layers, which llama.cpp empties of a
 * token itself once it leaves the window, long before the policy evicts it from the base cache. So the
 * sliding-window layers' rows of every token are copied into a second ring when its ubatch ends
 * (pme_kvstore_capture), and a restore writes both: the base cache's rows saved at eviction, and these.
 *
 * Saving: pme_evict calls pme_kvstore_save for each victim cell before it frees it; the rows come from the cache
 * tensors as the graph's SET_ROWS nodes showed them (their data pointer and strides; host buffers only). A ring of
 * slots, the oldest overwritten, each tagged with the token's logical position and the position its K was rotated
 * for.
 * Restoring: the caller arms the slots for a run of logical positions (pme_kvstore_arm, which also returns their
 * positions), then decodes the run's tokens as a PME_UB_RESTORE ubatch on an empty second sequence at those
 * positions: the callback asks for the first base-cache layer's K write (layer 0, or Gemma 3's layer 5: the
 * sliding-window layers before it are computed and then overwritten), writes every layer's saved rows into the
 * cells llama.cpp allocated in each cache, and stops the graph. Where pme_kvstore_rotates, the ubatch is decoded at
 * the run's new positions and each K row is turned by the difference as it is written (pme_kvrotate.c); elsewhere the
 * caller moves the run with llama_memory_seq_add (llama.cpp re-rotates every cell's K at the next decode). It then
 * gives the run to sequence 0 (seq_cp, seq_rm) and places the cells in the map (pme_kvstore_place). */
#include "ggml-backend.h"
#include "pme_internal.h"

#include <stdlib.h>
#include <string.h>

/* where one layer's caches are and how a cell's rows lie in them, as its SET_ROWS nodes showed them */
struct kv_layer {
    char *          k_data;  /* the K cache's first byte (host), NULL until seen */
    char *          v_data;
    int32_t         n_cells; /* cells of the cache this layer writes (the base cache's, or the sliding window's) */
    int             swa;     /* a sliding-window layer: its rows are captured per ubatch, not saved at eviction */
    size_t          k_nb1;   /* bytes from one cell's K row to the next */
    size_t          k_row;   /* bytes of one cell's K row */
    size_t          v_nb1;   /* V not transposed: bytes between cells' rows */
    size_t          v_row;   /* V: bytes of one cell's values (n_embd_v elements) */
    size_t          v_el;    /* V transposed: bytes of one element (cells are v_el apart, dims n_cells * v_el) */
    struct pme_rope rope;    /* its K RoPE, to re-rotate a row restored at another position */
};

/* a ring of tokens' rows, the oldest overwritten, each tagged with the token's logical position and the position
 * its K was rotated for */
struct kv_ring {
    size_t    tok_bytes;
    int32_t   cap, n, next;
    char *    buf;
    int64_t * lpos;
    int32_t * pos;
    int32_t * armed; /* (max_ubatch) slot per token of the armed restore ubatch */
    int64_t   laps;  /* times next wrapped to slot 0 (a clear does not reset it: pme_test_kvstore_rewind) */
};

struct pme_kvstore {
    struct kv_layer * layer; /* (n_layer) */
    int               v_trans, has_swa;
    size_t            budget;
    struct kv_ring    base;       /* base-cache layers, saved at eviction */
    struct kv_ring    swa;        /* sliding-window layers, captured as each ubatch ends */
    int32_t *         swa_cell;   /* (max_ubatch) the sliding-window cell of each token of this ubatch */
    int64_t           swa_serial; /* the ubatch swa_cell belongs to */
    int32_t           n_armed;
};

/* the rows and tags only: armed is allocated once with the store and lives as long as it */
static void ring_free_rows(struct kv_ring * r) {
    free(r->buf);
    free(r->lpos);
    free(r->pos);
    r->buf  = NULL;
    r->lpos = NULL;
    r->pos  = NULL;
    r->cap = r->n = r->next = 0;
}

static void ring_free(struct kv_ring * r) {
    ring_free_rows(r);
    free(r->armed);
    r->armed = NULL;
}

/* newest first: a token evicted twice, or restored and evicted again */
static int32_t ring_find(const struct kv_ring * r, int64_t lpos) {
    for (int32_t j = 0; j < r->n; ++j) {
        const int32_t k = (r->next - 1 - j + r->cap) % r->cap;
        if (r->lpos[k] == lpos) {
            return k;
        }
    }
    return -1;
}

static int32_t ring_push(struct kv_ring * r, int64_t lpos, int32_t pos) {
    const int32_t slot = r->next;
    r->lpos[slot]      = lpos;
    r->pos[slot]       = pos;
    r->next            = (r->next + 1) % r->cap;
    r->n               = r->n < r->cap ? r->n + 1 : r->cap;
    r->laps += r->next == 0;
    return slot;
}

int pme_kvstore_enable(pme_state * st, int64_t bytes) {
    if (!st || bytes < 0) {
        return -1;
    }
    if (st->kvs) {
        free(st->kvs->layer);
        free(st->kvs->swa_cell);
        ring_free(&st->kvs->base);
        ring_free(&st->kvs->swa);
        free(st->kvs);
        st->kvs = NULL;
    }
    if (bytes == 0) {
        return 0;
    }
    struct pme_kvstore * s  = calloc(1, sizeof *s);
    const size_t         ub = (size_t) st->cfg.max_ubatch * sizeof(int32_t);
    if (!s || !(s->layer = calloc((size_t) st->cfg.n_layer, sizeof *s->layer)) || !(s->swa_cell = malloc(ub)) ||
        !(s->base.armed = malloc(ub)) || !(s->swa.armed = malloc(ub))) {
        if (s) {
            free(s->layer);
            free(s->swa_cell);
            free(s->base.armed);
        }
        free(s);
        pme_set_error(st, "out of memory for the KV store");
        return -1;
    }
    s->swa_serial = -1;
    s->budget     = (size_t) bytes;
    st->kvs       = s;
    return 0;
}

/* a SET_ROWS node into layer il's K or V cache (ask phase): remember where that cache is and how it is laid out; a
 * sliding-window layer's K write also says this ubatch's cells there */
void pme_kvstore_note(pme_state * st, const struct ggml_tensor * t) {
    struct pme_kvstore * s = st->kvs;
    if (!s || !t->data || !t->buffer || !ggml_backend_buffer_is_host(t->buffer)) {
        return;
    }
    int il = pme_parse_layer(t->name, "cache_k_l");
    if (il >= 0 && il < st->cfg.n_layer) {
        struct kv_layer * l = &s->layer[il];
        l->k_data           = t->data;
        l->k_nb1            = t->nb[1];
        l->k_row            = ggml_row_size(t->type, t->ne[0]);
        l->n_cells          = (int32_t) t->ne[1];
        l->swa              = t->ne[1] != st->cfg.n_cells; /* the base cache has n_cells (on_set_rows) */
        if (!l->rope.head_dim) {
            pme_rope_note(&l->rope, t);                    /* once: a layer's RoPE does not change between ubatches */
        }
        s->has_swa |= l->swa;
        const struct ggml_tensor * idx = t->src[1];
        if (l->swa && s->swa_serial != st->ub_serial && idx && idx->data && idx->ne[0] == st->ub_n &&
            ggml_backend_buffer_is_host(idx->buffer)) {
            for (int32_t i = 0; i < st->ub_n; ++i) {
                s->swa_cell[i] = (int32_t) ((const int64_t *) idx->data)[i];
            }
            s->swa_serial = st->ub_serial;
        }
        return;
    }
    il = pme_parse_layer(t->name, "cache_v_l");
    if (il < 0 || il >= st->cfg.n_layer || !s->layer[il].n_cells) {
        return; /* V is written after K: a layer whose K was not seen has no cell count yet */
    }
    struct kv_layer * l = &s->layer[il];
    l->v_data           = t->data;
    if (t->ne[0] == 1) { /* transposed V (flash attention off): one element per row, dims n_cells apart */
        s->v_trans = 1;
        l->v_el    = ggml_type_size(t->type);
        l->v_row   = (size_t) (t->ne[1] / l->n_cells) * l->v_el;
        l->v_nb1   = 0;
    } else if (t->ne[1] == l->n_cells) {
        l->v_nb1 = t->nb[1];
        l->v_row = ggml_row_size(t->type, t->ne[0]);
    }
}

static int ring_alloc(pme_state * st, struct kv_ring * r, size_t tok, size_t bytes) {
    r->tok_bytes = tok;
    r->cap       = (int32_t) (bytes / tok < INT32_MAX ? bytes / tok : INT32_MAX);
    if (r->cap < 1) {
        return 0;
    }
    r->buf  = malloc((size_t) r->cap * tok);
    r->lpos = malloc((size_t) r->cap * sizeof(int64_t));
    r->pos  = malloc((size_t) r->cap * sizeof(int32_t));
    if (!r->buf || !r->lpos || !r->pos) {
        pme_set_error(st, "out of memory for a %d-token KV store", r->cap);
        ring_free_rows(r);
        return 0;
    }
    return 1;
}

/* the rings, sized once every layer's caches have been seen: the bound is shared in proportion to a token's bytes in
 * each, so that both hold about as many tokens */
static int layout_known(pme_state * st) {
    struct pme_kvstore * s = st->kvs;
    if (s->base.buf) {
        return 1;
    }
    size_t tok[2] = { 0, 0 };
    for (int32_t il = 0; il < st->cfg.n_layer; ++il) {
        const struct kv_layer * l = &s->layer[il];
        if (!l->k_data || !l->v_data || !l->v_row) {
            return 0; /* a layer not seen yet (or off the host): nothing is saved */
        }
        tok[l->swa] += l->k_row + l->v_row;
    }
    const double share = (double) tok[0] / (double) (tok[0] + tok[1]);
    if (!ring_alloc(st, &s->base, tok[0], (size_t) ((double) s->budget * share))) {
        return 0;
    }
    if (tok[1] && !ring_alloc(st, &s->swa, tok[1], s->budget - (size_t) ((double) s->budget * share))) {
        ring_free_rows(&s->base);
        return 0;
    }
    return 1;
}

/* copy cell's rows (the layers of one cache: swa 0 the base one, 1 the sliding window's) to or from a token's bytes */
static void move_rows(const struct pme_kvstore * s, int32_t n_layer, int swa, int32_t cell, char * tok, int to_store) {
    for (int32_t il = 0; il < n_layer; ++il) {
        const struct kv_layer * l = &s->layer[il];
        if (l->swa != swa) {
            continue;
        }
        const size_t n_cells = (size_t) l->n_cells;
        char *       k       = l->k_data + (size_t) cell * l->k_nb1;
        to_store ? memcpy(tok, k, l->k_row) : memcpy(k, tok, l->k_row);
        tok += l->k_row;
        if (s->v_trans) {
            for (size_t d = 0; d < l->v_row / l->v_el; ++d) {
                char * v = l->v_data + (d * n_cells + (size_t) cell) * l->v_el;
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
    if (!s || !layout_known(st)) {
        return;
    }
    const int32_t slot = ring_push(&s->base, st->cell_lpos[cell], st->cell_pos[cell]);
    move_rows(s, st->cfg.n_layer, 0, cell, s->base.buf + (size_t) slot * s->base.tok_bytes, 1);
}

/* a ubatch ended (not a probe, a query or a restore): its tokens' sliding-window rows into the ring, while they are
 * still in the window. Their logical positions are the base cache's cells' (on_set_rows assigned them). */
void pme_kvstore_capture(pme_state * st) {
    struct pme_kvstore * s = st->kvs;
    if (!s || !s->has_swa || s->swa_serial != st->ub_serial || !layout_known(st) || !s->swa.cap) {
        return;
    }
    for (int32_t i = 0; i < st->ub_n; ++i) {
        const int32_t c    = st->ub_cell[i];
        const int32_t slot = ring_push(&s->swa, st->cell_lpos[c], st->cell_pos[c]);
        move_rows(s, st->cfg.n_layer, 1, s->swa_cell[i], s->swa.buf + (size_t) slot * s->swa.tok_bytes, 1);
    }
}

/* a recalled block took logical positions [lo, lo + n) for a moment (pme_mark_recalled gives it its own): its
 * captured rows must not answer for the tokens that take those positions next, and the rows of the text decoded
 * after it in the same ubatch move down to their own */
void pme_kvstore_untag(pme_state * st, int64_t lo, int32_t n) {
    struct pme_kvstore * s = st->kvs;
    for (int32_t k = 0; s && k < s->swa.n; ++k) {
        if (s->swa.lpos[k] >= lo && s->swa.lpos[k] < lo + n) {
            s->swa.lpos[k] = -1;
        } else if (s->swa.lpos[k] >= lo + n) {
            s->swa.lpos[k] -= n;
        }
    }
}

void pme_kvstore_clear(pme_state * st) {
    if (st->kvs) {
        st->kvs->base.n = st->kvs->base.next = st->kvs->swa.n = st->kvs->swa.next = 0;
        st->kvs->swa_serial                                                       = -1;
    }
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
        const int32_t slot = s->base.cap ? ring_find(&s->base, lpos[i]) : -1;
        if (slot < 0) {
            return i; /* not all saved: the caller recomputes */
        }
        if (s->has_swa) {
            /* the sliding-window rows too, rotated for the same position (a compaction in between moved it) */
            const int32_t w = s->swa.cap ? ring_find(&s->swa, lpos[i]) : -1;
            if (w < 0 || s->swa.pos[w] != s->base.pos[slot]) {
                return i;
            }
            s->swa.armed[i] = w;
        }
        s->base.armed[i] = slot;
        pos_out[i]       = s->base.pos[slot];
    }
    s->n_armed = n;
    return n;
}

/* the restore ubatch's first base-cache K write just ran: put every layer's saved rows into the cells llama.cpp
 * allocated (the base cache's from that node, the sliding window's from the first sliding-window K write) */
void pme_kvstore_write(pme_state * st) {
    struct pme_kvstore * s = st->kvs;
    if (!s || s->n_armed != st->ub_n || (s->has_swa && s->swa_serial != st->ub_serial)) {
        pme_set_error(st, "restore ubatch of %d tokens, %d armed", st->ub_n, s ? s->n_armed : 0);
        return;
    }
    for (int32_t i = 0; i < st->ub_n; ++i) {
        const struct kv_ring * b = &s->base;
        move_rows(s, st->cfg.n_layer, 0, st->ub_cell[i], b->buf + (size_t) b->armed[i] * b->tok_bytes, 0);
        if (s->has_swa) {
            const struct kv_ring * w = &s->swa;
            move_rows(s, st->cfg.n_layer, 1, s->swa_cell[i], w->buf + (size_t) w->armed[i] * w->tok_bytes, 0);
        }
        /* decoded at other positions than it was saved for (pme_kvstore_rotates): its K turned to the new one */
        const int32_t delta = st->cell_pos[st->ub_cell[i]] - b->pos[b->armed[i]];
        for (int32_t il = 0; delta && il < st->cfg.n_layer; ++il) {
            const struct kv_layer * l    = &s->layer[il];
            const int32_t           cell = l->swa ? s->swa_cell[i] : st->ub_cell[i];
            if (pme_rope_rotate(&l->rope, l->k_data + (size_t) cell * l->k_nb1, delta) != 0) {
                pme_set_error(st, "restore: layer %d's K cannot be re-rotated by %d positions", il, delta);
                return;
            }
        }
    }
    s->n_armed = 0;
}

/* ask phase of a restore ubatch: whether this SET_ROWS node is where the graph computes up to and stops */
bool pme_kvstore_stops_at(const pme_state * st, const struct ggml_tensor * t) {
    return pme_parse_layer(t->name, "cache_k_l") >= 0 && t->ne[1] == st->cfg.n_cells;
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

int pme_test_kvstore_mark(const pme_state * st, int64_t * out) {
    const struct pme_kvstore * s = st ? st->kvs : NULL;
    if (!s || !out || s->base.n != s->base.next || s->swa.n != s->swa.next) {
        return -1; /* off, or a ring has wrapped: its oldest slots are no longer in push order from 0 */
    }
    out[0] = s->base.n;
    out[1] = s->base.laps;
    out[2] = s->swa.n;
    out[3] = s->swa.laps;
    return 0;
}

int pme_test_kvstore_rewind(pme_state * st, const int64_t * mark) {
    struct pme_kvstore * s = st ? st->kvs : NULL;
    if (!s || !mark || mark[1] != s->base.laps || mark[3] != s->swa.laps || mark[0] > s->base.cap ||
        mark[2] > s->swa.cap) {
        return -1; /* a ring wrapped since the mark: the marked rows may be overwritten */
    }
    s->base.n = s->base.next = (int32_t) mark[0];
    s->swa.n = s->swa.next = (int32_t) mark[2];
    s->swa_serial          = -1;
    return 0;
}

int pme_kvstore_rotates(const pme_state * st) {
    const struct pme_kvstore * s = st ? st->kvs : NULL;
    if (s && s->has_swa) {
        /* not on iSWA models: on Gemma 3 two single-token runs restored one after the other came out up to 1.35 apart
         * in a logit from llama.cpp's shift (one run of any length: the same floats); not traced (docs/recall.md) */
        return 0;
    }
    for (int32_t il = 0; s && il < st->cfg.n_layer; ++il) {
        if (!s->layer[il].rope.ok) {
            return 0;
        }
    }
    return s != NULL;
}

int64_t pme_kvstore_bytes(const pme_state * st) {
    const struct pme_kvstore * s = st ? st->kvs : NULL;
    return s ? (int64_t) s->base.n * (int64_t) s->base.tok_bytes + (int64_t) s->swa.n * (int64_t) s->swa.tok_bytes : 0;
}
