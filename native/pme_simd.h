/* x86 AVX2/FMA/F16C helpers shared by the scorer's kernels (pme_kdot.c, pme_kdotq.c): PME_X86 is defined where
 * they compile, and pme_has_avx2() says at run time whether this CPU may run them. */
#ifndef PME_SIMD_H
#define PME_SIMD_H
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#    define PME_X86 1
#    include <immintrin.h>
#    define PME_TARGET __attribute__((target("avx2,fma,f16c")))

/* the sum of v's eight lanes, in the order ggml-cpu's hsum_float_8 adds them */
PME_TARGET static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s        = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s        = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int pme_has_avx2(void) {
    static int ok = -1;
    if (ok < 0) {
        __builtin_cpu_init();
        ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    }
    return ok;
}
#endif
#endif
