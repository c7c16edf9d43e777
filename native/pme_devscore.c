/* Scores reduced on the backend that holds the attention (a GPU's memory, an RPC server's), so that the host
 * receives a few floats per cell per ubatch instead of the attention matrix or the K cache.
 *
 * For each scored layer the callback builds a small ggml graph over the node it was handed and runs it on that
 * tensor's own device through the backend API (one code path for CUDA, Metal, Vulkan and RPC):
 *   flash attention off: the kq_soft_max node (n_kv, n_tokens, n_head) as it is;
 *   flash attention on:  softmax(scale * K^T Q + mask) rebuilt from the FLASH_ATTN_EXT node's sources, the way
 *                        llama.cpp's own non-flash path computes it (mul_mat, softcap, soft_max_ext, sinks).
 * The graph sums each GQA group's query heads, applies the prompt's head weights, and adds the result into
 * accumulators that stay on the device for the whole ubatch: the last min(W, n_tokens) rows, and for a prompt
 * chunk the per-cell max and sum over its rows. pme_dev_collect reads them once, after llama_decode.
 *
 * The arithmetic is the host path's (pme_scores.c) in the same order: element-wise adds chained head by head
 * and layer by layer, max by pool_2d, the row sum by sum_rows in double as pme_fold_group does. On a backend
 * running ggml-cpu (RPC) the scores are bit-identical to the CPU run's; on a GPU they differ by rounding only.
 *
 * Not handled here (the caller reads the node through the copy path instead): the max aggregate (ggml has no
 * element-wise max), calibration and check modes, shapes whose ops the backend does not support, layers on a
 * second device, and a device without memory for a graph (from then on). */
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "pme_dev.h"
#include "pme_internal.h"

#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#    include <omp.h>
#endif

static void dev_free(struct pme_dev * d) {
    if (!d) {
        return;
    }
    if (d->galloc) {
        ggml_gallocr_free(d->galloc);
    }
    if (d->acc_buf) {
        ggml_backend_buffer_free(d->acc_buf);
    }
    if (d->kst_buf) {
        ggml_backend_buffer_free(d->kst_buf);
    }
    if (d->kst_ctx) {
        ggml_free(d->kst_ctx);
    }
    pme_devring_free(d);
    if (d->acc_ctx) {
        ggml_free(d->acc_ctx);
    }
    if (d->backend) {
        ggml_backend_free(d->backend);
    }
    free(d->host);
    free(d->meta);
    free(d->kst_layer);
    free(d->kst_host);
    free(d);
}

void pme_dev_free(pme_state * st) {
    dev_free(st->dev);
    st->dev = NULL;
}

/* the device a tensor lives on; host memory (the test mode that reduces host tensors too) is the CPU device */
static ggml_backend_dev_t device_of(const struct ggml_tensor * t) {
    if (t->buffer && !ggml_backend_buffer_is_host(t->buffer)) {
        return ggml_backend_buft_get_device(ggml_backend_buffer_get_type(t->buffer));
    }
    return ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
}

static struct pme_dev * dev_open(pme_state * st, ggml_backend_dev_t device) {
    struct pme_dev * d = calloc(1, sizeof *d);
    if (!d) {
        return NULL;
    }
    const size_t nc = (size_t) st->cfg.n_cells, rows = (size_t) st->cfg.window + 3;
    d->dev     = device;
    d->backend = ggml_backend_dev_init(device, NULL);
    d->meta_size =
        PME_DEV_MAX_TENSORS * ggml_tensor_overhead() + ggml_graph_overhead_custom(PME_DEV_MAX_TENSORS, false);
    d->meta                    = malloc(d->meta_size);
    d->host                    = malloc(nc * rows * sizeof(float));
    struct ggml_init_params ip = { 4 * ggml_tensor_overhead(), NULL, true };
    d->acc_ctx                 = ggml_init(ip);
    if (!d->backend || !d->meta || !d->host || !d->acc_ctx) {
        dev_free(d);
        return NULL;
    }
    if (ggml_backend_dev_type(device) == GGML_BACKEND_DEVICE_TYPE_CPU) {
        /* the CPU backend shares llama.cpp's OpenMP team: the callback runs between its graph splits */
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(device);
        void (*set_threads)(ggml_backend_t, int) =
            (void (*)(ggml_backend_t, int)) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
#ifdef _OPENMP
        const int n_threads = omp_get_max_threads();
#else
        const int n_threads = 1;
#endif
        if (set_threads) {
            set_threads(d->backend, n_threads);
        }
    }
    ggml_backend_buffer_type_t buft = ggml_backend_get_default_buffer_type(d->backend);
    d->acc                          = ggml_new_tensor_1d(d->acc_ctx, GGML_TYPE_F32, (int64_t) (nc * rows));
    d->hw      = ggml_new_tensor_1d(d->acc_ctx, GGML_TYPE_F32, (int64_t) st->cfg.n_layer * st->cfg.n_head_kv);
    d->acc_buf = ggml_backend_alloc_ctx_tensors_from_buft(d->acc_ctx, buft);
    d->galloc  = ggml_gallocr_new(buft);
    if (!d->acc_buf || !d->galloc) {
        dev_free(d);
        return NULL;
    }
    d->acc_serial = -1;
    d->grp_serial = -1;
    return d;
}

int pme_dev_wants(const pme_state * st, const struct ggml_tensor * t) {
    if (st->dev_mode == PME_DEV_NEVER || st->dev_failed || st->fa_check || st->calib_armed ||
        st->cfg.aggregate != PME_AGG_MEAN || !t->buffer) {
        return 0;
    }
    if (st->dev_mode == PME_DEV_ALWAYS) {
        return 1;
    }
    return !st->force_copy && !ggml_backend_buffer_is_host(t->buffer);
}

/* a tensor of ctx standing for t: same type, shape and strides, over t's own memory */
static struct ggml_tensor * wrap(struct ggml_context * ctx, const struct ggml_tensor * t) {
    struct ggml_tensor * w = ggml_new_tensor(ctx, t->type, GGML_MAX_DIMS, t->ne);
    memcpy(w->nb, t->nb, sizeof w->nb);
    w->data   = t->data;
    w->buffer = t->buffer;
    return w;
}

/* softmax(scale * K^T Q + mask) of a flash attention node, as llama.cpp's non-flash path computes it; NULL when
 * its sources have a shape the ops do not take (the caller falls back to the host path). Every condition ggml's
 * op constructors assert is checked here first: an assert would abort the process */
static struct ggml_tensor * fattn_rows(struct ggml_context * ctx, const struct ggml_tensor * node) {
    const struct ggml_tensor *q = node->src[0], *k = node->src[1], *mask = node->src[3], *sinks = node->src[4];
    if (!q || !k || q->type != GGML_TYPE_F32 || q->nb[0] != sizeof(float) || k->ne[0] != q->ne[0] ||
        q->ne[2] % k->ne[2] != 0 || q->ne[3] % k->ne[3] != 0 || k->nb[0] != ggml_type_size(k->type) ||
        k->nb[1] < k->nb[0]) {
        return NULL;
    }
    if (mask && (!(mask->type == GGML_TYPE_F16 || mask->type == GGML_TYPE_F32) || !ggml_is_contiguous(mask) ||
                 mask->ne[0] != k->ne[1] || mask->ne[1] < q->ne[1] || q->ne[2] % mask->ne[2] != 0 ||
                 q->ne[3] % mask->ne[3] != 0)) {
        return NULL;
    }
    if (sinks && (sinks->type != GGML_TYPE_F32 || sinks->ne[0] != q->ne[2])) {
        return NULL;
    }
    float params[3];
    memcpy(params, node->op_params, sizeof params);
    const float          scale = params[0], max_bias = params[1], softcap = params[2];
    struct ggml_tensor * kq = ggml_mul_mat(ctx, wrap(ctx, k), wrap(ctx, q)); /* (n_kv, n_tokens, n_head) */
    ggml_mul_mat_set_prec(kq, GGML_PREC_F32);
    struct ggml_tensor * m = mask ? wrap(ctx, mask) : NULL;
    struct ggml_tensor * a;
    if (softcap != 0.0f) {
        kq = ggml_scale(ctx, kq, scale / softcap);
        kq = ggml_tanh(ctx, kq);
        kq = ggml_scale(ctx, kq, softcap);
        a  = ggml_soft_max_ext(ctx, kq, m, 1.0f, max_bias);
    } else {
        a = ggml_soft_max_ext(ctx, kq, m, scale, max_bias);
    }
    if (sinks) {
        ggml_soft_max_add_sinks(a, wrap(ctx, sinks));
    }
    return a;
}

/* acc (n_kv, n) += src's matching elements, one KV head after another: the host path's fold order */
static struct ggml_tensor * fold_heads(struct ggml_context * ctx,
                                       struct ggml_tensor *  acc,
                                       struct ggml_tensor *  s,
                                       int64_t               n_kv,
                                       int64_t               n,
                                       size_t                offs,
                                       int64_t               hkv) {
    for (int64_t g = 0; g < hkv; ++g) {
        struct ggml_tensor * v = ggml_view_2d(ctx, s, n_kv, n, s->nb[1], offs + (size_t) g * s->nb[2]);
        acc                    = ggml_add_inplace(ctx, acc, v);
    }
    return acc;
}

int pme_dev_graph_supported(struct pme_dev * d, struct ggml_cgraph * gf) {
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        struct ggml_tensor * n = ggml_graph_node(gf, i);
        if (n->op != GGML_OP_VIEW && !ggml_backend_supports_op(d->backend, n)) {
            return 0;
        }
    }
    return 1;
}

/* the node's layer folded on its device: 0, or 1 when this node cannot be (the caller takes the host path),
 * or -1 on an error (set on st) */
int pme_dev_fold(pme_state * st, const struct ggml_tensor * node, int32_t layer) {
    const int                  fa  = node->op == GGML_OP_FLASH_ATTN_EXT;
    const struct ggml_tensor * ref = fa ? node->src[1] : node;
    ggml_backend_dev_t         dv  = device_of(ref);
    if (!dv) {
        return 1;
    }
    if (!st->dev) {
        st->dev = dev_open(st, dv);
        if (!st->dev) {
            st->dev_failed = 1; /* e.g. out of device memory: the host path still works */
            return 1;
        }
    }
    struct pme_dev * d = st->dev;
    if (d->dev != dv) {
        return 1; /* layers on a second device (a split model) are read through the copy path */
    }
    struct ggml_init_params ip  = { d->meta_size, d->meta, true };
    struct ggml_context *   ctx = ggml_init(ip);
    if (!ctx) {
        return 1;
    }
    struct ggml_tensor * a = NULL;
    if (fa) {
        a = fattn_rows(ctx, node);
    } else if (node->type == GGML_TYPE_F32 && node->nb[0] == sizeof(float) && node->ne[3] == 1) {
        a = wrap(ctx, node);
    }
    const int64_t hkv = st->cfg.n_head_kv;
    if (!a || a->ne[2] != st->cfg.n_head || a->ne[1] != st->ub_n || a->ne[0] > st->cfg.n_cells) {
        ggml_free(ctx);
        return 1;
    }
    const int64_t n_kv = a->ne[0], T = a->ne[1], qpk = st->cfg.n_head / hkv;
    const int     prompt = pme_ub_is_prompt(st);
    if (d->acc_serial == st->ub_serial && d->n_kv != n_kv) {
        ggml_free(ctx);
        pme_set_error(st, "layer %d's attention spans %lld cells, an earlier layer's %lld", layer, (long long) n_kv,
                      (long long) d->n_kv);
        return -1;
    }

    /* each GQA group's query heads summed, in head order: (n_kv, T, n_head_kv) */
    struct ggml_tensor * s = ggml_view_3d(ctx, a, n_kv, T, hkv, a->nb[1], (size_t) qpk * a->nb[2], 0);
    for (int64_t j = 1; j < qpk; ++j) {
        s = ggml_add(ctx, s, ggml_view_3d(ctx, a, n_kv, T, hkv, a->nb[1], (size_t) qpk * a->nb[2], j * a->nb[2]));
    }
    if (prompt && st->head_w) {
        s = ggml_mul(
            ctx, s,
            ggml_view_3d(ctx, d->hw, 1, 1, hkv, sizeof(float), sizeof(float), (size_t) layer * hkv * sizeof(float)));
    }
    /* only what the policy reads (pme_policy_ops.reads) is reduced and sent over: a decode step's one row serves
     * as its max and sum too */
    const int reads = st->ops->reads;
    int64_t   rows  = 1; /* a decode step */
    if (T > 1) {
        rows = (st->ub_flags & PME_UB_SUPERSEDED) ? 0 :
               (reads & PME_READS_ROWS)           ? st->ub_rows :
               (reads & PME_READS_LAST_ROW)       ? 1 :
                                                    0;
    }
    const int            has_max = T > 1 && (reads & PME_READS_MAX) != 0;
    const int            has_sum = T > 1 && (reads & PME_READS_SUM) != 0;
    struct ggml_cgraph * gf      = ggml_new_graph_custom(ctx, PME_DEV_MAX_TENSORS, false);
    const size_t         f       = sizeof(float);
    /* the ubatch's first graph also brings the ring group's next suffix sum next to what collect reads */
    const int32_t        grp_k =
        d->acc_serial != st->ub_serial ? pme_devring_copy_in(st, d, ctx, gf, (rows + has_max + has_sum) * n_kv) : -1;
    if (rows > 0) {
        struct ggml_tensor * ar = ggml_view_2d(ctx, d->acc, n_kv, rows, (size_t) n_kv * f, 0);
        ggml_build_forward_expand(gf, fold_heads(ctx, ar, s, n_kv, rows, (size_t) (T - rows) * s->nb[1], hkv));
    }
    if (has_max || has_sum) {
        /* per-cell max and sum over the chunk's rows: rows made contiguous per cell first */
        struct ggml_tensor * p   = ggml_cont(ctx, ggml_transpose(ctx, s)); /* (T, n_kv, n_head_kv) */
        int64_t              off = rows * n_kv;
        /* (1, n_kv, n_head_kv) results seen as (n_kv, 1, n_head_kv) */
        if (has_max) {
            struct ggml_tensor * mx = ggml_pool_2d(ctx, p, GGML_OP_POOL_MAX, (int) T, 1, (int) T, 1, 0.0f, 0.0f);
            struct ggml_tensor * ac = ggml_view_2d(ctx, d->acc, n_kv, 1, (size_t) n_kv * f, (size_t) off * f);
            ggml_build_forward_expand(gf, fold_heads(ctx, ac, ggml_reshape_3d(ctx, mx, n_kv, 1, hkv), n_kv, 1, 0, hkv));
            off += n_kv;
        }
        if (has_sum) {
            struct ggml_tensor * sm = ggml_sum_rows(ctx, p);
            struct ggml_tensor * as = ggml_view_2d(ctx, d->acc, n_kv, 1, (size_t) n_kv * f, (size_t) off * f);
            ggml_build_forward_expand(gf, fold_heads(ctx, as, ggml_reshape_3d(ctx, sm, n_kv, 1, hkv), n_kv, 1, 0, hkv));
        }
    }
    if (d->kst_serial != st->ub_serial) {
        d->kst_serial = st->ub_serial;
        d->kst_slots  = 0;
    }
    const int staged = pme_devkeys_stage(st, d, ctx, gf, node); /* the key log's rows ride along */
    if (ggml_graph_n_nodes(gf) == 0) {
        ggml_free(ctx);                                         /* the policy reads nothing of this ubatch */
        st->ub_layers++;
        return 0;
    }
    const int kind = (fa ? 1 : 0) | (T > 1 ? 2 : 0) | (has_max ? 4 : 0) | (has_sum ? 8 : 0) | (staged ? 16 : 0) |
                     (grp_k >= 0 ? 32 : 0);
    if (!(d->checked & ((uint64_t) 1 << kind))) {
        if (!pme_dev_graph_supported(d, gf)) {
            ggml_free(ctx);
            return 1;
        }
        d->checked |= (uint64_t) 1 << kind;
    }
    if (d->acc_serial != st->ub_serial) {
        /* a new ubatch: its accumulators start at zero, and the prompt's head weights go over with them */
        /* the whole buffer: clear is in every backend's buffer interface, memset_tensor is not (an assert) */
        ggml_backend_buffer_clear(d->acc_buf, 0);
        if (prompt && st->head_w) {
            ggml_backend_tensor_set(d->hw, st->head_w, 0, ggml_nbytes(d->hw));
        }
        d->acc_serial = st->ub_serial;
        d->n_kv       = n_kv;
        d->rows       = (int32_t) rows;
        d->has_max    = has_max;
        d->has_sum    = has_sum;
        d->layers     = 0;
    }
    if (!ggml_gallocr_alloc_graph(d->galloc, gf)) {
        /* no device memory for this graph (a long prompt chunk on a large model): the copy path serves from now
         * on, and layers already folded on the device this ubatch are added in by pme_dev_collect */
        ggml_free(ctx);
        st->dev_failed = 1;
        return 1;
    }
    if (ggml_backend_graph_compute(d->backend, gf) != GGML_STATUS_SUCCESS) {
        ggml_free(ctx);
        pme_set_error(st, "layer %d: the scoring graph failed on %s", layer, ggml_backend_dev_name(d->dev));
        return -1;
    }
    ggml_free(ctx);
    if (grp_k >= 0) {
        d->grp_serial = st->ub_serial;
        d->grp_k      = grp_k;
    }
    if (staged) {
        d->kst_layer[d->kst_slots++] = layer;
        st->kl_seen[layer] |= 4; /* the callback leaves this layer's keys to pme_devkeys_collect */
    }
    d->layers++;
    st->ub_layers++;
    return 0;
}

/* after llama_decode: the device's accumulators added into the host's (which hold zeros, or the layers a second
 * device's copy path folded), in one read */
int pme_dev_collect(pme_state * st) {
    struct pme_dev * d = st->dev;
    if (!d || d->acc_serial != st->ub_serial || d->layers == 0) {
        return 0;
    }
    const int64_t n_kv = d->n_kv, nc = st->cfg.n_cells, rows = d->rows;
    /* a whole-window chunk whose every layer was folded here: its rows stay, as suffix sums (pme_devring.c), and
     * only the first comes over; or the group's next suffix sum, copied in by this ubatch's first graph */
    const int     group =
        rows == st->cfg.window && pme_ring_groups(st) && d->layers == st->ub_layers && pme_devring_make(st, d) == 0;
    const int     copied = !group && d->grp_serial == st->ub_serial && st->grp_on == PME_GRP_DEV;
    const int64_t extra  = (rows + d->has_max + d->has_sum) * n_kv; /* where the suffix sum sits */
    const int64_t lo     = group ? rows * n_kv : 0;
    const int64_t n      = extra + (group ? n_kv : copied ? st->grp_n_kv : 0) - lo;
    const int     kk     = pme_ub_kind(st);
    if (n > 0) {
        ggml_backend_tensor_get(d->acc, d->host + lo, (size_t) lo * sizeof(float), (size_t) n * sizeof(float));
        st->d2h_bytes[kk] += n * (int64_t) sizeof(float);
        st->syncs[kk] += 1;
    }
    if (group || copied) {
        const int64_t k = group ? 0 : d->grp_k, nk = group ? n_kv : st->grp_n_kv;
        float *       g = st->grp_sfx + k * nc;
        memcpy(g, d->host + extra, (size_t) nk * sizeof(float));
        memset(g + nk, 0, (size_t) (nc - nk) * sizeof(float));
        st->ub_grp_dev  = group;
        st->grp_fetched = (int32_t) k;
    }
    /* the last `rows` of the window's ub_rows rows */
    for (int64_t r = 0; !group && r < rows; ++r) {
        float *       dst = st->ub_row_acc + (st->ub_rows - rows + r) * nc;
        const float * src = d->host + r * n_kv;
        for (int64_t c = 0; c < n_kv; ++c) {
            dst[c] += src[c];
        }
    }
    /* one row: its max and its sum are the row itself */
    const float * mx = st->ub_n > 1 ? (d->has_max ? d->host + rows * n_kv : NULL) : d->host;
    const float * sm = st->ub_n > 1 ? (d->has_sum ? d->host + (rows + d->has_max) * n_kv : NULL) : d->host;
    for (int64_t c = 0; mx && c < n_kv; ++c) {
        st->ub_chunk_acc[c] += mx[c];
    }
    for (int64_t c = 0; sm && c < n_kv; ++c) {
        st->ub_sum_acc[c] += sm[c];
    }
    d->layers = 0;
    return pme_devkeys_collect(st, d);
}
