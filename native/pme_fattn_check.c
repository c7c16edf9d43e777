/* Check mode of the flash-attention scorer (pme_test_fattn_check): proof that the recomputed rows are the
 * model's own attention. With flash attention on, the node's output is rebuilt from the rows; with it off, the
 * rows are recomputed the flash-attention way from the softmax path's own Q and K and compared with kq_soft_max. */
#include "ggml.h"
#include "pme_fattn.h"

#include <math.h>
#include <string.h>

/* Check mode (pme_test_fattn_check): rebuild the node's output sum_c A[c] V[c] from the recomputed rows of
 * one group and compare it with what flash attention wrote, which holds only if Q, K, V and the mask were
 * intact and the rows are right */
int pme_fattn_check_output(pme_state *                st,
                           const struct ggml_tensor * t,
                           const float *              rows,
                           int64_t                    g,
                           int64_t                    q_per_kv,
                           int64_t                    n_tokens,
                           int64_t                    n_kv) {
    const struct ggml_tensor *      v   = t->src[2];
    const struct ggml_tensor *      o   = t;
    const struct ggml_type_traits * vtr = ggml_get_type_traits(v->type);
    if (!vtr->to_float || v->nb[0] != ggml_type_size(v->type) || o->nb[0] != sizeof(float)) {
        pme_set_error(st, "fattn check: unsupported V (%s) or output layout", ggml_type_name(v->type));
        return -1;
    }
    const int64_t dv   = v->ne[0];
    const char *  vd   = pme_host_or_copy(st, v, 4); /* slots 0-3 hold the scoring sources */
    const char *  od   = vd ? pme_host_or_copy(st, o, 5) : NULL;
    float *       vrow = pme_fa_grow(st, &st->fa_check_v, &st->fa_check_v_cap,
                                     (size_t) (n_kv + 1) * (size_t) dv * sizeof(float), "V rows");
    if (!od || !vrow) {
        return -1;
    }
    float * acc = vrow + n_kv * dv;
    for (int64_t c = 0; c < n_kv; ++c) {
        vtr->to_float(vd + c * v->nb[1] + g * v->nb[2], vrow + c * dv, dv);
    }
    for (int64_t j = 0; j < q_per_kv; ++j) {
        const int64_t h = g * q_per_kv + j;
        for (int64_t tk = 0; tk < n_tokens; ++tk) {
            const float * a = rows + (j * n_tokens + tk) * n_kv;
            memset(acc, 0, (size_t) dv * sizeof(float));
            for (int64_t c = 0; c < n_kv; ++c) {
                if (a[c] != 0.0f) {
                    for (int64_t i = 0; i < dv; ++i) {
                        acc[i] += a[c] * vrow[c * dv + i];
                    }
                }
            }
            /* output ne = (dv, n_head, n_tokens) */
            const float * out = (const float *) (od + h * o->nb[1] + tk * o->nb[2]);
            for (int64_t i = 0; i < dv; ++i) {
                const float err = fabsf(out[i] - acc[i]), mag = fabsf(acc[i]);
                st->fa_check_err = err > st->fa_check_err ? err : st->fa_check_err;
                st->fa_check_mag = mag > st->fa_check_mag ? mag : st->fa_check_mag;
            }
        }
    }
    st->fa_check_nodes++;
    return 0;
}

int pme_check_softmax(pme_state * st, const struct ggml_tensor * t, const float * attn) {
    /* the softmax path's kq = mul_mat(K view, Q) sits right under kq_soft_max when there is no softcap or bias */
    const struct ggml_tensor * kq = t->src[0];
    if (!kq || kq->op != GGML_OP_MUL_MAT) {
        pme_set_error(st, "%s: the check needs kq = mul_mat(K, Q) right under the softmax", t->name);
        return -1;
    }
    attn_job j = { .q = kq->src[1], .k = kq->src[0], .mask = t->src[1], .sinks = t->src[2] };
    float    params[2];
    memcpy(params, t->op_params, sizeof params);
    j.scale = params[0], j.max_bias = params[1], j.softcap = 0.0f;
    if (pme_attn_prepare(st, &j, st->cur_layer) != 0) {
        return -1;
    }
    for (int64_t g = 0; g < j.n_head_kv; ++g) {
        pme_attn_rows(&j, g);
        for (int64_t jh = 0; jh < j.q_per_kv; ++jh) {
            for (int64_t tk = 0; tk < j.n_tokens; ++tk) {
                const float * mine = j.abuf + (jh * j.n_tokens + tk) * j.n_kv;
                const float * ref =
                    (const float *) ((const char *) attn + tk * t->nb[1] + (g * j.q_per_kv + jh) * t->nb[2]);
                for (int64_t c = 0; c < j.n_kv; ++c) {
                    const float err  = fabsf(mine[c] - ref[c]);
                    st->fa_check_err = err > st->fa_check_err ? err : st->fa_check_err;
                    st->fa_check_mag = ref[c] > st->fa_check_mag ? ref[c] : st->fa_check_mag;
                    if (ref[c] > 1e-3f && err / ref[c] > st->fa_check_rel) {
                        st->fa_check_rel = err / ref[c];
                    }
                }
            }
        }
    }
    st->fa_check_nodes++;
    return 0;
}
