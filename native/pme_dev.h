/* The device side of scoring, shared by pme_devscore.c (scores) and pme_devkeys.c (the key log's rows). */
#ifndef PME_DEV_H
#define PME_DEV_H
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "pme_internal.h"

#define PME_DEV_MAX_TENSORS 4096

struct pme_dev {
    ggml_backend_dev_t    dev;     /* device of the attention tensors */
    ggml_backend_t        backend; /* our own handle on it: ordered after the scheduler's work by its sync */
    ggml_gallocr_t        galloc;  /* intermediates of the per-layer graphs */
    struct ggml_context * acc_ctx;
    ggml_backend_buffer_t acc_buf;
    struct ggml_tensor *  acc; /* (n_cells * (window + 3)) f32: rows, chunk max, sum, a suffix sum, packed by n_kv */
    struct ggml_tensor *  hw;  /* (n_layer * n_head_kv) f32 head weights */
    int64_t               acc_serial; /* ubatch whose accumulators were cleared */
    int64_t               n_kv;       /* cells the accumulators span this ubatch */
    int32_t               rows;       /* rows accumulated this ubatch: the last n of the window's ub_rows */
    int32_t               has_max;    /* and the chunk's per-cell max, sum (prompt ubatches) */
    int32_t               has_sum;
    int32_t               layers;     /* layers folded on the device this ubatch */
    uint64_t              checked;    /* bit k: graph kind k's ops are supported */
    float *               host;       /* (n_cells * (window + 3)) what collect reads */
    void *                meta;
    size_t                meta_size;
    /* the key log's rows of this ubatch, staged per scored layer (pme_devkeys.c) */
    struct ggml_context * kst_ctx;
    ggml_backend_buffer_t kst_buf;
    struct ggml_tensor *  kst;        /* (n_layer * max_ubatch) K rows in the cache's type */
    size_t                kst_nb1;    /* bytes of one cell's row (all KV heads) */
    size_t                kst_nb2;    /* bytes between heads in a row */
    int32_t *             kst_layer;  /* (n_layer) the layer staged in each slot this ubatch */
    int32_t               kst_slots;  /* slots staged this ubatch */
    int64_t               kst_serial; /* the ubatch they belong to */
    int32_t               kst_failed; /* the staging buffer could not be made: the key log reads K itself */
    void *                kst_host;   /* (n_layer * max_ubatch * kst_nb1) what collect reads */
    /* the ring group's suffix sums (pme_devring.c) */
    struct ggml_context * grp_ctx;
    ggml_backend_buffer_t grp_buf;
    struct ggml_tensor *  grp;        /* (window * n_cells) f32: suffix sum k at row k */
    int32_t               grp_ok;     /* 0 unknown, 1 the suffix graph runs here, -1 it does not (rows come over) */
    int64_t               grp_serial; /* the ubatch whose first graph copied suffix sum grp_k into acc */
    int32_t               grp_k;
};

/* whether the device runs every op of gf (views aside) */
int pme_dev_graph_supported(struct pme_dev * d, struct ggml_cgraph * gf);

/* pme_devring.c: add to the ubatch's first graph a copy of the suffix sum its rows will bring into use, at acc
 * offset off (floats); the sum's index, or -1 when none is due */
int32_t pme_devring_copy_in(pme_state *           st,
                            struct pme_dev *      d,
                            struct ggml_context * ctx,
                            struct ggml_cgraph *  gf,
                            int64_t               off);
void    pme_devring_free(struct pme_dev * d);

/* pme_devkeys.c: add to gf a copy of this ubatch's K rows of node's layer into the staging slot `slot`; 1 when
 * added (the caller records the slot once the graph has run), 0 when the key log must read K itself */
int pme_devkeys_stage(pme_state *                st,
                      struct pme_dev *           d,
                      struct ggml_context *      ctx,
                      struct ggml_cgraph *       gf,
                      const struct ggml_tensor * node);
/* after the ubatch: the staged rows into the key log's f16 staging (pme_keylog_keys), in one read */
int pme_devkeys_collect(pme_state * st, struct pme_dev * d);
#endif
