/* The key log's rows, staged on the device (pme_keylog.c reads them on the host otherwise).
 *
 * Recall's key log keeps the keys each ubatch wrote at every scored layer. For a cache outside host memory it read
 * them with one ggml_backend_tensor_get per layer: 30 blocking reads a decoded token on SmolLM2, each a round trip
 * on RPC and a synchronisation on a GPU. Here the reduction graph of each layer also copies this ubatch's K rows
 * into a staging tensor on the device, and pme_dev_collect reads all layers' rows in one go.
 *
 * Staged only when the ubatch's cells are one contiguous run in token order (llama.cpp's usual slot), so that a
 * layer's rows are one byte range of its cache; anything else is read by pme_keylog_capture as before. */
#include "pme_dev.h"

#include <stdlib.h>
#include <string.h>

/* the staging tensor, made at first use with the cache's type and row size; 0 when it exists */
static int staging(pme_state * st, struct pme_dev * d, const struct ggml_tensor * k) {
    if (d->kst) {
        return d->kst->type == k->type && d->kst_nb1 == k->nb[1] && d->kst_nb2 == k->nb[2] ? 0 : -1;
    }
    if (d->kst_failed) {
        return -1;
    }
    const size_t            per_row = k->nb[1] / ggml_type_size(k->type) * (size_t) ggml_blck_size(k->type);
    const size_t            rows    = (size_t) st->cfg.n_layer * (size_t) st->cfg.max_ubatch;
    struct ggml_init_params ip      = { ggml_tensor_overhead(), NULL, true };
    d->kst_ctx                      = ggml_init(ip);
    d->kst_layer                    = malloc((size_t) st->cfg.n_layer * sizeof(int32_t));
    d->kst_host                     = malloc(rows * k->nb[1]);
    if (d->kst_ctx && d->kst_layer && d->kst_host) {
        d->kst = ggml_new_tensor_1d(d->kst_ctx, k->type, (int64_t) (rows * per_row));
        d->kst_buf =
            ggml_backend_alloc_ctx_tensors_from_buft(d->kst_ctx, ggml_backend_get_default_buffer_type(d->backend));
    }
    if (!d->kst_buf) {
        d->kst        = NULL;
        d->kst_failed = 1;
        return -1;
    }
    d->kst_nb1 = k->nb[1];
    d->kst_nb2 = k->nb[2];
    return 0;
}

int pme_devkeys_stage(pme_state *                st,
                      struct pme_dev *           d,
                      struct ggml_context *      ctx,
                      struct ggml_cgraph *       gf,
                      const struct ggml_tensor * node) {
    if (!pme_keylog_wants(st, st->cur_layer) || (st->ub_flags & PME_UB_QUERY)) {
        return 0;
    }
    const struct ggml_tensor * k = NULL;
    if (node->op == GGML_OP_FLASH_ATTN_EXT) {
        k = node->src[1];
    } else if (node->src[0] && node->src[0]->op == GGML_OP_MUL_MAT) {
        k = node->src[0]->src[0];
    }
    if (!k || !k->buffer) {
        return 0;
    }
    /* host memory is read in place by pme_keylog_capture; staged only when a test reduces host tensors too */
    const int host = ggml_backend_buffer_is_host(k->buffer);
    if (host && st->dev_mode != PME_DEV_ALWAYS) {
        return 0;
    }
    const ggml_backend_dev_t kdev = host ? ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU) :
                                           ggml_backend_buft_get_device(ggml_backend_buffer_get_type(k->buffer));
    if (kdev != d->dev || k->ne[0] != st->kl_d || k->ne[2] != st->cfg.n_head_kv || k->ne[3] != 1 ||
        k->nb[1] % ggml_type_size(k->type) != 0 || (size_t) k->ne[2] * k->nb[2] > k->nb[1]) {
        return 0;
    }
    if (k->type != GGML_TYPE_F16 && !ggml_get_type_traits(k->type)->to_float) {
        return 0; /* pme_keylog_capture reports it */
    }
    /* this ubatch's cells: one run c0, c0 + 1, ... in token order */
    const int32_t c0 = st->ub_cell[0];
    for (int32_t i = 0; i < st->ub_n; ++i) {
        if (st->ub_cell[i] != c0 + i) {
            return 0;
        }
    }
    if (c0 < 0 || c0 + st->ub_n > k->ne[1] || staging(st, d, k) != 0 || d->kst_slots >= st->cfg.n_layer) {
        return 0;
    }
    const size_t         per_row = k->nb[1] / ggml_type_size(k->type) * (size_t) ggml_blck_size(k->type);
    const int64_t        n       = (int64_t) (per_row * (size_t) st->ub_n);
    /* the rows as one tensor over the cache's own memory, as the scorer wraps the attention node */
    struct ggml_tensor * src     = ggml_new_tensor_1d(ctx, k->type, n);
    src->data                    = (char *) k->data + (size_t) c0 * k->nb[1];
    src->buffer                  = k->buffer;
    struct ggml_tensor * dst     = ggml_view_1d(ctx, d->kst, n, (size_t) d->kst_slots * (size_t) st->ub_n * k->nb[1]);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, src, dst));
    return 1;
}

int pme_devkeys_collect(pme_state * st, struct pme_dev * d) {
    if (!d->kst || d->kst_slots == 0) {
        return 0;
    }
    const size_t row = d->kst_nb1, n = (size_t) d->kst_slots * (size_t) st->ub_n * row;
    const int    kk = pme_ub_kind(st);
    ggml_backend_tensor_get(d->kst, d->kst_host, 0, n);
    st->d2h_bytes[kk] += (int64_t) n;
    st->syncs[kk] += 1;
    const int64_t dk = st->kl_d, hkv = st->cfg.n_head_kv;
    for (int32_t s = 0; s < d->kst_slots; ++s) {
        const int32_t il  = d->kst_layer[s];
        uint16_t *    out = st->kl_k + (size_t) il * st->cfg.max_ubatch * hkv * dk;
        for (int32_t i = 0; i < st->ub_n; ++i) {
            const char * r = (const char *) d->kst_host + ((size_t) s * st->ub_n + i) * row;
            pme_keylog_store_row(st, out + (size_t) i * hkv * dk, r, d->kst->type, d->kst_nb2);
        }
        st->kl_seen[il] |= 1;
    }
    d->kst_slots = 0;
    return 0;
}
