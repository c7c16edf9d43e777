/* A restored token's K rows re-rotated for the position it is restored at (docs/recall.md, "Restoring instead of
 * recomputing").
 *
 * A cache holds K after RoPE, rotated for the position the token was decoded at. Restored elsewhere, llama.cpp
 * would move it with llama_memory_seq_add, and then re-rotate the K of every cell of every layer at the next
 * decode: its K-shift graph covers the whole cache, whatever moved (on Gemma 3, 0.12-0.16 s a shift). So the rows
 * are rotated here instead, only the restored ones, as they are written: RoPE by the position difference, with the
 * layer's own parameters read off the graph's K rope node (a layer's frequency base may differ from another's). The
 * arithmetic is ggml's CPU rope as llama.cpp's K shift runs it (the same cos/sin table, built the same way, and
 * the same products), so the rows come out as that shift would leave them.
 *
 * Only K stored as f32, f16 or bf16, with normal or NeoX RoPE: a quantized K is dequantised, rotated and
 * requantised by llama.cpp's shift (with a Hadamard rotation around it in this llama.cpp), and multi-section RoPE
 * is shifted as NeoX. Elsewhere the layer's rope stays not ok and recall moves the run with llama.cpp's shift as
 * before; so does every iSWA model for now (pme_kvstore_rotates). */
#include "pme_internal.h"

#include <math.h>
#include <string.h>

#define PME_ROPE_MAX_DIM 1024 /* head sizes up to this are rotated; larger ones fall back to llama.cpp's shift */

/* the rope node whose output the K write stores: through the reshapes and views between them */
static const struct ggml_tensor * k_rope(const struct ggml_tensor * set_rows) {
    const struct ggml_tensor * t = set_rows->src[0];
    for (int hops = 0; t && hops < 8; ++hops) {
        if (t->op == GGML_OP_ROPE) {
            return t;
        }
        if (t->op != GGML_OP_RESHAPE && t->op != GGML_OP_VIEW && t->op != GGML_OP_CONT) {
            return NULL; /* anything else between (a scale, a Hadamard product) changes what a shift means */
        }
        t = t->src[0];
    }
    return NULL;
}

void pme_rope_note(struct pme_rope * r, const struct ggml_tensor * set_rows_k) {
    const struct ggml_tensor * rope = k_rope(set_rows_k);
    const struct ggml_tensor * dst  = set_rows_k; /* a view of the cache: its type, and a cell's row in ne[0] */
    memset(r, 0, sizeof *r);
    if (!rope) {
        return;
    }
    const int32_t * p = (const int32_t *) rope->op_params;
    r->n_dims         = p[1];
    r->mode           = p[2];
    r->n_ctx_orig     = p[4];
    memcpy(&r->freq_base, p + 5, sizeof(float));
    memcpy(&r->freq_scale, p + 6, sizeof(float));
    memcpy(&r->ext_factor, p + 7, sizeof(float));
    memcpy(&r->attn_factor, p + 8, sizeof(float));
    memcpy(&r->beta_fast, p + 9, sizeof(float));
    memcpy(&r->beta_slow, p + 10, sizeof(float));
    r->head_dim                        = rope->ne[0];
    r->n_head                          = rope->ne[1];
    const struct ggml_tensor * ff      = rope->src[2];
    const int                  ff_host = !ff || (ff->data && ff->buffer && ggml_backend_buffer_is_host(ff->buffer));
    const int k_type_ok = dst->type == GGML_TYPE_F16 || dst->type == GGML_TYPE_F32 || dst->type == GGML_TYPE_BF16;
    r->ff               = ff && ff_host ? (const float *) ff->data : NULL;
    r->k_type           = dst->type;
    r->ok = (r->mode == GGML_ROPE_TYPE_NORMAL || r->mode == GGML_ROPE_TYPE_NEOX) && p[15] == 0 && r->n_dims > 0 &&
            r->n_dims % 2 == 0 && r->n_dims <= r->head_dim && r->head_dim <= PME_ROPE_MAX_DIM && ff_host && k_type_ok &&
            dst->ne[0] == r->head_dim * r->n_head;
}

static float load(enum ggml_type type, const char * row, int64_t i) {
    switch (type) {
        case GGML_TYPE_F16:
            return ggml_fp16_to_fp32(((const ggml_fp16_t *) row)[i]);
        case GGML_TYPE_BF16:
            return ggml_bf16_to_fp32(((const ggml_bf16_t *) row)[i]);
        default:
            return ((const float *) row)[i];
    }
}

static void store(enum ggml_type type, char * row, int64_t i, float v) {
    switch (type) {
        case GGML_TYPE_F16:
            ((ggml_fp16_t *) row)[i] = ggml_fp32_to_fp16(v);
            break;
        case GGML_TYPE_BF16:
            ((ggml_bf16_t *) row)[i] = ggml_fp32_to_bf16(v);
            break;
        default:
            ((float *) row)[i] = v;
    }
}

/* ggml's YaRN ramp: 1 below the low correction dimension, 0 above the high one */
static float yarn_ramp(float low, float high, int64_t i0) {
    const float y = (float) (i0 / 2 - low) / fmaxf(0.001f, high - low);
    return 1.0f - fminf(1.0f, fmaxf(0.0f, y));
}

int pme_rope_rotate(const struct pme_rope * r, char * row, int32_t delta) {
    if (delta == 0) {
        return 0;
    }
    if (!r->ok) {
        return -1;
    }
    /* the cos/sin table for position delta, as ggml_rope_cache_init builds it (theta multiplied up pair by pair) */
    float       cs[PME_ROPE_MAX_DIM];
    float       corr[2]     = { 0.0f, 0.0f };
    const float theta_scale = powf(r->freq_base, -2.0f / (float) r->n_dims);
    if (r->ext_factor != 0.0f) {
        ggml_rope_yarn_corr_dims(r->n_dims, r->n_ctx_orig, r->freq_base, r->beta_fast, r->beta_slow, corr);
    }
    float theta = (float) delta;
    for (int64_t i0 = 0; i0 < r->head_dim; i0 += 2) {
        const float extrap = theta / (r->ff ? r->ff[i0 / 2] : 1.0f);
        float       th     = r->freq_scale * extrap;
        float       mscale = r->attn_factor;
        if (r->ext_factor != 0.0f) {
            const float mix = yarn_ramp(corr[0], corr[1], i0) * r->ext_factor;
            th              = th * (1 - mix) + extrap * mix;
            mscale *= 1.0f + 0.1f * logf(1.0f / r->freq_scale);
        }
        cs[i0]     = cosf(th) * mscale;
        cs[i0 + 1] = sinf(th) * mscale;
        theta *= theta_scale;
    }
    /* normal RoPE rotates neighbouring pairs (i0, i0 + 1); NeoX pairs i with i + n_dims / 2 */
    const int     neox = r->mode == GGML_ROPE_TYPE_NEOX;
    const int64_t off  = neox ? r->n_dims / 2 : 1;
    for (int64_t h = 0; h < r->n_head; ++h) {
        const int64_t base = h * r->head_dim;
        for (int64_t i0 = 0; i0 < r->n_dims; i0 += 2) {
            const int64_t ic = base + (neox ? i0 / 2 : i0);
            const float   x0 = load(r->k_type, row, ic);
            const float   x1 = load(r->k_type, row, ic + off);
            store(r->k_type, row, ic, x0 * cs[i0] - x1 * cs[i0 + 1]);
            store(r->k_type, row, ic + off, x0 * cs[i0 + 1] + x1 * cs[i0]);
        }
    }
    return 0;
}
