/* Per-head weights, and the measurement they are derived from.
 *
 * llama.cpp keeps one cell per token for every layer and KV head, so their scores must fold into one
 * keep-set. On a standard model most heads attend locally or to the first token; the few that copy
 * earlier content (induction / retrieval heads) carry the signal that matters for recall, and a plain
 * mean drowns it. pme_calibrate measures each head's attention on known copy targets; the Python side
 * (pymorph_edge/head_calibration.py) turns that into weights. */
#include "pme_internal.h"

#include <stdlib.h>
#include <string.h>

static int32_t n_heads_total(const pme_state * st) {
    return st->cfg.n_layer * st->cfg.n_head_kv;
}

int pme_set_head_weights(pme_state * st, const float * w, int32_t n) {
    if (!st) {
        return -1;
    }
    if (n < 0) {
        pme_set_error(st, "pme_set_head_weights: n=%d", n);
        return -1;
    }
    if (!w || n == 0) {
        free(st->head_w);
        st->head_w = NULL;
        return 0;
    }
    if (n != n_heads_total(st)) {
        pme_set_error(st, "pme_set_head_weights: %d weights for %d (layer, KV head) pairs", n, n_heads_total(st));
        return -1;
    }
    for (int32_t i = 0; i < n; ++i) {
        if (!(w[i] >= 0.0f && w[i] <= 1e6f)) { /* also rejects NaN */
            pme_set_error(st, "pme_set_head_weights: weight %d is %g, expected a finite value >= 0", i, (double) w[i]);
            return -1;
        }
    }
    if (!st->head_w) {
        st->head_w = malloc((size_t) n * sizeof(float));
        if (!st->head_w) {
            pme_set_error(st, "pme_set_head_weights: out of memory");
            return -1;
        }
    }
    memcpy(st->head_w, w, (size_t) n * sizeof(float));
    return 0;
}

int pme_calibrate(pme_state * st, const int32_t * target_pos, int32_t n_tokens) {
    if (!st || !target_pos) {
        return -1;
    }
    if (st->head_w) {
        pme_set_error(st, "pme_calibrate: clear the head weights first (calibration measures unweighted heads)");
        return -1;
    }
    if (n_tokens < 1 || n_tokens > st->cfg.max_ubatch) {
        pme_set_error(st, "pme_calibrate: n_tokens=%d outside [1, %d]", n_tokens, st->cfg.max_ubatch);
        return -1;
    }
    memcpy(st->calib_target, target_pos, (size_t) n_tokens * sizeof(int32_t));
    memset(st->calib_acc, 0, (size_t) n_heads_total(st) * sizeof(float));
    st->calib_n     = n_tokens;
    st->calib_rows  = 0;
    st->calib_armed = 1;
    return 0;
}

/* Called at the first fold of an armed ubatch, after its SET_ROWS nodes mapped the new cells. */
void pme_calib_resolve(pme_state * st) {
    for (int32_t t = 0; t < st->calib_n; ++t) {
        st->calib_cell[t] = -1;
        if (st->calib_target[t] < 0) {
            continue;
        }
        for (int32_t c = 0; c < st->cfg.n_cells; ++c) {
            if (st->cell_pos[c] == st->calib_target[t]) {
                st->calib_cell[t] = c;
                st->calib_rows++;
                break;
            }
        }
    }
    st->calib_armed = 2;
}

int pme_calibration_scores(const pme_state * st, float * out, int32_t cap) {
    if (!st || !out || cap < 0) {
        return -1;
    }
    const int32_t n = n_heads_total(st) < cap ? n_heads_total(st) : cap;
    for (int32_t i = 0; i < n; ++i) {
        out[i] = st->calib_rows > 0 ? st->calib_acc[i] / (float) st->calib_rows : 0.0f;
    }
    return n;
}
