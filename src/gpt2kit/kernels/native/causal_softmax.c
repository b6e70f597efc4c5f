/* Causal softmax over bfloat16 attention scores, forward and backward, in place (bfloat16
   training: kernels/bf16_training.py's CausalDropoutAttention). Built and loaded by
   kernels/native.py.

   Row t of a (T, T) block of scores only has slots 0..t; torch made the causal mask part of the
   scores (a (T, T) bias copied into every head's block before the product) and then ran its
   softmax and softmax backward over whole rows: ~100 ms a layer at 8 x 1024 tokens. Here each row
   is read up to its diagonal only, the rest written as zeros; sums in float32, the exp of
   vector_math.h, results rounded to bfloat16 to nearest even. Rows are split over the caller's
   OpenMP threads. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "vector_math.h"

static inline __m512 load_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline void store_bf16(uint16_t *p, __mmask16 m, __m512 x) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(x));
}

/* s (R, T) bfloat16 scores of blocks of T rows (row r is query r % T): each row r replaced by
   softmax(scale * s[r, 0..t]) over t = r % T and zeros beyond. */
void gpt2kit_causal_softmax(uint16_t *s, int64_t R, int64_t T, float scale, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < R; r++) {
        uint16_t *row = s + r * T;
        int64_t n = r % T + 1;
        __m512 top = _mm512_set1_ps(-INFINITY), sc = _mm512_set1_ps(scale);
        for (int64_t j = 0; j < n; j += 16) {
            __mmask16 m = first16(n - j);
            top = _mm512_mask_max_ps(top, m, top, _mm512_mul_ps(load_bf16(row + j, m), sc));
        }
        __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(top)), total = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {  /* the exps summed here, made again below (cheaper than a float32 row) */
            __mmask16 m = first16(n - j);
            total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_mul_ps(load_bf16(row + j, m), sc), mx))));
        }
        __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
        for (int64_t j = 0; j < T; j += 16) {
            __mmask16 live = first16(n - j), all = first16(T - j);
            __m512 p = _mm512_mul_ps(exp16(_mm512_sub_ps(_mm512_mul_ps(load_bf16(row + j, live), sc), mx)), inv);
            store_bf16(row + j, all, _mm512_maskz_mov_ps(live, p));
        }
    }
}

/* g (R, T) bfloat16, the gradient of the probabilities p (R, T) of gpt2kit_causal_softmax,
   replaced by the gradient of the scaled scores' softmax input: p * (g - sum(g * p)) up to the
   diagonal, zeros beyond (times `scale`, the scores' scale, if not 1). */
void gpt2kit_causal_softmax_backward(uint16_t *g, const uint16_t *p, int64_t R, int64_t T, float scale,
                                     int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < R; r++) {
        uint16_t *gr = g + r * T;
        const uint16_t *pr = p + r * T;
        int64_t n = r % T + 1;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            __mmask16 m = first16(n - j);
            acc = _mm512_fmadd_ps(load_bf16(gr + j, m), load_bf16(pr + j, m), acc);
        }
        __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(acc)), sc = _mm512_set1_ps(scale);
        for (int64_t j = 0; j < T; j += 16) {
            __mmask16 live = first16(n - j), all = first16(T - j);
            __m512 d = _mm512_mul_ps(_mm512_mul_ps(load_bf16(pr + j, live), _mm512_sub_ps(load_bf16(gr + j, live), dot)), sc);
            store_bf16(gr + j, all, _mm512_maskz_mov_ps(live, d));
        }
    }
}
