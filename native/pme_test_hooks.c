/* Entry points for unit tests: the same scoring and selection code, fed synthetic attention. */
#include "llama.h"
#include "pme_internal.h"

#include <stdio.h>
#include <string.h>

int pme_test_set_cells(pme_state * st, const int32_t * pos_per_cell, int32_t n) {
    if (!st || (!pos_per_cell && n > 0)) {
        return -1;
    }
    if (n < 0 || n > st->cfg.n_cells) {
        pme_set_error(st, "pme_test_set_cells: %d cells > n_cells %d", n, st->cfg.n_cells);
        return -1;
    }
    pme_reset(st);
    for (int32_t c = 0; c < n; ++c) {
        if (pos_per_cell[c] >= 0) {
            pme_cell_assign(st, c, pos_per_cell[c]);
        }
    }
    return 0;
}

int pme_test_observe(pme_state * st, const float * attn, int32_t n_kv, int32_t n_tokens, int32_t n_head) {
    if (!st) {
        return -1;
    }
    if (!attn || n_kv < 1) {
        pme_set_error(st, "pme_test_observe: attn %p, n_kv %d", (const void *) attn, n_kv);
        return -1;
    }
    if (st->ub_n == 0) {
        pme_set_error(st, "pme_test_observe: call pme_begin_ubatch first");
        return -1;
    }
    st->main_group      = 0;
    st->group_mapped[0] = 1;
    st->cur_layer       = st->ub_layers % st->cfg.n_layer; /* the k-th call of a ubatch is layer k */
    return pme_fold_softmax(st, attn, n_kv, n_tokens, n_head, (size_t) n_kv * sizeof(float),
                            (size_t) n_kv * (size_t) n_tokens * sizeof(float));
}

int pme_test_select(pme_state * st, int32_t next_pos, int32_t * out_pos, int32_t cap) {
    if (!st || !out_pos || cap < 0) {
        return -1;
    }
    return pme_policy_select(st, next_pos, out_pos, cap);
}

int pme_test_scores(const pme_state * st, float * out, int32_t cap) {
    if (!st || !out || cap < 0) {
        return -1;
    }
    const int32_t n = st->cfg.n_cells < cap ? st->cfg.n_cells : cap;
    memcpy(out, st->score, (size_t) n * sizeof(float));
    return n;
}

int pme_test_free_cell(pme_state * st, int32_t cell) {
    if (!st || cell < 0 || cell >= st->cfg.n_cells) {
        return -1;
    }
    pme_cell_free(st, cell);
    return 0;
}

int pme_test_force_copy(pme_state * st, int32_t enable) {
    if (!st) {
        return -1;
    }
    st->force_copy = enable != 0;
    return 0;
}

int pme_test_backend_scores(pme_state * st, int32_t mode) {
    if (!st || mode < PME_DEV_AUTO || mode > PME_DEV_NEVER) {
        return -1;
    }
    st->dev_mode = mode;
    return 0;
}

int pme_test_fattn_check(pme_state * st, int32_t enable, float * out) {
    if (!st || !out) {
        return -1;
    }
    if (enable && !st->fa_check) {
        st->fa_check_err = st->fa_check_mag = st->fa_check_rel = 0.0f;
        st->fa_check_nodes                                     = 0;
    }
    st->fa_check = enable != 0;
    out[0]       = st->fa_check_err;
    out[1]       = st->fa_check_mag;
    out[2]       = st->fa_check_rel;
    out[3]       = (float) st->fa_check_nodes;
    return 0;
}

int pme_test_evict_range(pme_state * st, void * llama_memory, int32_t seq_id, int32_t p0, int32_t p1) {
    return pme_drop_range(st, llama_memory, seq_id, p0, p1);
}

int pme_test_fattn_layer(const char * k_name, const char * view_of) {
    /* bare tensors: only names and links are read, nothing is allocated or computed */
    struct ggml_tensor root = { 0 }, k = { 0 }, node = { 0 };
    snprintf(k.name, sizeof k.name, "%s", k_name);
    if (view_of) {
        snprintf(root.name, sizeof root.name, "%s", view_of);
        k.view_src = &root;
    }
    node.op     = GGML_OP_FLASH_ATTN_EXT;
    node.src[1] = &k;
    return pme_fattn_layer(&node);
}
