/* Internal state shared by the native translation units. */
#ifndef PME_INTERNAL_H
#define PME_INTERNAL_H
#include "ggml-backend.h"
#include "ggml.h"
#include "pme.h"

#define PME_MAX_GROUPS 4 /* distinct KV caches (k_idxs tensors) per graph: 2 for iSWA */
#define PME_ERR_LEN    256
#define PME_COPY_SLOTS 6
#define PME_KL_QMAX    32 /* query rows a probe keeps (its last ones) */
#define PME_LAYER_READ 1  /* layer_on bits: its attention is read */
#define PME_LAYER_MAIN 2  /* it is a layer of the scored cache */
#define PME_LAYER_KEYS 4  /* the key log keeps its keys (once kl_layers_set) */

enum pme_dev_mode { PME_DEV_AUTO = 0, PME_DEV_ALWAYS = 1, PME_DEV_NEVER = 2 };

/* pos: llama.cpp position (what seq_rm takes); lpos: logical position, never renumbered (pooling) */
typedef struct pme_candidate {
    float   score;
    int32_t pos;
    int64_t lpos;
} pme_candidate;

struct pme_state {
    pme_config cfg;

    /* cell map of the scored cache */
    int32_t *        cell_pos; /* (n_cells) position held by each cell, -1 when free */
    int64_t          n_live;
    int64_t          peak;
    int64_t          evicted;
    int64_t          evict_calls;
    int64_t          ubatches;
    int64_t          compactions;
    /* what the scorer costs a non-host backend, per kind of ubatch ([0] one decoded token, [1] a prompt chunk or
     * any other multi-token ubatch): bytes it copied to the host, and nodes it asked for (each splits the graph
     * and synchronises the backend) */
    int64_t          d2h_bytes[2];
    int64_t          syncs[2];
    int64_t          ub_kind_count[2];
    int32_t          force_copy; /* test hook: read host tensors through ggml_backend_tensor_get too, as for a GPU */
    /* scores reduced on the attention's own backend (pme_devscore.c) */
    struct pme_dev * dev;
    int32_t          dev_mode;   /* PME_DEV_AUTO: for tensors outside host memory; ALWAYS / NEVER: test hooks */
    int32_t          dev_failed; /* no device memory for the accumulators or a graph: the copy path serves */
    /* host mirror of each layer's K cache when it is not in host memory (pme_kmirror.c) */
    char **          km;
    size_t *         km_nb1;
    uint8_t *        km_valid;
    int64_t *        km_serial; /* (n_layer) the ubatch whose rows the mirror last fetched */
    /* the KQ mask of this ubatch, copied once for every layer that reads it (pme_kmirror.c) */
    int64_t          ub_serial; /* ubatches begun, to tell this one's mask from the last one's */
    const struct ggml_tensor * mask_of;
    int64_t                    mask_serial;
    int64_t   lpos_offset; /* logical position - llama.cpp position, for tokens decoded since the last compaction */
    int64_t * cell_lpos;   /* (n_cells) logical position of each live cell: compaction leaves it alone */

    /* pins (pme_pins.c): positions [0, pin_prefix) and [pin_lo, pin_hi) are never evicted */
    int32_t pin_prefix; /* the first tokens (n_keep, a system prompt), on top of cfg.n_sink */
    int32_t pin_lo;     /* a recalled block, until the text it was recalled for is decoded */
    int32_t pin_hi;

    /* layer -> cache group, learned from each graph's SET_ROWS nodes */
    int8_t *     layer_group; /* (n_layer) group index, -1 unknown */
    const void * group_idx_tensor[PME_MAX_GROUPS];
    int32_t      n_groups;
    int32_t      main_group; /* group whose cache has n_cells cells, -1 until seen */
    /* layers read (cfg.score_layers): chosen once, at the end of the first ubatch that showed the groups */
    uint8_t *    layer_on;      /* (n_layer) PME_LAYER_* bits */
    int32_t      layers_chosen;
    int32_t      kl_layers_set; /* the key log named its layers: keys and queries of the others are not staged */
    int16_t *    layer_rank;    /* (n_layer) index among the scored cache's layers (rotate_layers), -1 for others */
    int32_t      n_main;        /* layers of the scored cache */
    uint8_t      group_mapped[PME_MAX_GROUPS]; /* cell map already updated for this ubatch */

    /* current ubatch */
    int32_t * ub_pos;       /* (max_ubatch) positions in ubatch order */
    int32_t   ub_n;
    int32_t * ub_cell;      /* (max_ubatch) cell written for each token of the ubatch (on_set_rows) */
    int32_t   ub_flags;     /* pme_ubatch_flags of the last ubatch */
    int32_t   ub_layers;    /* softmax nodes folded in */
    int32_t   cur_layer;    /* layer of the softmax being folded */
    int32_t   ub_rows;      /* rows kept = min(W, ub_n) */
    float *   ub_row_acc;   /* (W, n_cells) layer/head-aggregated attention of the last rows */
    float *   ub_chunk_acc; /* (n_cells) per-cell max over all rows of the ubatch, aggregated */
    float *   ub_sum_acc;   /* (n_cells) per-cell sum over all rows of the ubatch, aggregated */
    float *   tmp;          /* (n_cells) one (layer, kv head) reduction */
    double *  row_sum;      /* (n_cells) per-cell row sum of one (layer, kv head) */

    /* per-head weights and their calibration (pme_head_weights.c) */
    float *   head_w;       /* (n_layer * n_head_kv) or NULL: uniform */
    int32_t * calib_target; /* (max_ubatch) target position per row of the armed ubatch */
    int32_t * calib_cell;   /* (max_ubatch) cell holding that target, -1 none; found at the first fold */
    int32_t   calib_armed;  /* 1: the next ubatch measures; 2: its cells are resolved */
    int32_t   calib_n;      /* rows in calib_target */
    float *   calib_acc;    /* (n_layer * n_head_kv) summed attention on targets */
    int32_t   calib_rows;   /* rows with a live target */

    /* policy state */
    const struct pme_policy_ops * ops;
    float *                       ring;      /* (W, n_cells) attention rows of the last W decoded tokens (MorphKV) */
    int32_t                       ring_head; /* next row to overwrite */
    int32_t                       ring_count;
    /* the rows of a prompt ubatch that filled the whole ring (sum fusion), kept as suffix sums (pme_ring_group.c):
     * grp_sfx row k = the sum of the group's rows k..W-1, so that where the rows were reduced on a device only the
     * sum in use comes over, and each decode step brings the next one */
    int32_t                       grp_on; /* PME_GRP_NONE, PME_GRP_HOST (every suffix sum in grp_sfx) or PME_GRP_DEV */
    int32_t                       grp_head;    /* ring slot of the group's first (oldest) row */
    int32_t                       grp_out;     /* the group's rows overwritten since: grp_sfx row grp_out is in use */
    int32_t                       grp_fetched; /* PME_GRP_DEV: the row of grp_sfx fetched from the device, -1 none */
    int32_t                       grp_n_kv;    /* cells the group's rows span */
    float *                       grp_sfx;     /* (W, n_cells) */
    uint8_t *                     grp_valid;   /* (n_cells) the cell still holds the token the group's rows measured */
    int32_t ub_grp_dev; /* this ubatch's rows became a group on the device (pme_dev_collect): row 0 in grp_sfx */
    float * pscore;     /* (n_cells) score persisting across ubatches (MorphKV prefill, H2O cumulative) */
    float * score;      /* (n_cells) selection score of the last eviction pass */

    /* victims of one pass */
    pme_candidate * cand;       /* (n_cells) eviction candidates */
    int32_t *       victim_pos; /* (n_cells) */

    /* copy buffers for tensors outside host memory (GPU backends), one per source of a node */
    void * dev_copy[PME_COPY_SLOTS];
    size_t dev_copy_cap[PME_COPY_SLOTS];

    /* flash attention scoring scratch (pme_fattn.c), grown on first use */
    void *  fa_k;    /* (n_kv, d) one KV head's K rows as float */
    size_t  fa_k_cap;
    void *  fa_rows; /* (q_per_kv, n_tokens, n_kv) one group's attention rows */
    size_t  fa_rows_cap;
    void *  fa_mask; /* (n_kv) one mask row as float */
    size_t  fa_mask_cap;
    void *  fa_q;    /* (d) one query row, plus its rounding scratch */
    size_t  fa_q_cap;
    /* check mode (pme_test_fattn_check): output rebuilt from the rows vs flash attention's own */
    int32_t fa_check;
    int32_t fa_check_nodes;
    float   fa_check_err; /* max |output - rebuilt| */
    float   fa_check_mag; /* max |rebuilt| (flash attention), max weight (softmax) */
    float   fa_check_rel; /* softmax: max relative difference over weights above 1e-3 */
    void *  fa_check_v;   /* (n_kv + 1, dv) V rows as float, plus one accumulator row */
    size_t  fa_check_v_cap;

    /* key log (pme_keylog.c): this ubatch's keys and an armed probe's queries, per scored layer */
    int32_t    kl_d;          /* head size of K, 0: the key log is off */
    uint16_t * kl_k;          /* (n_layer, max_ubatch, n_head_kv, d) f16 keys of the last ubatch's tokens */
    float *    kl_q;          /* (n_layer, PME_KL_QMAX, n_head, d) queries of the last probe's last rows */
    int32_t    kl_q_rows;
    uint8_t *  kl_seen;       /* (n_layer) bit 0: keys staged this ubatch, bit 1: queries, bit 2: keys on the device */
    float *    kl_scale;      /* (n_layer) the attention node's scale */
    float      kl_f32[1024];
    struct pme_kvstore * kvs; /* evicted K/V rows (pme_kvstore.c), NULL when off */
    int32_t              failed;
    char                 err[PME_ERR_LEN];
};

/* qsort comparator for int32_t positions, ascending */
static inline int pme_cmp_i32(const void * a, const void * b) {
    const int32_t x = *(const int32_t *) a, y = *(const int32_t *) b;
    return (x > y) - (x < y);
}

/* first index i of sorted[0..n) with sorted[i] >= v (n when none) */
static inline int32_t pme_lower_bound(const int32_t * sorted, int32_t n, int32_t v) {
    int32_t lo = 0, hi = n;
    while (lo < hi) {
        const int32_t mid = lo + (hi - lo) / 2;
        if (sorted[mid] < v) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

struct ggml_tensor;

void pme_kvstore_note(pme_state * st, const struct ggml_tensor * t); /* pme_kvstore.c */
void pme_kvstore_save(pme_state * st, int32_t cell);
void pme_kvstore_write(pme_state * st);
void pme_kvstore_capture(pme_state * st);
void pme_kvstore_untag(pme_state * st, int64_t lo, int32_t n);
void pme_kvstore_clear(pme_state * st);
bool pme_kvstore_stops_at(const pme_state * st, const struct ggml_tensor * t);

/* one layer's K RoPE, read off the graph (pme_kvrotate.c): ok when a restored K row can be re-rotated here */
struct pme_rope {
    int            ok, n_dims, mode, n_ctx_orig;
    float          freq_base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow;
    int64_t        head_dim, n_head;
    const float *  ff; /* the model's rope frequency factors (host), or NULL */
    enum ggml_type k_type;
};

void pme_rope_note(struct pme_rope * r, const struct ggml_tensor * set_rows_k);
int  pme_rope_rotate(const struct pme_rope * r, char * row, int32_t delta); /* K row of one cell, by delta positions */

void         pme_set_error(pme_state * st, const char * fmt, ...);
/* whether the key log keeps layer il's keys (and a probe's queries): it is on, and il is one of its layers */
int          pme_keylog_wants(const pme_state * st, int32_t il);
int          pme_parse_layer(const char * name, const char * prefix); /* "<prefix><digits>[ suffix]" -> il or -1 */
/* the layer of a FLASH_ATTN_EXT node, from its K source: a view of "cache_k_l<il>" or the scheduler's copy of one
 * ("<backend>#cache_k_l<il> (view)#<n>"); -1 when neither */
int          pme_fattn_layer(const struct ggml_tensor * t);
const void * pme_host_or_copy(pme_state * st, const struct ggml_tensor * t, int slot);
/* the first nbytes of t, copied through the backend API into copy slot `slot` (counted as device->host bytes) */
const void * pme_copy_prefix(pme_state * st, const struct ggml_tensor * t, int slot, size_t nbytes);
/* flash attention on: recompute layer's attention rows from the FLASH_ATTN_EXT node t and fold them */
int          pme_fold_fattn(pme_state * st, const struct ggml_tensor * t, int32_t layer);
/* kernels (pme_kdot.c): s[h] = q[h] . k for nq query rows d apart against one K row in its own type; NULL from
 * pick when the type or the CPU has no kernel (the caller converts K with to_float). The softmax row treats
 * -inf as masked and sink (or -inf: none) as an extra logit in the denominator. */
typedef void (*pme_kdot_fn)(const float * q, int64_t nq, const void * k, int64_t d, float * s);
pme_kdot_fn pme_kdot_pick(int type, int64_t d);
/* the same for four K rows nb1 apart: s[j * nq + h] = q[h] . k_j; NULL where there is no such kernel */
typedef void (*pme_kdot4_fn)(const float * q, int64_t nq, const void * k, size_t nb1, int64_t d, float * s);
pme_kdot4_fn pme_kdot4_pick(int type, int64_t d);
/* the same with the query rows quantised in the type ggml-cpu multiplies K in (q8_0 blocks for a q8_0 K), for nc = 1
 * or 4 K rows nb1 apart: s[j * nq + h]; NULL where there is no integer kernel */
typedef void (*pme_kdotq_fn)(const void * q, int64_t nq, const void * k, size_t nb1, int nc, int64_t d, float * s);
pme_kdotq_fn pme_kdotq_pick(int type, int64_t d);
/* n f16 values (a KQ mask row) to float */
void         pme_f16_to_f32(const uint16_t * x, float * y, int64_t n);
void         pme_softmax_row(float * x, int64_t n, float sink);
void         pme_softmax_row_portable(float * x, int64_t n, float sink);
/* check mode with flash attention off: recompute the softmax node t's rows the flash attention way, compare */
int          pme_check_softmax(pme_state * st, const struct ggml_tensor * t, const float * attn);
void         pme_cell_assign(pme_state * st, int32_t cell, int32_t pos);
void         pme_cell_free(pme_state * st, int32_t cell);

/* scores: fold one layer's softmax (n_head, n_tokens, n_kv) into the ubatch accumulators */
int   pme_fold_softmax(pme_state *   st,
                       const float * attn,
                       int64_t       n_kv,
                       int64_t       n_tokens,
                       int64_t       n_head,
                       size_t        nb1,
                       size_t        nb2);
/* the same in parts, for attention computed one KV head's group at a time (pme_fattn.c): begin checks the
 * shape, each group's attn starts at its first query head, and the caller counts the layer in ub_layers */
int   pme_fold_begin(pme_state * st, int64_t n_kv, int64_t n_tokens, int64_t n_head);
void  pme_fold_group(pme_state *   st,
                     const float * attn,
                     int64_t       n_kv,
                     int64_t       n_tokens,
                     int32_t       g,
                     size_t        nb1,
                     size_t        nb2);
void  pme_ubatch_reset_acc(pme_state * st);
/* the prompt's head weight of KV group g at the current layer (1 outside a prompt or without weights) */
float pme_group_weight(const pme_state * st, int32_t g);
/* out[c] = w * the sum over one KV group's query heads of token row t (attn at the group's first head, rows nb1 and
 * heads nb2 bytes apart): the heads added in order, then weighted */
void  pme_group_row(const pme_state * st,
                    const float *     attn,
                    int64_t           n_kv,
                    int64_t           t,
                    size_t            nb1,
                    size_t            nb2,
                    float             w,
                    float *           out);
/* for rows folded one token at a time (pme_fattn.c): row v of the window's r-th row, a group's per-cell max */
void  pme_fold_window_row(pme_state * st, int32_t r, const float * v, int64_t n);
void  pme_fold_chunk_max(pme_state * st, const float * best, int64_t n);
void  pme_ubatch_finish_acc(pme_state * st);
void  pme_calib_resolve(pme_state * st);

/* policy: each pme_policy_<name>.c defines one of these */
/* what a policy reads of a ubatch's accumulators (pme_policy_ops.reads): a backend sends only that over */
enum pme_reads { PME_READS_ROWS = 1, PME_READS_LAST_ROW = 2, PME_READS_MAX = 4, PME_READS_SUM = 8 };

typedef struct pme_policy_ops {
    int needs_attention;             /* 0: no softmax node is read at all */
    int reads;                       /* enum pme_reads: ub_row_acc (all rows or the last), ub_chunk_acc, ub_sum_acc */
    void (*observe)(pme_state * st); /* fold the ubatch accumulators into the policy's state */
    void (*score)(pme_state * st);   /* fill st->score for every cell (higher = keep) */
    int (*evicts_now)(const pme_state * st);
} pme_policy_ops;

extern const pme_policy_ops pme_morphkv_ops, pme_h2o_ops, pme_tova_ops, pme_snapkv_ops, pme_streaming_ops;

const pme_policy_ops * pme_policy_lookup(int32_t kind);
int                    pme_policy_always(const pme_state * st);
void                   pme_policy_observe(pme_state * st);
int                    pme_policy_select(pme_state * st, int32_t next_pos, int32_t * out_pos, int32_t cap);
void                   pme_policy_forget_cell(pme_state * st, int32_t cell);

/* whether the last ubatch was part of a prompt (a chunk or a probe) rather than a decode step */
/* which counters a ubatch's copies and synchronisations go to: 0 for one token, 1 for several */
static inline int pme_ub_kind(const pme_state * st) {
    return st->ub_n > 1 ? 1 : 0;
}

/* rotate_layers 2: a prompt chunk longer than two windows reads the k chosen layers (evenly spaced, with the
 * copying heads' layers among them: engine/layer_choice.py) rather than every layer. A probe, a query and a short
 * ubatch (a chat turn's text) still read every layer: their rows decide what a prompt keeps, and they are cheap */
static inline int pme_chunk_chosen(const pme_state * st) {
    return st->cfg.rotate_layers >= 2 && st->layers_chosen && (st->ub_flags & PME_UB_PREFILL) &&
           !(st->ub_flags & (PME_UB_PROBE | PME_UB_QUERY)) && st->ub_n > 2 * st->cfg.window;
}

/* whether this ubatch reads layer il's attention for the policy (not only for the key log's keys) */
static inline int pme_layer_read(const pme_state * st, int32_t il) {
    if (!st->layers_chosen) {
        return 1;
    }
    if (st->cfg.rotate_layers && st->cfg.score_layers > 0 && st->n_main > st->cfg.score_layers) {
        if (st->ub_n > 1) {
            if (pme_chunk_chosen(st)) {
                return (st->layer_on[il] & PME_LAYER_READ) != 0; /* a long prompt chunk, rotate_layers 2 */
            }
            return st->layer_rank[il] >= 0;                      /* a prompt chunk: every layer */
        }
        const int32_t stride = (st->n_main + st->cfg.score_layers - 1) / st->cfg.score_layers;
        return st->layer_rank[il] >= 0 && st->layer_rank[il] % stride == st->ub_kind_count[0] % stride;
    }
    return (st->layer_on[il] & PME_LAYER_READ) != 0;
}

/* whether t must be read through the backend API (its buffer is not in host memory, or a test forces it) */
static inline int pme_needs_copy(const pme_state * st, const struct ggml_tensor * t) {
    return t->buffer != NULL && (st->force_copy || !ggml_backend_buffer_is_host(t->buffer));
}

static inline int pme_ub_is_prompt(const pme_state * st) {
    return (st->ub_flags & (PME_UB_PREFILL | PME_UB_PROBE)) != 0;
}

void pme_policy_reset(pme_state * st);

/* pme_ring_group.c: the MorphKV ring's suffix-summed group */
enum { PME_GRP_NONE = 0, PME_GRP_HOST = 1, PME_GRP_DEV = 2 };

int           pme_ring_groups(const pme_state * st);       /* this ubatch's rows form a group */
void          pme_ring_roll(pme_state * st, int32_t rows); /* rows written over the ring: the group's first go */
void          pme_ring_group_new(pme_state * st);          /* after the rows of a grouping ubatch are in */
const float * pme_ring_group_row(pme_state * st);          /* the suffix sum in use (NULL: no group), masked */
int           pme_ring_slot_grouped(const pme_state * st, int32_t slot);
int           pme_ring_group_fetch_all(pme_state * st);    /* every suffix sum still in use into grp_sfx */
void          pme_keylog_capture(pme_state * st, const struct ggml_tensor * node, int32_t il); /* pme_keylog.c */
/* one token's K row (n_head_kv heads nb_head bytes apart, in the cache's type) into the key log's f16 staging */
void          pme_keylog_store_row(pme_state * st, uint16_t * dst, const char * row, int type, size_t nb_head);
/* pme_kmirror.c: a layer's K view in host memory, copied whole once and then by the rows each ubatch wrote */
const char *  pme_k_rows(pme_state * st, const struct ggml_tensor * k, int32_t layer);
void          pme_kmirror_invalidate(pme_state * st);
const char *  pme_mask_rows(pme_state * st, const struct ggml_tensor * mask, int64_t n_tokens);
void          pme_kmirror_free(pme_state * st);

int pme_is_pinned(const pme_state * st, int32_t pos); /* pme_pins.c */

/* pme_devscore.c: whether t's layer is reduced on t's backend; fold returns 0 (done), 1 (use the host path), -1 */
int  pme_dev_wants(const pme_state * st, const struct ggml_tensor * t);
int  pme_dev_fold(pme_state * st, const struct ggml_tensor * node, int32_t layer);
int  pme_dev_collect(pme_state * st);
/* pme_devring.c: a group's suffix sums made on the device from this ubatch's rows (0, or 1: read the rows), and
 * rows [k0, k1) of them read into grp_sfx */
int  pme_devring_make(pme_state * st, struct pme_dev * d);
int  pme_devring_read(pme_state * st, int32_t k0, int32_t k1);
void pme_dev_free(pme_state * st);
#endif
