/* Integer kernels of the flash-attention scorer: q . K with the query quantised the way ggml-cpu quantises it before
 * multiplying a quantised K (pme_internal.h pme_kdotq_fn). For a q8_0 cache that is ggml's own vec_dot_q8_0_q8_0,
 * so the logits are the ones llama.cpp's flash attention computed. Elsewhere (no AVX2, other K types) the float
 * kernels of pme_kdot.c serve. */
#include "ggml.h"
#include "pme_internal.h"
#include "pme_simd.h"

#include <string.h>

#ifdef PME_X86
/* the eight 32-bit sums of x_i * y_i over byte quads, as floats: ggml-cpu's mul_sum_i8_pairs_float (q8_0 values
 * lie in [-127, 127], so maddubs never saturates) */
PME_TARGET static inline __attribute__((always_inline)) __m256 mul_sum_i8(__m256i x, __m256i y) {
    const __m256i dot = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(dot, _mm256_set1_epi16(1)));
}

/* s[j * nq + h] = q_h . k_j for NC (1 or 4) q8_0 K rows nb1 apart and nq (<= 3) q8_0 query rows: per block an
 * integer dot product scaled by both blocks' scales, which is how ggml-cpu's flash attention multiplies a q8_0 K
 * by its q8_0-rounded Q (vec_dot_q8_0_q8_0). The float kernel above dequantised each K element first: 4x the
 * work (perf: 7% of a q8_0 prompt chunk's time) */
PME_TARGET static inline __attribute__((always_inline)) void
kdotq_q8_0(const uint8_t * q, int64_t nq, const char * kb, size_t nb1, int NC, int64_t d, float * s) {
    const int64_t nb = d / 32;
    __m256        acc[3][4];
    for (int64_t h = 0; h < nq; ++h) {
        for (int j = 0; j < NC; ++j) {
            acc[h][j] = _mm256_setzero_ps();
        }
    }
    for (int64_t b = 0; b < nb; ++b) {
        __m256i kx[4];
        float   kd[4];
        for (int j = 0; j < NC; ++j) {
            const uint8_t * blk = (const uint8_t *) kb + (size_t) j * nb1 + b * 34;
            uint16_t        dh;
            memcpy(&dh, blk, sizeof dh);
            kd[j] = _cvtsh_ss(dh);
            kx[j] = _mm256_loadu_si256((const __m256i *) (blk + 2));
        }
        for (int64_t h = 0; h < nq; ++h) {
            const uint8_t * qb = q + (h * nb + b) * 34;
            uint16_t        dh;
            memcpy(&dh, qb, sizeof dh);
            const float   qd = _cvtsh_ss(dh);
            const __m256i qy = _mm256_loadu_si256((const __m256i *) (qb + 2));
            for (int j = 0; j < NC; ++j) {
                acc[h][j] = _mm256_fmadd_ps(_mm256_set1_ps(kd[j] * qd), mul_sum_i8(kx[j], qy), acc[h][j]);
            }
        }
    }
    for (int64_t h = 0; h < nq; ++h) {
        for (int j = 0; j < NC; ++j) {
            s[j * nq + h] = hsum8(acc[h][j]);
        }
    }
}

/* every head count, three heads at a time (3 heads x 4 cells of accumulators fill the registers) */
PME_TARGET static void
kdotq_q8_0_any(const void * qv, int64_t nq, const void * k, size_t nb1, int nc, int64_t d, float * s) {
    const uint8_t * q   = qv;
    const size_t    row = (size_t) (d / 32) * 34;
    float           part[12];
    for (int64_t h = 0; h < nq; h += 3) {
        const int64_t n    = nq - h < 3 ? nq - h : 3;
        /* nq and the cell count as constants, so the accumulators stay in registers */
        const int     kind = (int) n + (nc == 4 ? 3 : 0);
        switch (kind) {
            case 1:
                kdotq_q8_0(q + h * row, 1, k, nb1, 1, d, part);
                break;
            case 2:
                kdotq_q8_0(q + h * row, 2, k, nb1, 1, d, part);
                break;
            case 3:
                kdotq_q8_0(q + h * row, 3, k, nb1, 1, d, part);
                break;
            case 4:
                kdotq_q8_0(q + h * row, 1, k, nb1, 4, d, part);
                break;
            case 5:
                kdotq_q8_0(q + h * row, 2, k, nb1, 4, d, part);
                break;
            default:
                kdotq_q8_0(q + h * row, 3, k, nb1, 4, d, part);
                break;
        }
        for (int j = 0; j < nc; ++j) {
            for (int64_t x = 0; x < n; ++x) {
                s[j * nq + h + x] = part[j * n + x];
            }
        }
    }
}

pme_kdotq_fn pme_kdotq_pick(int type, int64_t d) {
    return pme_has_avx2() && type == GGML_TYPE_Q8_0 && d % 32 == 0 ? kdotq_q8_0_any : NULL;
}
#else
pme_kdotq_fn pme_kdotq_pick(int type, int64_t d) {
    (void) type;
    (void) d;
    return NULL;
}
#endif
