/* LayerNorm of bfloat16 training (kernels/bf16_training.py: NarrowingLayerNorm): the float32
   residual stream in, bfloat16 out for the products after it, and back. Built and loaded by
   kernels/native.py.

   Under autocast torch's LayerNorm writes float32, which the next product's autocast then casts
   to bfloat16, and the backward pass casts the product's bfloat16 gradient back to float32 for
   LayerNorm's backward: ~0.8-0.95 ms per LayerNorm of 4 x 256 x 768 on 2 cores, forward and
   backward, 24 of them in a step of GPT-2 124M. Here each direction is one pass over rows:
   forward y = (x - mean) rstd g + b rounded to bfloat16 (mean and rstd kept), backward
   dx = rstd (a - mean(a) - xhat mean(a xhat)) for a = dy g, xhat = (x - mean) rstd, with the
   gain's and bias's gradients summed over rows per thread, then over threads. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vector_math.h"

int omp_get_thread_num(void);  /* the OpenMP runtime torch loaded (native.py links it) */

/* y (M, K) bfloat16 from x (M, K) float32, weight g and bias b (K); mean, rstd (M) written. */
void gpt2kit_layer_norm_bf16(const float *x, const float *g, const float *b, float eps, uint16_t *y, float *mean,
                             float *rstd, int64_t M, int64_t K, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < M; r++) {
        const float *row = x + r * K;
        row_moments(row, K, eps, mean + r, rstd + r);
        __m512 mu = _mm512_set1_ps(mean[r]), rs = _mm512_set1_ps(rstd[r]);
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 m = first16(K - k);
            __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + k), mu), rs);
            __m512 v = _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(m, g + k), _mm512_maskz_loadu_ps(m, b + k));
            _mm256_mask_storeu_epi16(y + r * K + k, m, round_bf16(v));
        }
    }
}

/* dx (M, K) float32 from dy (M, K) bfloat16 and the forward's x, g, mean, rstd; dg, db (K): the
   gain's and bias's gradients. Returns 0, or -1 without memory for the per-thread sums (nothing
   written). */
int gpt2kit_layer_norm_bf16_backward(const uint16_t *dy, const float *x, const float *g, const float *mean,
                                     const float *rstd, float *dx, float *dg, float *db, int64_t M, int64_t K,
                                     int threads) {
    float *sums = calloc((size_t)threads * 2 * (size_t)K, sizeof(float));  /* per thread: dg, db */
    if (!sums) return -1;
    #pragma omp parallel num_threads(threads)
    {
        float *tg = sums + (size_t)omp_get_thread_num() * 2 * (size_t)K, *tb = tg + K;
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < M; r++) {
            const float *row = x + r * K;
            const uint16_t *grow = dy + r * K;
            __m512 mu = _mm512_set1_ps(mean[r]), rs = _mm512_set1_ps(rstd[r]);
            __m512 s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps();  /* sum a xhat, sum a */
            for (int64_t k = 0; k < K; k += 16) {
                __mmask16 m = first16(K - k);
                __m512 xhat = _mm512_maskz_mul_ps(m, _mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + k), mu), rs);
                __m512 d = widen_bf16(grow + k, m);
                __m512 a = _mm512_mul_ps(d, _mm512_maskz_loadu_ps(m, g + k));
                s1 = _mm512_fmadd_ps(a, xhat, s1);
                s2 = _mm512_add_ps(s2, a);
                _mm512_mask_storeu_ps(tg + k, m, _mm512_fmadd_ps(d, xhat, _mm512_maskz_loadu_ps(m, tg + k)));
                _mm512_mask_storeu_ps(tb + k, m, _mm512_add_ps(d, _mm512_maskz_loadu_ps(m, tb + k)));
            }
            __m512 c1 = _mm512_set1_ps(_mm512_reduce_add_ps(s1) / (float)K);
            __m512 c2 = _mm512_set1_ps(_mm512_reduce_add_ps(s2) / (float)K);
            for (int64_t k = 0; k < K; k += 16) {
                __mmask16 m = first16(K - k);
                __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + k), mu), rs);
                __m512 a = _mm512_mul_ps(widen_bf16(grow + k, m), _mm512_maskz_loadu_ps(m, g + k));
                __m512 v = _mm512_fnmadd_ps(xhat, c1, _mm512_sub_ps(a, c2));
                _mm512_mask_storeu_ps(dx + r * K + k, m, _mm512_mul_ps(v, rs));
            }
        }
    }
    memset(dg, 0, (size_t)K * sizeof(float));
    memset(db, 0, (size_t)K * sizeof(float));
    for (int t = 0; t < threads; t++)  /* in thread order: the same sums for the same thread count */
        for (int64_t k = 0; k < K; k++) {
            dg[k] += sums[(size_t)t * 2 * K + k];
            db[k] += sums[(size_t)t * 2 * K + K + k];
        }
    free(sums);
    return 0;
}
