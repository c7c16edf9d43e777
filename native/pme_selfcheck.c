/* Load-time check that the running ggml agrees with the headers this library was compiled against:
 * the callback reads struct ggml_tensor fields directly, so a layout change would read garbage. */
#include "ggml.h"
#include "pme_internal.h"

#include <stdio.h>
#include <string.h>

#ifndef PME_LLAMA_CPP_PYTHON_VERSION
#    define PME_LLAMA_CPP_PYTHON_VERSION "unknown"
#endif

const char * pme_built_for_version(void) {
    return PME_LLAMA_CPP_PYTHON_VERSION;
}

const char * pme_build_info(void) {
    static char buf[160];
    snprintf(buf, sizeof buf, "pme built for llama-cpp-python %s, sizeof(ggml_tensor)=%zu, running ggml %s",
             PME_LLAMA_CPP_PYTHON_VERSION, sizeof(struct ggml_tensor), ggml_version());
    return buf;
}

#define CHECK(cond, what)                                      \
    do {                                                       \
        if (!(cond)) {                                         \
            snprintf(err, err_len, "pme_selfcheck: %s", what); \
            ggml_free(ctx);                                    \
            return -1;                                         \
        }                                                      \
    } while (0)

int pme_selfcheck(char * err, size_t err_len) {
    struct ggml_init_params ip  = { 64 * ggml_tensor_overhead() + 4096, NULL, false };
    struct ggml_context *   ctx = ggml_init(ip);
    if (!ctx) {
        snprintf(err, err_len, "pme_selfcheck: ggml_init failed");
        return -1;
    }

    struct ggml_tensor * a = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 7, 5, 3);
    ggml_set_name(a, "pme_probe");
    ggml_set_input(a);
    CHECK(ggml_get_name(a) == a->name && strcmp(a->name, "pme_probe") == 0, "ggml_tensor.name offset differs");
    CHECK(a->type == GGML_TYPE_F32 && a->ne[0] == 7 && a->ne[1] == 5 && a->ne[2] == 3 && a->ne[3] == 1,
          "ggml_tensor.ne offset differs");
    CHECK(a->nb[0] == 4 && a->nb[1] == 28 && a->nb[2] == 140 && ggml_nbytes(a) == 420, "ggml_tensor.nb offset differs");
    CHECK(ggml_get_data(a) == a->data && a->data != NULL, "ggml_tensor.data offset differs");
    CHECK((a->flags & GGML_TENSOR_FLAG_INPUT) != 0, "ggml_tensor.flags offset differs");

    struct ggml_tensor * mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 7, 5);
    struct ggml_tensor * sm   = ggml_soft_max_ext(ctx, a, mask, 1.0f, 0.0f);
    CHECK(sm->op == GGML_OP_SOFT_MAX && strcmp(ggml_op_name(sm->op), "SOFT_MAX") == 0,
          "GGML_OP_SOFT_MAX value differs");
    CHECK(sm->src[0] == a && sm->src[1] == mask, "ggml_tensor.src offset differs");

    struct ggml_tensor * dst  = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 7, 9);
    struct ggml_tensor * rows = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 7, 5);
    struct ggml_tensor * idx  = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, 5);
    struct ggml_tensor * sr   = ggml_set_rows(ctx, dst, rows, idx);
    CHECK(sr->op == GGML_OP_SET_ROWS && strcmp(ggml_op_name(sr->op), "SET_ROWS") == 0,
          "GGML_OP_SET_ROWS value differs");
    CHECK(sr->src[1] == idx && sr->view_src == dst && sr->ne[1] == 9, "set_rows operand order differs");

    ggml_free(ctx);
    if (err_len) {
        err[0] = 0;
    }
    return 0;
}
