/* The MorphKV ring group's suffix sums (pme_ring_group.c) made and kept on the device that reduced the rows.
 *
 * A prompt ubatch that fills the whole window folds its W rows into the device accumulators as usual. Instead of
 * reading the W rows (W floats a cell), pme_dev_collect runs one more small graph: the rows normalised as the host
 * normalises them, transposed, and for each k the sum of rows k..W-1 by sum_rows (double, in order, on ggml-cpu:
 * the host's arithmetic), into a persistent (W, n_cells) tensor. Suffix sum 0 is copied next to the chunk's max
 * and read with it. Each later ubatch that writes over the group's rows has its first scoring graph copy the next
 * suffix sum into its accumulators, so it comes over in that ubatch's one read: a decode step reads 2 floats a
 * cell instead of 1 for the W steps after such a chunk, with no extra synchronisation. */
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "pme_dev.h"
#include "pme_internal.h"

#include <string.h>

void pme_devring_free(struct pme_dev * d) {
    if (d->grp_buf) {
        ggml_backend_buffer_free(d->grp_buf);
    }
    if (d->grp_ctx) {
        ggml_free(d->grp_ctx);
    }
    d->grp_buf = NULL;
    d->grp_ctx = NULL;
    d->grp     = NULL;
}

static int grp_alloc(pme_state * st, struct pme_dev * d) {
    if (d->grp) {
        return 0;
    }
    struct ggml_init_params ip = { ggml_tensor_overhead(), NULL, true };
    d->grp_ctx                 = ggml_init(ip);
    if (!d->grp_ctx) {
        return -1;
    }
    d->grp     = ggml_new_tensor_1d(d->grp_ctx, GGML_TYPE_F32, (int64_t) st->cfg.window * (int64_t) st->cfg.n_cells);
    d->grp_buf = ggml_backend_alloc_ctx_tensors_from_buft(d->grp_ctx, ggml_backend_get_default_buffer_type(d->backend));
    if (!d->grp_buf) {
        pme_devring_free(d);
        return -1;
    }
    return 0;
}

int pme_devring_make(pme_state * st, struct pme_dev * d) {
    const int32_t w = st->cfg.window;
    if (d->rows != w) {
        return 1;
    }
    if (d->grp_ok < 0 || grp_alloc(st, d) != 0) {
        d->grp_ok = -1;
        return 1;
    }
    const int64_t           n_kv = d->n_kv, nc = st->cfg.n_cells;
    const size_t            f   = sizeof(float);
    struct ggml_init_params ip  = { d->meta_size, d->meta, true };
    struct ggml_context *   ctx = ggml_init(ip);
    if (!ctx) {
        return 1;
    }
    /* the host's normalisation (pme_ubatch_finish_acc), then rows contiguous per cell */
    const float          inv = 1.0f / (float) (st->ub_layers * st->cfg.n_head_kv);
    struct ggml_tensor * r   = ggml_view_2d(ctx, d->acc, n_kv, w, (size_t) n_kv * f, 0);
    struct ggml_tensor * p   = ggml_cont(ctx, ggml_transpose(ctx, ggml_scale(ctx, r, inv))); /* (w, n_kv) */
    struct ggml_cgraph * gf  = ggml_new_graph_custom(ctx, PME_DEV_MAX_TENSORS, false);
    const int64_t        off = (int64_t) (w + d->has_max + d->has_sum) * n_kv; /* next to what collect reads */
    for (int32_t k = 0; k < w; ++k) {
        struct ggml_tensor * s = ggml_sum_rows(ctx, ggml_view_2d(ctx, p, w - k, n_kv, p->nb[1], (size_t) k * f));
        s                      = ggml_reshape_1d(ctx, s, n_kv);
        ggml_build_forward_expand(gf, ggml_cpy(ctx, s, ggml_view_1d(ctx, d->grp, n_kv, (size_t) (k * nc) * f)));
        if (k == 0) {
            ggml_build_forward_expand(gf, ggml_cpy(ctx, s, ggml_view_1d(ctx, d->acc, n_kv, (size_t) off * f)));
        }
    }
    if (d->grp_ok == 0) {
        d->grp_ok = pme_dev_graph_supported(d, gf) ? 1 : -1;
    }
    if (d->grp_ok < 0) {
        ggml_free(ctx);
        return 1;
    }
    if (!ggml_gallocr_alloc_graph(d->galloc, gf) || ggml_backend_graph_compute(d->backend, gf) != GGML_STATUS_SUCCESS) {
        ggml_free(ctx);
        return 1; /* the rows are still in acc: collect reads them */
    }
    ggml_free(ctx);
    st->grp_n_kv = (int32_t) n_kv;
    return 0;
}

int32_t pme_devring_copy_in(pme_state *           st,
                            struct pme_dev *      d,
                            struct ggml_context * ctx,
                            struct ggml_cgraph *  gf,
                            int64_t               off) {
    const int32_t k = st->grp_out + st->ub_rows;
    if (st->grp_on != PME_GRP_DEV || !d->grp || st->ub_rows >= st->cfg.window || k >= st->cfg.window) {
        return -1;
    }
    const size_t f  = sizeof(float);
    const size_t nc = (size_t) st->cfg.n_cells;
    ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_view_1d(ctx, d->grp, st->grp_n_kv, (size_t) k * nc * f),
                                           ggml_view_1d(ctx, d->acc, st->grp_n_kv, (size_t) off * f)));
    return k;
}

int pme_devring_read(pme_state * st, int32_t k0, int32_t k1) {
    struct pme_dev * d = st->dev;
    if (!d || !d->grp || k0 < 0 || k1 > st->cfg.window || k0 >= k1) {
        pme_set_error(st, "the ring group's sums %d..%d are not on the device", k0, k1);
        return -1;
    }
    const size_t nc = (size_t) st->cfg.n_cells, nk = (size_t) st->grp_n_kv, f = sizeof(float);
    const size_t n   = (size_t) (k1 - k0 - 1) * nc + nk; /* rows k0..k1-1, the last up to the group's cells */
    float *      dst = st->grp_sfx + (size_t) k0 * nc;
    ggml_backend_tensor_get(d->grp, dst, (size_t) k0 * nc * f, n * f);
    for (int32_t k = k0; k < k1; ++k) { /* cells past the group's were not in its attention */
        memset(st->grp_sfx + (size_t) k * nc + nk, 0, (nc - nk) * f);
    }
    if (st->ub_n > 0) { /* a session save's read is not scoring's */
        st->d2h_bytes[pme_ub_kind(st)] += (int64_t) (n * f);
        st->syncs[pme_ub_kind(st)] += 1;
    }
    st->grp_fetched = k1 - 1;
    return 0;
}
