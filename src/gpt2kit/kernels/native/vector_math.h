/* Vector math shared by the kernels of kernels/native (AVX512, 16 floats at a time). Part of every
   including file's build key (native.py). */
#ifndef GPT2KIT_VECTOR_MATH_H
#define GPT2KIT_VECTOR_MATH_H
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Lanes 0..n-1 of 16 (none for n <= 0). */
static inline __mmask16 first16(int64_t n) {
    return n <= 0 ? 0 : n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
}

/* Software prefetch of the cache lines of `bytes` bytes from `at` (for passes reading several
   streams at once, whose lines the hardware prefetchers fetched too late). */
static inline void prefetch(const void *at, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch((const char *)at + o, _MM_HINT_T0);
}

/* 16 bfloat16 values (lanes outside m zero) widened to float32, exactly: their bits the high half. */
static inline __m512 widen_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* float32 -> bfloat16, nearest even, as Tensor.to(torch.bfloat16) rounds (NaN: 0x7FC0), without
   AVX512-BF16: (u + 0x7FFF + bit 16 of u) >> 16. */
static inline __m256i round_bf16(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
}

/* e^x by range reduction and a polynomial (Cephes' expf, ~1 ulp); below -87 as e^-87; +inf above ~88. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* GPT-2's tanh GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), with tanh(u) written as
   1 - 2 / (1 + e^(2u)) (exact at both ends: e^(2u) -> +inf gives 1, -> 0 gives -1); within ~1e-6
   of torch's. */
static inline __m512 gelu16(__m512 x) {
    __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                             _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x), _mm512_mul_ps(x, x), x));
    __m512 e = exp16(_mm512_add_ps(u, u));
    __m512 t = _mm512_sub_ps(_mm512_set1_ps(1.0f), _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.0f), t));
}

/* LayerNorm of one row x (K floats) into y: (x - mean) / sqrt(var + eps) * g + b, mean and (biased)
   variance in float32 over two passes, as torch's CPU kernel computes them (within ~1e-6);
   row_moments gives the mean and 1 / sqrt(var + eps). */
static inline void row_moments(const float *x, int64_t K, float eps, float *mean, float *rstd) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(first16(K - k), x + k));
    __m512 mu = _mm512_set1_ps(_mm512_reduce_add_ps(acc) / (float)K);
    acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 m = first16(K - k);
        __m512 d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, x + k), mu);
        acc = _mm512_fmadd_ps(d, d, acc);
    }
    *mean = _mm512_cvtss_f32(mu);
    *rstd = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)K + eps);
}

static inline void layer_norm_row(const float *x, const float *g, const float *b, float eps, float *y, int64_t K) {
    float mu, r;
    row_moments(x, K, eps, &mu, &r);
    __m512 mean = _mm512_set1_ps(mu), rstd = _mm512_set1_ps(r);
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 m = first16(K - k);
        __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + k), mean), rstd);
        _mm512_mask_storeu_ps(y + k, m, _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(m, g + k), _mm512_maskz_loadu_ps(m, b + k)));
    }
}

/* x (M, K) through a LayerNorm (weight g, bias b; none if g is NULL): x itself, or a new buffer the
   caller frees (*owned), NULL if there was no memory. */
static inline const float *layer_norm_rows(const float *x, const float *g, const float *b, float eps, int64_t M,
                                           int64_t K, float **owned) {
    *owned = NULL;
    if (!g) return x;
    float *y = malloc((size_t)(M * K) * sizeof(float));
    if (!y) return NULL;
    for (int64_t m = 0; m < M; m++) layer_norm_row(x + m * K, g, b, eps, y + m * K, K);
    *owned = y;
    return y;
}

#endif
