/* pymorph_edge native API: MorphKV scoring inside llama.cpp's graph eval callback.
 *
 * The block between the CFFI markers is read verbatim by pymorph_edge/_native.py (cffi ABI mode),
 * so it must stay plain C declarations: no macros, no includes, no llama/ggml types. */
#ifndef PME_H
#define PME_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif
/* CFFI-BEGIN */
enum pme_policy_kind {
    PME_POLICY_MORPHKV   = 0,
    PME_POLICY_H2O       = 1,
    PME_POLICY_TOVA      = 2,
    PME_POLICY_SNAPKV    = 3,
    PME_POLICY_STREAMING = 4
};

enum pme_ubatch_flags {
    PME_UB_PREFILL    = 1,  /* multi-token chunk */
    PME_UB_LAST       = 2,  /* last chunk of a prompt */
    PME_UB_PROBE      = 4,  /* the prompt's last tokens, decoded to score the cache and then removed */
    PME_UB_QUERY      = 8,  /* a new text's last tokens, decoded for their queries only (key log) and removed */
    PME_UB_SUPERSEDED = 16, /* a prompt chunk whose last rows a probe of at least W tokens replaces before anything
                              reads them: a backend need not send them over */
    PME_UB_RESTORE    = 64  /* saved rows written into the cells llama.cpp allocates, the graph stopped there */
};

enum pme_fusion { PME_FUSION_SUM = 0, PME_FUSION_MAX = 1 };

enum pme_aggregate { PME_AGG_MEAN = 0, PME_AGG_MAX = 1 };

typedef struct pme_config {
    int32_t policy;         /* enum pme_policy_kind */
    int32_t budget;         /* cells kept after each eviction */
    int32_t window;         /* W: most recent tokens, never evicted; their attention rows score the rest */
    int32_t fusion;         /* enum pme_fusion: how the W rows combine */
    int32_t aggregate;      /* enum pme_aggregate: how KV heads and layers combine into one score per cell */
    float   prefill_decay;  /* prefill score persists across chunks as max(decay*old, new) */
    int32_t protect_recent; /* positions >= next_pos - protect_recent are never evicted (max(W, n_swa)) */
    int32_t n_cells;        /* cells of the (non-SWA) KV cache: llama_n_ctx */
    int32_t n_head;         /* query heads */
    int32_t n_head_kv;      /* KV heads (GQA groups) */
    int32_t n_layer;        /* model layers, bounds the layer table */
    int32_t max_ubatch;     /* largest ubatch the engine will submit */
    int32_t pool_radius;    /* a token's score is the max over positions within this radius (0: off) */
    int32_t n_sink;         /* first positions never evicted (StreamingLLM's attention sinks) */
    int32_t pool_after;     /* a token also scores as high as any of the this many tokens before it */
    int32_t prefill_probe;  /* 1: prompt chunks are scored by a probe of the prompt's last tokens (MorphKV) */
    float   forget;         /* H2O: the cumulative score is multiplied by this once per token observed (1: the paper) */
    int32_t pool_prompt_only; /* 1: pool only when evicting after a prompt chunk; decode steps rank raw scores */
    int32_t score_layers;     /* read at most this many layers of the scored cache, evenly spaced over its depth,
                                 once the first ubatch has shown which layers it has (0: every layer) */
    int32_t rotate_layers;    /* 1 (with score_layers k): prompt chunks read every layer, and each decode step a
                                 different 1/ceil(n/k) of them in turn, so the window's rows cover every layer;
                                 2: prompt chunks longer than two windows read the k chosen layers */
} pme_config;

typedef struct pme_stats {
    int64_t cells_in_use;   /* live cells of the scored cache */
    int64_t peak_cells;     /* highest cells_in_use seen right after a decode */
    int64_t tokens_evicted; /* positions removed with llama_memory_seq_rm */
    int64_t evict_calls;    /* llama_memory_seq_rm calls (ranges) */
    int64_t ubatches;       /* decodes observed */
    int64_t layers_scored;  /* kq_soft_max nodes read during the last ubatch */
    int64_t compactions;    /* pme_compact calls that renumbered positions */
    /* cost on a non-host backend (CUDA, Metal, RPC): device->host bytes the scorer copied, and the nodes it asked
     * the scheduler for (each one splits the graph and synchronises), over one-token ubatches (decode steps) and
     * multi-token ubatches (prompt chunks, probes, recalled blocks) since the last reset; host buffers copy 0 */
    int64_t decode_steps;
    int64_t decode_d2h_bytes;
    int64_t decode_syncs;
    int64_t prompt_chunks;
    int64_t prompt_d2h_bytes;
    int64_t prompt_syncs;
} pme_stats;

typedef struct pme_state pme_state;

int          pme_selfcheck(char * err, size_t err_len);
const char * pme_build_info(void);
const char * pme_built_for_version(void); /* llama-cpp-python version whose headers it was compiled against */
void *       pme_eval_callback_ptr(void);

pme_state *  pme_create(const pme_config * cfg, char * err, size_t err_len);
void         pme_free(pme_state * st);
void         pme_reset(pme_state * st);
const char * pme_last_error(const pme_state * st);

int     pme_begin_ubatch(pme_state *     st,
                         const int32_t * pos,
                         int32_t         n_tokens,
                         int32_t         flags); /* flags: pme_ubatch_flags */
int     pme_end_ubatch(pme_state * st);
int     pme_evict(pme_state * st, void * llama_memory, int32_t seq_id, int32_t next_pos);
int     pme_truncate(pme_state * st,
                     void *      llama_memory,
                     int32_t     seq_id,
                     int32_t     from_pos); /* drop positions >= from_pos */
/* remove the cells at positions [p0, p1) of seq_id as pme_evict removes its victims (rows saved, cells freed),
 * whatever the policy would keep: recall drops the kept fragments of a sentence whose whole copy it brought back.
 * Returns the cells freed, or -1 */
int     pme_drop_range(pme_state * st, void * llama_memory, int32_t seq_id, int32_t p0, int32_t p1);
/* renumber live positions to 0..n_live-1 in order (llama_memory_seq_add); returns next_pos - n_live, the
 * amount every position moved down by at the newest end, or -1 */
int32_t pme_compact(pme_state * st, void * llama_memory, int32_t seq_id, int32_t next_pos);
/* pme_kvstore.c: evicted tokens' K/V rows kept on the host (bytes: the bound, 0: off), written back by a
 * PME_UB_RESTORE ubatch; arm says how many of n logical positions are saved (their positions in pos_out) */
int     pme_kvstore_enable(pme_state * st, int64_t bytes);
int32_t pme_kvstore_arm(pme_state * st, const int64_t * lpos, int32_t n, int32_t * pos_out);
int32_t pme_kvstore_save_live(pme_state * st, const int64_t * lpos, int32_t n);
int     pme_kvstore_place(pme_state * st, int32_t pos0, const int64_t * lpos, int32_t n);
int64_t pme_kvstore_bytes(const pme_state * st);
/* 1 when a restore ubatch may be decoded at new positions: every layer's K rows are then re-rotated as they are
 * written (pme_kvrotate.c), and no llama_memory_seq_add (whole-cache K shift) is needed; 0: restore at the saved
 * positions and move the run (always on iSWA models) */
int     pme_kvstore_rotates(const pme_state * st);
int32_t pme_min_live_tail(const pme_state * st,
                          int32_t           next_pos); /* smallest p with every position in [p, next_pos) live */
void    pme_get_stats(const pme_state * st, pme_stats * out);
/* Pins (pme_pins.c): positions [0, n_keep) and [lo, hi) are never evicted (hi <= lo: no range). Compaction
 * carries the range along; pme_reset clears the range and keeps n_keep. Returns 0, or -1 on bad values. */
int     pme_set_pins(pme_state * st, int32_t n_keep, int32_t lo, int32_t hi);
/* A recalled block was just decoded at positions [pos0, pos0 + n): its cells take the logical positions
 * lpos[0..n) they had before eviction, and the tokens decoded next keep theirs (the block takes no room in
 * the logical sequence). Returns 0, or -1. */
int     pme_mark_recalled(pme_state * st, int32_t pos0, int32_t n, const int64_t * lpos);
/* n positions before the next one were given up with no token in them (a truncation whose token before was
 * evicted, so llama.cpp takes the next batch only n positions lower): the tokens decoded next take lower positions
 * and keep their logical ones. Returns 0, or -1. */
int     pme_skip_positions(pme_state * st, int32_t n);
/* logical position of each cell (-1 when free); returns n_cells, or -1 when cap is too small */
int     pme_cell_lpos(const pme_state * st, int64_t * out, int32_t cap);
int     pme_cell_positions(const pme_state * st, int32_t * out, int32_t cap);

/* Per-head weights: scores of (layer, KV head) pairs are scaled by w[layer * n_head_kv + head] before they
 * combine (NULL: every head counts the same). pme_calibrate arms the next ubatch to measure, per (layer, KV
 * head), the mean attention each row gives the cell holding target_pos[row] (-1: none); the results are
 * read with pme_calibration_scores. See pymorph_edge/head_calibration.py. */
int pme_set_head_weights(pme_state * st, const float * w, int32_t n);
int pme_calibrate(pme_state * st, const int32_t * target_pos, int32_t n_tokens);
int pme_calibration_scores(const pme_state * st, float * out, int32_t cap);

/* Sessions: the scorer's state for the live cells, written in cell order and read back into cells 0..n-1,
 * where llama_state_seq_set_data puts a restored sequence (pme_session.c). size/save return bytes or -1;
 * load returns 0, or -1 with the state untouched. */
int64_t pme_session_size(const pme_state * st);
int64_t pme_session_save(pme_state * st, void * buf, int64_t cap);
int     pme_session_load(pme_state * st, const void * buf, int64_t size);

/* Test hooks: drive the same scoring and selection code without a model. */
int              pme_test_set_cells(pme_state * st, const int32_t * pos_per_cell, int32_t n);
int              pme_test_observe(pme_state * st, const float * attn, int32_t n_kv, int32_t n_tokens, int32_t n_head);
int              pme_test_select(pme_state * st, int32_t next_pos, int32_t * out_pos, int32_t cap);
int              pme_test_scores(const pme_state * st, float * out, int32_t cap);
/* the token in cell `cell` is gone (as an eviction frees it): its scores are forgotten */
int              pme_test_free_cell(pme_state * st, int32_t cell);
/* enable 1: from now on, with flash attention on, every flash attention node also has its output rebuilt from
 * the recomputed rows and V (out[0] = max |difference|, out[1] = max |output|); with it off, every kq_soft_max
 * node's rows are also recomputed the flash attention way from Q, K and the mask (out[0] = max |difference|,
 * out[1] = max weight, out[2] = max relative difference over weights above 1e-3). out[3] = nodes checked.
 * Counters reset on enable. */
int              pme_test_fattn_check(pme_state * st, int32_t enable, float * out);
/* enable 1: read every tensor through ggml_backend_tensor_get, as for a buffer outside host memory, so the
 * non-host path (and its byte counters) runs on the CPU backend too */
int              pme_test_force_copy(pme_state * st, int32_t enable);
/* where scores are reduced: 0 (auto) on the attention's own backend for tensors outside host memory, on the host
 * otherwise; 1 on a backend for host tensors too (the CPU backend); 2 never on a backend (the copy path) */
int              pme_test_backend_scores(pme_state * st, int32_t mode);
/* the layer a flash attention node is read as when its K source is named k_name, a view of a tensor named view_of
 * (NULL: not a view); -1 when it is not a cache layer's K (pme_callback.c) */
int              pme_test_fattn_layer(const char * k_name, const char * view_of);
/* evict positions [p0, p1) of seq_id as pme_evict does its victims (rows saved, cells freed), whatever the policy
 * would keep: lets a test evict tokens inside a sliding window. Returns the cells freed. */
int              pme_test_evict_range(pme_state * st, void * llama_memory, int32_t seq_id, int32_t p0, int32_t p1);
/* timing one state repeatedly with saved KV (benchmarks/recall_latency.py --repeats): mark the KV store's rows
 * (out[4]; -1 when off or wrapped), and after each load_state (which forgets them) rewind to the mark before
 * anything is evicted: the rows saved before the mark answer again, those saved after it are overwritten. -1 when a
 * ring has wrapped since the mark */
int              pme_test_kvstore_mark(const pme_state * st, int64_t * out);
int              pme_test_kvstore_rewind(pme_state * st, const int64_t * mark);
/* Key log (pme_keylog.c): with enable(d_k > 0), every ubatch stages the keys it wrote at each scored layer
 * (f16, (n_tokens, n_head_kv, d_k), read with pme_keylog_keys after the ubatch; NULL for a layer not seen), and
 * a PME_UB_QUERY ubatch stages its last rows' queries instead ((n_rows, n_head, d_k) f32, plus the layer's
 * attention scale). A query ubatch folds nothing into the policy. pme_layer_groups: 1 for each layer of the
 * scored cache (as the first ubatch showed them, or the last one before that). enable(0) turns it off. Only read layers stage keys (pme_scored_layers). */
int              pme_keylog_enable(pme_state * st, int32_t d_k);
const uint16_t * pme_keylog_keys(const pme_state * st, int32_t layer);
const float *    pme_keylog_query(const pme_state * st, int32_t layer, int32_t * n_rows, float * scale);
int              pme_layer_groups(const pme_state * st, int8_t * out, int32_t cap);
/* the key log keeps only the layers with on[il] != 0 from the next ubatch on (until enable is called again): the
 * others' keys are not staged, nor a probe's queries, and a probe asks for no other node. n must be n_layer;
 * (NULL, 0): every layer again */
int              pme_keylog_layers(pme_state * st, const int8_t * on, int32_t n);
/* 1 for each layer of the scored cache that is read (all of them until the first ubatch chose; see
 * pme_config.score_layers); returns n_layer, or -1 when cap is too small */
int              pme_scored_layers(const pme_state * st, int8_t * out, int32_t cap);
/* read exactly the layers with on[il] != 0 (of the scored cache) from the next ubatch on, in place of the evenly
 * spaced choice; n must be n_layer, and a ubatch must have shown the layers. Returns 0, or -1 */
int              pme_set_scored_layers(pme_state * st, const int8_t * on, int32_t n);
/* CFFI-END */
#ifdef __cplusplus
}
#endif
#endif
