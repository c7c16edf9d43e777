/* Kernels of the flash-attention scorer (pme_fattn.c): q . K for the query heads of one KV group, read in
 * K's own type, and a softmax row.
 *
 * A decode scores every cell of every scored layer at every step. On SmolLM2 converting K rows to float
 * through ggml-base's scalar row functions, one dot per (head, cell) and libm's expf cost more than llama.cpp's
 * own attention (perf), so on x86 with AVX2/FMA/F16C (checked at run time) K is read once per cell for all the
 * group's heads and exp is a polynomial. Elsewhere the portable loops run (K rows go through to_float). */
#include "ggml.h"
#include "pme_internal.h"
#include "pme_simd.h"

#include <math.h>
#include <string.h>

void pme_softmax_row_portable(float * x, int64_t n, float sink) {
    float M = sink;
    for (int64_t c = 0; c < n; ++c) {
        M = x[c] > M ? x[c] : M;
    }
    if (M == -INFINITY) {
        memset(x, 0, (size_t) n * sizeof(float));
        return;
    }
    float S = sink == -INFINITY ? 0.0f : expf(sink - M);
    for (int64_t c = 0; c < n; ++c) {
        x[c] = x[c] == -INFINITY ? 0.0f : expf(x[c] - M);
        S += x[c];
    }
    const float inv = 1.0f / S;
    for (int64_t c = 0; c < n; ++c) {
        x[c] *= inv;
    }
}

static void f16_to_f32_portable(const uint16_t * x, float * y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        y[i] = ggml_fp16_to_fp32(x[i]);
    }
}

#ifdef PME_X86
#    define MAXQ 8 /* query heads per pass over K */

/* s[h] = q[h] . k for h < nq (nq <= MAXQ), q rows d apart; k is an f16 row */
PME_TARGET static inline __attribute__((always_inline)) void kdot_f16(const float * q,
                                                                      int64_t       nq,
                                                                      const void *  kv,
                                                                      int64_t       d,
                                                                      float *       s) {
    const uint16_t * k = kv;
    __m256           acc[MAXQ];
    for (int64_t h = 0; h < nq; ++h) {
        acc[h] = _mm256_setzero_ps();
    }
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) {
        const __m256 kf = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (k + i)));
        for (int64_t h = 0; h < nq; ++h) {
            acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * d + i), kf, acc[h]);
        }
    }
    for (int64_t h = 0; h < nq; ++h) {
        s[h] = hsum8(acc[h]);
        for (int64_t r = i; r < d; ++r) {
            s[h] += q[h * d + r] * _cvtsh_ss(k[r]);
        }
    }
}

/* s[j * nq + h] = q[h] . k_j for 4 f16 rows k_j = kv + j * nb1 and h < nq (nq <= 3, d % 8 == 0). One pass over
 * the four rows, and one horizontal reduction (two hadd rounds) per head for all four cells: the per-cell hsum of
 * kdot_f16 cost as much as its multiply-adds */
PME_TARGET static inline __attribute__((always_inline)) void kdot4_f16(const float * q,
                                                                       int64_t       nq,
                                                                       const void *  kv,
                                                                       size_t        nb1,
                                                                       int64_t       d,
                                                                       float *       s) {
    const char * kb = kv;
    __m256       acc[3][4];
    for (int64_t h = 0; h < nq; ++h) {
        for (int j = 0; j < 4; ++j) {
            acc[h][j] = _mm256_setzero_ps();
        }
    }
    for (int64_t i = 0; i < d; i += 8) {
        __m256 kf[4];
        for (int j = 0; j < 4; ++j) {
            kf[j] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (kb + (size_t) j * nb1) + i / 8));
        }
        for (int64_t h = 0; h < nq; ++h) {
            const __m256 qv = _mm256_loadu_ps(q + h * d + i);
            for (int j = 0; j < 4; ++j) {
                acc[h][j] = _mm256_fmadd_ps(qv, kf[j], acc[h][j]);
            }
        }
    }
    for (int64_t h = 0; h < nq; ++h) {
        const __m256 t0 = _mm256_hadd_ps(acc[h][0], acc[h][1]);
        const __m256 t1 = _mm256_hadd_ps(acc[h][2], acc[h][3]);
        const __m256 t2 = _mm256_hadd_ps(t0, t1);
        float        r[4];
        _mm_storeu_ps(r, _mm_add_ps(_mm256_castps256_ps128(t2), _mm256_extractf128_ps(t2, 1)));
        for (int j = 0; j < 4; ++j) {
            s[j * nq + h] = r[j];
        }
    }
}

/* block_q8_0: an f16 scale, then 32 int8 (34 bytes) */
PME_TARGET static inline __attribute__((always_inline)) void kdot_q8_0(const float * q,
                                                                       int64_t       nq,
                                                                       const void *  kv,
                                                                       int64_t       d,
                                                                       float *       s) {
    const uint8_t * b = kv;
    __m256          acc[MAXQ];
    for (int64_t h = 0; h < nq; ++h) {
        acc[h] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < d; i += 32, b += 34) {
        uint16_t dh;
        memcpy(&dh, b, sizeof dh);
        const __m256   scale = _mm256_set1_ps(_cvtsh_ss(dh));
        const int8_t * qs    = (const int8_t *) (b + 2);
        for (int j = 0; j < 32; j += 8) {
            const __m256 kf = _mm256_mul_ps(
                scale, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (qs + j)))));
            for (int64_t h = 0; h < nq; ++h) {
                acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * d + i + j), kf, acc[h]);
            }
        }
    }
    for (int64_t h = 0; h < nq; ++h) {
        s[h] = hsum8(acc[h]);
    }
}

/* block_q4_0: an f16 scale, then 16 bytes; element j is (low nibble of byte j) - 8, element j+16 the high one */
PME_TARGET static inline __attribute__((always_inline)) void kdot_q4_0(const float * q,
                                                                       int64_t       nq,
                                                                       const void *  kv,
                                                                       int64_t       d,
                                                                       float *       s) {
    const uint8_t * b = kv;
    __m256          acc[MAXQ];
    for (int64_t h = 0; h < nq; ++h) {
        acc[h] = _mm256_setzero_ps();
    }
    const __m128i low = _mm_set1_epi8(0x0F), bias = _mm_set1_epi8(8);
    for (int64_t i = 0; i < d; i += 32, b += 18) {
        uint16_t dh;
        memcpy(&dh, b, sizeof dh);
        const __m256  scale   = _mm256_set1_ps(_cvtsh_ss(dh));
        const __m128i raw     = _mm_loadu_si128((const __m128i *) (b + 2));
        const __m128i lo      = _mm_sub_epi8(_mm_and_si128(raw, low), bias);
        const __m128i hi      = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), low), bias);
        const __m128i part[4] = { lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8) };
        for (int j = 0; j < 4; ++j) {
            const __m256 kf = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part[j])));
            for (int64_t h = 0; h < nq; ++h) {
                acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * d + i + 8 * j), kf, acc[h]);
            }
        }
    }
    for (int64_t h = 0; h < nq; ++h) {
        s[h] = hsum8(acc[h]);
    }
}

/* e^x for x <= 0: 2^n e^r with |r| <= ln2/2, degree-6 Taylor (relative error < 2e-7); x < -87 gives 0 */
PME_TARGET static inline __m256 exp8(__m256 x) {
    const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
    x                 = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n =
        _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r        = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r               = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p        = _mm256_set1_ps(1.0f / 720);
    p               = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p               = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p               = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p               = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p               = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p               = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

PME_TARGET static void softmax_row_avx2(float * x, int64_t n, float sink) {
    __m256  vm = _mm256_set1_ps(sink);
    int64_t c  = 0;
    for (; c + 8 <= n; c += 8) {
        vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + c));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
    m4        = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4        = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float M   = _mm_cvtss_f32(m4);
    for (int64_t r = c; r < n; ++r) {
        M = x[r] > M ? x[r] : M;
    }
    if (M == -INFINITY) {
        memset(x, 0, (size_t) n * sizeof(float));
        return;
    }
    const __m256 vM = _mm256_set1_ps(M);
    __m256       vs = _mm256_setzero_ps();
    for (c = 0; c + 8 <= n; c += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + c), vM)); /* -inf - M -> 0 */
        _mm256_storeu_ps(x + c, e);
        vs = _mm256_add_ps(vs, e);
    }
    float S = hsum8(vs) + (sink == -INFINITY ? 0.0f : expf(sink - M));
    for (int64_t r = c; r < n; ++r) {
        x[r] = x[r] == -INFINITY ? 0.0f : expf(x[r] - M);
        S += x[r];
    }
    const __m256 inv = _mm256_set1_ps(1.0f / S);
    for (c = 0; c + 8 <= n; c += 8) {
        _mm256_storeu_ps(x + c, _mm256_mul_ps(_mm256_loadu_ps(x + c), inv));
    }
    for (int64_t r = c; r < n; ++r) {
        x[r] *= 1.0f / S;
    }
}

/* Each kernel specialised for every head count up to MAXQ: with nq a constant the accumulators stay in registers
 * (with nq read at run time they went through memory on every multiply-add, 4x slower, measured) */
#    define PME_KDOT_ANY(kern)                                                                                 \
        PME_TARGET static void kern##_any(const float * q, int64_t nq, const void * k, int64_t d, float * s) { \
            for (int64_t h = 0; h < nq; h += MAXQ, q += MAXQ * d, s += MAXQ) {                                 \
                switch (nq - h < MAXQ ? nq - h : MAXQ) {                                                       \
                    case 1:                                                                                    \
                        kern(q, 1, k, d, s);                                                                   \
                        break;                                                                                 \
                    case 2:                                                                                    \
                        kern(q, 2, k, d, s);                                                                   \
                        break;                                                                                 \
                    case 3:                                                                                    \
                        kern(q, 3, k, d, s);                                                                   \
                        break;                                                                                 \
                    case 4:                                                                                    \
                        kern(q, 4, k, d, s);                                                                   \
                        break;                                                                                 \
                    case 5:                                                                                    \
                        kern(q, 5, k, d, s);                                                                   \
                        break;                                                                                 \
                    case 6:                                                                                    \
                        kern(q, 6, k, d, s);                                                                   \
                        break;                                                                                 \
                    case 7:                                                                                    \
                        kern(q, 7, k, d, s);                                                                   \
                        break;                                                                                 \
                    default:                                                                                   \
                        kern(q, 8, k, d, s);                                                                   \
                        break;                                                                                 \
                }                                                                                              \
            }                                                                                                  \
        }
PME_KDOT_ANY(kdot_f16)

/* four cells per call, heads three at a time (the accumulators of 3 heads x 4 cells fill the 16 registers) */
PME_TARGET static void kdot4_f16_any(const float * q, int64_t nq, const void * k, size_t nb1, int64_t d, float * s) {
    float part[12];
    for (int64_t h = 0; h < nq; h += 3) {
        const int64_t n = nq - h < 3 ? nq - h : 3;
        switch (n) {
            case 1:
                kdot4_f16(q + h * d, 1, k, nb1, d, part);
                break;
            case 2:
                kdot4_f16(q + h * d, 2, k, nb1, d, part);
                break;
            default:
                kdot4_f16(q + h * d, 3, k, nb1, d, part);
                break;
        }
        for (int j = 0; j < 4; ++j) {
            for (int64_t x = 0; x < n; ++x) {
                s[j * nq + h + x] = part[j * n + x];
            }
        }
    }
}
PME_KDOT_ANY(kdot_q8_0)
PME_KDOT_ANY(kdot_q4_0)

PME_TARGET static void f16_to_f32_avx2(const uint16_t * x, float * y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (x + i))));
    }
    for (; i < n; ++i) {
        y[i] = _cvtsh_ss(x[i]);
    }
}

void pme_f16_to_f32(const uint16_t * x, float * y, int64_t n) {
    if (pme_has_avx2()) {
        f16_to_f32_avx2(x, y, n);
    } else {
        f16_to_f32_portable(x, y, n);
    }
}

pme_kdot4_fn pme_kdot4_pick(int type, int64_t d) {
    return pme_has_avx2() && type == GGML_TYPE_F16 && d % 8 == 0 ? kdot4_f16_any : NULL;
}

pme_kdot_fn pme_kdot_pick(int type, int64_t d) {
    if (!pme_has_avx2()) {
        return NULL;
    }
    switch (type) {
        case GGML_TYPE_F16:
            return kdot_f16_any;
        case GGML_TYPE_Q8_0:
            return d % 32 == 0 ? kdot_q8_0_any : NULL;
        case GGML_TYPE_Q4_0:
            return d % 32 == 0 ? kdot_q4_0_any : NULL;
        default:
            return NULL;
    }
}

void pme_softmax_row(float * x, int64_t n, float sink) {
    if (pme_has_avx2()) {
        softmax_row_avx2(x, n, sink);
    } else {
        pme_softmax_row_portable(x, n, sink);
    }
}
#else
void pme_f16_to_f32(const uint16_t * x, float * y, int64_t n) {
    f16_to_f32_portable(x, y, n);
}

pme_kdot4_fn pme_kdot4_pick(int type, int64_t d) {
    (void) type;
    (void) d;
    return NULL;
}

pme_kdot_fn pme_kdot_pick(int type, int64_t d) {
    (void) type;
    (void) d;
    return NULL;
}

void pme_softmax_row(float * x, int64_t n, float sink) {
    pme_softmax_row_portable(x, n, sink);
}
#endif
