/* llama.cpp graph eval callback: learns cell -> position from the SET_ROWS nodes that write K,
 * and reads each scored layer's kq_soft_max after it is computed, or with flash attention on, recomputes
 * the attention rows from the FLASH_ATTN_EXT node's sources (pme_fattn.c).
 *
 * Only the attention nodes of the scored cache answer true at ask-time: every true splits the graph
 * and costs a synchronisation, so everything else is read from inputs, which are set before compute. */
#include "ggml-backend.h"
#include "ggml.h"
#include "pme_internal.h"

#include <stdlib.h>
#include <string.h>

/* "<prefix><digits>[ suffix]" -> layer index, or -1 */
int pme_parse_layer(const char * name, const char * prefix) {
    const size_t n = strlen(prefix);
    if (strncmp(name, prefix, n) != 0) {
        return -1;
    }
    const char * p = name + n;
    if (*p < '0' || *p > '9') {
        return -1;
    }
    int il = 0;
    while (*p >= '0' && *p <= '9') {
        il = il * 10 + (*p++ - '0');
    }
    return (*p == 0 || *p == ' ') ? il : -1;
}

const void * pme_host_or_copy(pme_state * st, const struct ggml_tensor * t, int slot) {
    return pme_needs_copy(st, t) ? pme_copy_prefix(st, t, slot, ggml_nbytes(t)) : t->data;
}

const void * pme_copy_prefix(pme_state * st, const struct ggml_tensor * t, int slot, size_t nbytes) {
    /* GPU backends: copy the tensor out through the backend API, one buffer per slot so that several
     * sources of one node can be held at once */
    if (nbytes > st->dev_copy_cap[slot]) {
        void * p = realloc(st->dev_copy[slot], nbytes);
        if (!p) {
            pme_set_error(st, "out of memory copying %s (%zu bytes)", t->name, nbytes);
            return NULL;
        }
        st->dev_copy[slot]     = p;
        st->dev_copy_cap[slot] = nbytes;
    }
    ggml_backend_tensor_get(t, st->dev_copy[slot], 0, nbytes);
    st->d2h_bytes[pme_ub_kind(st)] += (int64_t) nbytes;
    return st->dev_copy[slot];
}

static void on_set_rows(pme_state * st, const struct ggml_tensor * t) {
    const int il = pme_parse_layer(t->name, "cache_k_l");
    if (il < 0) {
        return; /* V writes carry the same indices */
    }
    if (il >= st->cfg.n_layer) {
        pme_set_error(st, "layer %d >= n_layer %d in %s", il, st->cfg.n_layer, t->name);
        return;
    }
    const struct ggml_tensor * idx = t->src[1];
    if (!idx || idx->type != GGML_TYPE_I64) {
        pme_set_error(st, "%s: src[1] is not an I64 index tensor", t->name);
        return;
    }

    int g = -1;
    for (int i = 0; i < st->n_groups; ++i) {
        if (st->group_idx_tensor[i] == idx) {
            g = i;
        }
    }
    if (g < 0) {
        if (st->n_groups == PME_MAX_GROUPS) {
            pme_set_error(st, "more than %d KV caches in one graph", PME_MAX_GROUPS);
            return;
        }
        g                       = st->n_groups++;
        st->group_idx_tensor[g] = idx;
        st->group_mapped[g]     = 0;
        /* the node is a view of the whole cache, so ne[1] = its cells; iSWA models have a smaller
         * sliding-window cache, and the scored one has n_cells cells */
        if (t->ne[1] == st->cfg.n_cells) {
            if (st->main_group >= 0) {
                /* two caches of n_cells cells (an iSWA model whose sliding-window cache came out as large as
                 * the base one): the cell map could follow the wrong one, so refuse rather than guess */
                pme_set_error(st, "two KV caches have %d cells; cannot tell which one the budget bounds",
                              st->cfg.n_cells);
                return;
            }
            st->main_group = g;
        }
    }
    st->layer_group[il] = (int8_t) g;
    if (g != st->main_group || st->group_mapped[g]) {
        return;
    }

    if (idx->ne[0] != st->ub_n) {
        pme_set_error(st, "%s: %lld indices for a %d-token ubatch", t->name, (long long) idx->ne[0], st->ub_n);
        return;
    }
    const int64_t * cells = pme_host_or_copy(st, idx, 0);
    if (!cells) {
        return;
    }
    for (int32_t i = 0; i < st->ub_n; ++i) {
        const int64_t c = cells[i];
        if (c < 0 || c >= st->cfg.n_cells) {
            pme_set_error(st, "cell index %lld outside [0, %d)", (long long) c, st->cfg.n_cells);
            return;
        }
        pme_cell_assign(st, (int32_t) c, st->ub_pos[i]);
        st->ub_cell[i] = (int32_t) c;
    }
    st->group_mapped[g] = 1;
}

/* whether the callback reads layer il's attention node: a layer the policy reads, or one whose keys (or a query
 * probe's queries) the key log keeps */
static bool layer_wanted(const pme_state * st, int il) {
    if (il < 0 || il >= st->cfg.n_layer || st->main_group < 0 || st->layer_group[il] != st->main_group) {
        return false;
    }
    const bool keys = st->kl_d && (!st->kl_layers_set || (st->layer_on[il] & PME_LAYER_KEYS));
    if (st->ub_flags & PME_UB_QUERY) {
        return keys;
    }
    return (st->ops->needs_attention && pme_layer_read(st, il)) || keys;
}

static bool wants_softmax(const pme_state * st, const struct ggml_tensor * t) {
    return layer_wanted(st, pme_parse_layer(t->name, "kq_soft_max-"));
}

/* the layer of a flash attention node: its K source is a view of the cache tensor "cache_k_l<il>", or, where the
 * scheduler ran the node on another backend than the cache's (a GPU build with the layers on the CPU: llama.cpp
 * offloads a large batch's attention), its copy of that view, named "<backend>#cache_k_l<il> (view)#<n>" */
int pme_fattn_layer(const struct ggml_tensor * t) {
    const struct ggml_tensor * k = t->src[1];
    if (!k) {
        return -1;
    }
    /* ggml points a view of a view at the first tensor, so root is never a view itself */
    const struct ggml_tensor * root = k->view_src ? k->view_src : k;
    const char *               hash = strchr(root->name, '#');
    return pme_parse_layer(hash ? hash + 1 : root->name, "cache_k_l");
}

static bool wants_fattn(const pme_state * st, const struct ggml_tensor * t) {
    return layer_wanted(st, pme_fattn_layer(t));
}

static void on_softmax(pme_state * st, const struct ggml_tensor * t) {
    if (t->type != GGML_TYPE_F32 || t->nb[0] != sizeof(float) || t->ne[3] != 1) {
        pme_set_error(st, "%s: unexpected layout (type %d, nb0 %zu, ne3 %lld)", t->name, (int) t->type, t->nb[0],
                      (long long) t->ne[3]);
        return;
    }
    const float * attn = pme_host_or_copy(st, t, 0);
    if (!attn) {
        return;
    }
    st->cur_layer = pme_parse_layer(t->name, "kq_soft_max-"); /* wants_softmax checked it is in range */
    if (st->fa_check && pme_check_softmax(st, t, attn) != 0) {
        return;
    }
    pme_fold_softmax(st, attn, t->ne[0], t->ne[1], t->ne[2], t->nb[1], t->nb[2]);
}

static bool pme_eval_cb(struct ggml_tensor * t, bool ask, void * user_data) {
    pme_state * st = user_data;
    if (ask) {
        if (!st || st->failed || st->ub_n == 0) {
            return false;
        }
        if (t->op == GGML_OP_SET_ROWS) {
            on_set_rows(st, t);
            pme_kvstore_note(st, t);
            /* a restore ubatch: compute up to the first base-cache layer's K write, then write the saved rows and
             * stop */
            return (st->ub_flags & PME_UB_RESTORE) && pme_kvstore_stops_at(st, t);
        }
        if (st->ub_flags & PME_UB_RESTORE) {
            return false;
        }
        const bool want = (t->op == GGML_OP_SOFT_MAX && wants_softmax(st, t)) ||
                          (t->op == GGML_OP_FLASH_ATTN_EXT && wants_fattn(st, t));
        st->syncs[pme_ub_kind(st)] += want; /* the scheduler computes up to this node, then synchronises */
        return want;
    }
    if (st && !st->failed && st->ub_n > 0 && (st->ub_flags & PME_UB_RESTORE)) {
        pme_kvstore_write(st);
        return false; /* nothing else of this graph is needed */
    }
    if (st && !st->failed && st->ub_n > 0) {
        const int il = t->op == GGML_OP_FLASH_ATTN_EXT ? pme_fattn_layer(t) : pme_parse_layer(t->name, "kq_soft_max-");
        /* a key log query probe, a policy that reads no attention, or a layer it does not read: the key log
         * asked for the node */
        if ((st->ub_flags & PME_UB_QUERY) || !st->ops->needs_attention || !pme_layer_read(st, il)) {
            pme_keylog_capture(st, t, il);
            return true;
        }
        const int fa  = t->op == GGML_OP_FLASH_ATTN_EXT;
        st->cur_layer = il; /* wants_softmax / wants_fattn checked it is in range */
        /* where the attention is not in host memory, reduce it there (and stage the key log's rows with it,
         * pme_devkeys.c); the host path otherwise */
        const int dev = pme_dev_wants(st, fa ? t->src[1] : t) ? pme_dev_fold(st, t, il) : 1;
        if (!(st->kl_seen[il] & 4)) { /* not staged on the device with the scores */
            pme_keylog_capture(st, t, il);
        }
        if (dev <= 0) {
            return true;
        }
        if (fa) {
            pme_fold_fattn(st, t, il);
        } else {
            on_softmax(st, t);
        }
    }
    /* never abort the graph: errors surface after llama_decode returns, through pme_end_ubatch */
    return true;
}

void * pme_eval_callback_ptr(void) {
    return (void *) &pme_eval_cb;
}
