/* Key log: the keys each ubatch wrote, and the queries of an armed ubatch, copied out of the attention node
 * of every scored layer, so that recall can ask which evicted tokens a new text would attend to
 * (pymorph_edge/engine/recall_keys.py).
 *
 * The attention node already runs the callback, so nothing else is asked for and the graph splits no more:
 *   flash attention on:  node->src[0] Q (d, n_tokens, n_head) f32, node->src[1] K (d, n_kv, n_head_kv)
 *   flash attention off: kq_soft_max->src[0] is kq = mul_mat(K, Q) with the same K and Q views
 * K is a view of the cache, written by SET_ROWS before the node runs, so the rows of this ubatch's cells
 * (on_set_rows records which) hold its keys in the cache's type, after RoPE. Only those rows are read. A cache
 * outside host memory has them staged on the device by the layer's scoring graph (pme_devkeys.c) where it can,
 * and read through its host mirror (pme_kmirror.c) otherwise. */
#include "ggml-backend.h"
#include "ggml.h"
#include "pme_internal.h"

#include <stdlib.h>
#include <string.h>

int pme_keylog_enable(pme_state * st, int32_t d_k) {
    if (!st) {
        return -1;
    }
    if (d_k < 0 || d_k > 1024) {
        pme_set_error(st, "pme_keylog_enable: d_k=%d outside [0, 1024]", d_k);
        return -1;
    }
    free(st->kl_k);
    free(st->kl_q);
    st->kl_k          = NULL;
    st->kl_q          = NULL;
    st->kl_d          = d_k;
    st->kl_layers_set = 0; /* every layer read until the key log names its own */
    if (d_k == 0) {
        return 0;
    }
    const size_t L = (size_t) st->cfg.n_layer;
    st->kl_k = malloc(L * (size_t) st->cfg.max_ubatch * (size_t) st->cfg.n_head_kv * (size_t) d_k * sizeof(uint16_t));
    st->kl_q = malloc(L * PME_KL_QMAX * (size_t) st->cfg.n_head * (size_t) d_k * sizeof(float));
    if (!st->kl_k || !st->kl_q) {
        pme_set_error(st, "out of memory for the key log's staging buffers");
        return -1;
    }
    memset(st->kl_seen, 0, (size_t) st->cfg.n_layer);
    return 0;
}

const uint16_t * pme_keylog_keys(const pme_state * st, int32_t layer) {
    if (!st || !st->kl_k || layer < 0 || layer >= st->cfg.n_layer || !(st->kl_seen[layer] & 1)) {
        return NULL;
    }
    return st->kl_k + (size_t) layer * st->cfg.max_ubatch * st->cfg.n_head_kv * st->kl_d;
}

const float * pme_keylog_query(const pme_state * st, int32_t layer, int32_t * n_rows, float * scale) {
    if (!st || !st->kl_q || layer < 0 || layer >= st->cfg.n_layer || !(st->kl_seen[layer] & 2)) {
        return NULL;
    }
    *n_rows = st->kl_q_rows;
    *scale  = st->kl_scale[layer];
    return st->kl_q + (size_t) layer * PME_KL_QMAX * st->cfg.n_head * st->kl_d;
}

int pme_keylog_wants(const pme_state * st, int32_t il) {
    return st->kl_d > 0 && il >= 0 && il < st->cfg.n_layer &&
           (!st->kl_layers_set || (st->layer_on[il] & PME_LAYER_KEYS));
}

int pme_keylog_layers(pme_state * st, const int8_t * on, int32_t n) {
    if (!st) {
        return -1;
    }
    if (!on && n == 0) { /* every layer again */
        st->kl_layers_set = 0;
        return 0;
    }
    if (!on || n != st->cfg.n_layer) {
        pme_set_error(st, "pme_keylog_layers: %d layers given, the model has %d", n, st->cfg.n_layer);
        return -1;
    }
    for (int32_t il = 0; il < n; ++il) {
        st->layer_on[il] = (uint8_t) ((st->layer_on[il] & ~PME_LAYER_KEYS) | (on[il] ? PME_LAYER_KEYS : 0));
    }
    st->kl_layers_set = 1;
    return 0;
}

int pme_layer_groups(const pme_state * st, int8_t * out, int32_t cap) {
    if (!st || cap < st->cfg.n_layer) {
        return -1;
    }
    for (int32_t il = 0; il < st->cfg.n_layer; ++il) {
        /* once chosen, the layers of the scored cache are remembered through resets (a graph's layers stay) */
        out[il] = st->layers_chosen ? (st->layer_on[il] & PME_LAYER_MAIN) != 0 :
                                      st->main_group >= 0 && st->layer_group[il] == st->main_group;
    }
    return st->cfg.n_layer;
}

int pme_scored_layers(const pme_state * st, int8_t * out, int32_t cap) {
    if (!st || cap < st->cfg.n_layer) {
        return -1;
    }
    if (!st->layers_chosen) {
        return pme_layer_groups(st, out, cap);
    }
    for (int32_t il = 0; il < st->cfg.n_layer; ++il) {
        out[il] = (st->layer_on[il] & PME_LAYER_READ) != 0;
    }
    return st->cfg.n_layer;
}

int pme_set_scored_layers(pme_state * st, const int8_t * on, int32_t n) {
    if (!st) {
        return -1;
    }
    if (!on || n != st->cfg.n_layer) {
        pme_set_error(st, "pme_set_scored_layers: %d layers given, the model has %d", n, st->cfg.n_layer);
        return -1;
    }
    if (!st->layers_chosen) {
        pme_set_error(st, "pme_set_scored_layers: no ubatch has shown the scored cache's layers yet");
        return -1;
    }
    int32_t any = 0;
    for (int32_t il = 0; il < n; ++il) {
        if (on[il] && !(st->layer_on[il] & PME_LAYER_MAIN)) {
            pme_set_error(st, "pme_set_scored_layers: layer %d is not a layer of the scored cache", il);
            return -1;
        }
        any |= on[il] != 0;
    }
    if (!any) {
        pme_set_error(st, "pme_set_scored_layers: no layer is on");
        return -1;
    }
    for (int32_t il = 0; il < n; ++il) {
        st->layer_on[il] =
            (uint8_t) (PME_LAYER_MAIN * ((st->layer_on[il] & PME_LAYER_MAIN) != 0) + (on[il] ? PME_LAYER_READ : 0));
    }
    return 0;
}

/* node: the attention node of scored layer il, just computed */
void pme_keylog_capture(pme_state * st, const struct ggml_tensor * node, int32_t il) {
    if (!pme_keylog_wants(st, il)) {
        return;
    }
    const struct ggml_tensor * q = NULL;
    const struct ggml_tensor * k = NULL;
    float                      scale;
    memcpy(&scale, node->op_params, sizeof scale); /* both ops keep their scale in op_params[0] */
    if (node->op == GGML_OP_FLASH_ATTN_EXT) {
        q = node->src[0];
        k = node->src[1];
    } else if (node->src[0] && node->src[0]->op == GGML_OP_MUL_MAT) {
        k = node->src[0]->src[0];
        q = node->src[0]->src[1];
    }
    const int64_t d = st->kl_d, hkv = st->cfg.n_head_kv, nh = st->cfg.n_head;
    if (!q || !k || k->ne[0] != d || k->ne[2] != hkv || q->ne[0] != d || q->ne[2] != nh || q->type != GGML_TYPE_F32 ||
        q->ne[1] != st->ub_n) {
        pme_set_error(st, "key log: layer %d's attention node has no K (d=%lld, %lld heads) and Q it can read", il,
                      (long long) d, (long long) hkv);
        return;
    }
    if (st->ub_flags & PME_UB_QUERY) {
        /* the armed ubatch is a query probe: its queries, not its keys (it is removed again); Q comes over in one
         * read (not row by row: on RPC every read is a round trip) */
        const char * qd = pme_host_or_copy(st, q, 0);
        if (!qd) {
            return;
        }
        const int32_t n0 = st->ub_n > PME_KL_QMAX ? st->ub_n - PME_KL_QMAX : 0;
        float *       qo = st->kl_q + (size_t) il * PME_KL_QMAX * nh * d;
        for (int32_t r = n0; r < st->ub_n; ++r) {
            for (int64_t h = 0; h < nh; ++h) {
                memcpy(qo + ((size_t) (r - n0) * nh + h) * d, qd + (size_t) r * q->nb[1] + (size_t) h * q->nb[2],
                       (size_t) d * sizeof(float));
            }
        }
        st->kl_q_rows    = st->ub_n - n0;
        st->kl_scale[il] = scale;
        st->kl_seen[il] |= 2;
        return;
    }
    uint16_t *   kd = st->kl_k + (size_t) il * st->cfg.max_ubatch * hkv * d;
    /* a non-host K comes from the host mirror, which fetches this ubatch's rows once for the scorer too */
    const char * kb = pme_k_rows(st, k, il);
    if (!kb) {
        return;
    }
    const struct ggml_type_traits * tr = ggml_get_type_traits(k->type);
    if (k->type != GGML_TYPE_F16 && !tr->to_float) {
        pme_set_error(st, "key log: no conversion to float for a %s K cache", ggml_type_name(k->type));
        return;
    }
    for (int32_t i = 0; i < st->ub_n; ++i) {
        const int32_t cell = st->ub_cell[i];
        if (cell < 0 || cell >= k->ne[1]) {
            pme_set_error(st, "key log: cell %d of token %d outside the %lld-cell K view", cell, i,
                          (long long) k->ne[1]);
            return;
        }
        pme_keylog_store_row(st, kd + (size_t) i * hkv * d, kb + (size_t) cell * k->nb[1], k->type, k->nb[2]);
    }
    st->kl_seen[il] |= 1;
}

void pme_keylog_store_row(pme_state * st, uint16_t * dst, const char * row, int type, size_t nb_head) {
    const int64_t d = st->kl_d;
    for (int64_t h = 0; h < st->cfg.n_head_kv; ++h) {
        const char * src = row + (size_t) h * nb_head;
        if (type == GGML_TYPE_F16) {
            memcpy(dst + h * d, src, (size_t) d * sizeof(uint16_t));
        } else {
            ggml_get_type_traits((enum ggml_type) type)->to_float(src, st->kl_f32, d);
            ggml_fp32_to_fp16_row(st->kl_f32, (ggml_fp16_t *) (dst + h * d), d);
        }
    }
}
