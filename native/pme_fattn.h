/* Shared by pme_fattn.c (flash attention rows for scoring) and pme_fattn_check.c (its check mode). */
#ifndef PME_FATTN_H
#define PME_FATTN_H
#include "pme_internal.h"

#ifdef _OPENMP
#    include <omp.h>

/* the OpenMP threads llama.cpp's CPU backend runs, which the scorer shares its work among (1 without OpenMP) */
static inline int pme_max_threads(void) {
    return omp_get_max_threads();
}

static inline int pme_thread_num(void) {
    return omp_get_thread_num();
}
#else
static inline int pme_max_threads(void) {
    return 1;
}

static inline int pme_thread_num(void) {
    return 0;
}
#endif

#define PME_FA_MAX_Q 64 /* query heads per KV head */

/* the attention inputs of one layer, from a flash attention node or (check mode) a softmax node's ancestors */
typedef struct attn_job {
    const struct ggml_tensor *q, *k, *mask, *sinks;
    const char *              qd, *kd, *md, *sd; /* their data in host memory */
    float                     scale, max_bias, softcap;
    int64_t                   d, n_tokens, n_head, n_kv, n_head_kv, q_per_kv;
    enum ggml_type            qt;
    float *                   kbuf, *abuf, *mrow, *qrow; /* mrow and qrow: n_threads scratch copies */
    int                       n_threads;
    int                       fused;                     /* a prompt chunk folded as its rows are made (attn_chunk) */
} attn_job;

/* j's sources read (or copied to the host) and its scratch sized; 0 or -1 (error set) */
int    pme_attn_prepare(pme_state * st, attn_job * j, int32_t layer);
/* j->abuf = the attention rows of KV head g's query heads, laid out (q_per_kv, n_tokens, n_kv) */
void   pme_attn_rows(const attn_job * j, int64_t g);
/* a decode step: every group's rows into j->abuf, laid out (n_head, 1, n_kv); 1 where this path does not apply */
int    pme_attn_decode(const attn_job * j);
/* a prompt chunk (j->fused): KV group g's rows folded into the ubatch accumulators as they are made */
void   pme_attn_chunk(pme_state * st, const attn_job * j, int64_t g);
void * pme_fa_grow(pme_state * st, void ** buf, size_t * cap, size_t need, const char * what);
/* check mode: the node t's output rebuilt from group g's rows, the error kept in st->fa_check_* */
int    pme_fattn_check_output(pme_state *                st,
                              const struct ggml_tensor * t,
                              const float *              rows,
                              int64_t                    g,
                              int64_t                    q_per_kv,
                              int64_t                    n_tokens,
                              int64_t                    n_kv);
#endif
