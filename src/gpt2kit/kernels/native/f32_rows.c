/* float32 products for a few rows (decode), AVX512. Built and loaded by kernels/native.py.

   Decoding reads every weight once per step: its speed is the speed the weights stream from
   memory. The weight is read in its plain (N, K) layout, 8 rows side by side, and each vector of
   weights loaded serves up to 3 rows of x (one accumulator per weight row and x row); the 8
   accumulators of an x row are summed across lanes by a transpose at the end. Weight rows are
   split over the caller's OpenMP threads (torch's runtime: see native.py). */
#include <immintrin.h>
#include <stdint.h>

#include "vector_math.h"

/* Bytes ahead of each weight row's reads to prefetch (one thread, GPT-2 124M's products: a few
   percent; more for 2-byte weights, which a bfloat16 variant of this loop showed: 18%). */
#ifndef PREFETCH
#define PREFETCH 256
#endif

/* Transpose-and-add steps: 8 accumulators (16 lanes each) -> 8 row sums in lanes 0-7. */
static inline __m512 pair(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
}
static inline __m512 quad(__m512 a, __m512 b) {
    __m512d x = _mm512_castps_pd(a), y = _mm512_castps_pd(b);
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
}
static inline __m512 lanes(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}
static inline __m512 sums8(const __m512 *acc) {
    __m512 f = lanes(quad(pair(acc[0], acc[1]), pair(acc[2], acc[3])), quad(pair(acc[4], acc[5]), pair(acc[6], acc[7])));
    return lanes(f, f);
}

/* Weight rows n0..n0+7 (pointers past N clamped to row N-1, their sums discarded) times T (<= 3,
   a constant after inlining) rows of x: row sums of x row t in lanes 0-7 of out[t]. */
static inline __attribute__((always_inline)) void rows8(const float *x, int T, const float *w, int64_t n0,
                                                        int64_t N, int64_t K, __m512 *out) {
    __m512 acc[3][8];
    const float *row[8];
    for (int r = 0; r < 8; r++) {
        row[r] = w + (n0 + r < N ? n0 + r : N - 1) * K;
        for (int t = 0; t < T; t++) acc[t][r] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 m = first16(K - k);
        __m512 xv[3];
        for (int t = 0; t < T; t++) xv[t] = _mm512_maskz_loadu_ps(m, x + t * K + k);
        for (int r = 0; r < 8; r++) {
            _mm_prefetch((const char *)(row[r] + k) + PREFETCH, _MM_HINT_T0);
            __m512 wv = _mm512_maskz_loadu_ps(m, row[r] + k);
            for (int t = 0; t < T; t++) acc[t][r] = _mm512_fmadd_ps(wv, xv[t], acc[t][r]);
        }
    }
    for (int t = 0; t < T; t++) out[t] = sums8(acc[t]);
}

/* out (M, N) = x (M, K), through a LayerNorm first if ln_w is not NULL, times w (N, K) transposed,
   plus bias (or NULL), through GPT-2's GELU if `gelu`. Returns 0, or -1 without memory for the
   normalized rows. */
int gpt2kit_f32_rows(const float *x, const float *ln_w, const float *ln_b, float eps, const float *w,
                     const float *bias, float *out, int64_t M, int64_t N, int64_t K, int gelu, int threads) {
    float *owned;
    if (!(x = layer_norm_rows(x, ln_w, ln_b, eps, M, K, &owned))) return -1;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < (N + 7) / 8; blk++) {
        int64_t n0 = blk * 8;
        __mmask16 valid = first16(N - n0 < 8 ? N - n0 : 8);
        __m512 b = bias ? _mm512_maskz_loadu_ps(valid, bias + n0) : _mm512_setzero_ps();
        __m512 sums[3];
        for (int64_t m = 0; m < M;) {
            int T = M - m >= 3 ? 3 : (int)(M - m);
            if (T == 3) rows8(x + m * K, 3, w, n0, N, K, sums);
            else if (T == 2) rows8(x + m * K, 2, w, n0, N, K, sums);
            else rows8(x + m * K, 1, w, n0, N, K, sums);
            for (int t = 0; t < T; t++, m++) {
                __m512 y = _mm512_add_ps(sums[t], b);
                _mm512_mask_storeu_ps(out + m * N + n0, valid, gelu ? gelu16(y) : y);
            }
        }
    }
    free(owned);
    return 0;
}
