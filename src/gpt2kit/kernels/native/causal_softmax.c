/* Causal softmax over bfloat16 attention scores, forward and backward, in place (bfloat16
   training: kernels/bf16_training.py's CausalDropoutAttention). Built and loaded by
   kernels/native.py.

   Row t of a (T, T) block of scores only has slots 0..t; torch made the causal mask part of the
   scores (a (T, T) bias copied into every head's block before the product) and then ran its
   softmax and softmax backward over whole rows: ~100 ms a layer at 8 x 1024 tokens. Here each row
   is read up to its diagonal only, the rest written as zeros; sums in float32, the exp of
   vector_math.h, results rounded to bfloat16 to nearest even. Rows are split over the caller's
   OpenMP threads.

   Dropout on the probabilities is applied here too: the forward pass writes the kept
   probabilities beside the probabilities, its mask drawn inline (counter_rng.h: the same bits
   keep_bits would give the (R, T) tensor for that seed and threshold), and the backward pass
   zeroes the gradient where they are 0. So no mask tensor is written, read or kept: at 8 x 1024
   tokens the mask's own passes (made, then three bit-ANDs) were ~0.9 s of a 7.6 s step. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "counter_rng.h"
#include "vector_math.h"

static inline __m512 load_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline void store_bf16(uint16_t *p, __mmask16 m, __m512 x) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(x));
}

/* The largest of scale * x[0..n-1] (bfloat16) in *top, and the sum of their exps less it, in
   float32; each exp also stored in e[0..n) unless e is NULL (then the caller makes them again). */
static inline float exp_sum(const uint16_t *x, int64_t n, float scale, float *top, float *e) {
    __m512 big = _mm512_set1_ps(-INFINITY), sc = _mm512_set1_ps(scale);
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 m = first16(n - j);
        big = _mm512_mask_max_ps(big, m, big, _mm512_mul_ps(load_bf16(x + j, m), sc));
    }
    *top = _mm512_reduce_max_ps(big);
    __m512 mx = _mm512_set1_ps(*top), total = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 m = first16(n - j);
        __m512 v = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_mul_ps(load_bf16(x + j, m), sc), mx)));
        if (e) _mm512_mask_storeu_ps(e + j, m, v);
        total = _mm512_add_ps(total, v);
    }
    return _mm512_reduce_add_ps(total);
}

/* s (R, T) bfloat16 scores of blocks of T rows (row r is query r % T): each row r replaced by
   softmax(scale * s[r, 0..t]) over t = r % T and zeros beyond. If `kept` is not NULL, it (R, T)
   gets the same probabilities times `kept_scale` (dropout's 1 / (1 - p)) where counter_rng.h's
   mask for `seed` and `threshold` keeps them, 0 elsewhere. */
void gpt2kit_causal_softmax(uint16_t *s, uint16_t *kept, int64_t R, int64_t T, float scale, uint64_t seed,
                            int16_t threshold, float kept_scale, int threads) {
    __m512 ks = _mm512_set1_ps(kept_scale);
    #pragma omp parallel num_threads(threads)
    {
        float *e = malloc((size_t)T * sizeof(float));  /* a row's exps, made once (NULL: twice) */
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {
            uint16_t *row = s + r * T;
            int64_t n = r % T + 1;
            float top, total = exp_sum(row, n, scale, &top, e);
            __m512 mx = _mm512_set1_ps(top), sc = _mm512_set1_ps(scale), inv = _mm512_set1_ps(1.0f / total);
            for (int64_t j = 0; j < T; j += 16) {
                __mmask16 live = first16(n - j), all = first16(T - j);
                __m512 x = e ? _mm512_maskz_loadu_ps(live, e + j)
                             : exp16(_mm512_sub_ps(_mm512_mul_ps(load_bf16(row + j, live), sc), mx));
                __m512 p = _mm512_maskz_mov_ps(live, _mm512_mul_ps(x, inv));
                store_bf16(row + j, all, p);
                if (kept)
                    store_bf16(kept + r * T + j, all, _mm512_maskz_mul_ps(live ? kept16(seed, r * T + j, threshold) : 0, p, ks));
            }
        }
        free(e);
    }
}

/* z (R, N) bfloat16 logits, each row replaced by its softmax, and lse[r] = its logsumexp in
   float32: the fused LM head's loss (kernels/fused_loss.py: softmax_), where torch took a float32
   copy of each block of rows and five more passes over it (~10% of a 4 x 256 training step). */
void gpt2kit_softmax_rows(uint16_t *z, float *lse, int64_t R, int64_t N, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        /* a row's exps, made once (~200 KB at GPT-2's vocabulary, in L2; NULL: made twice) */
        float *e = malloc((size_t)N * sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {
            uint16_t *row = z + r * N;
            float top, total = exp_sum(row, N, 1.0f, &top, e);
            __m512 mx = _mm512_set1_ps(top), inv = _mm512_set1_ps(1.0f / total);
            for (int64_t j = 0; j < N; j += 16) {
                __mmask16 m = first16(N - j);
                __m512 x = e ? _mm512_maskz_loadu_ps(m, e + j) : exp16(_mm512_sub_ps(load_bf16(row + j, m), mx));
                store_bf16(row + j, m, _mm512_mul_ps(x, inv));
            }
            lse[r] = logf(total) + top;
        }
        free(e);
    }
}

/* g (R, T) bfloat16, the gradient of the probabilities p (R, T) of gpt2kit_causal_softmax,
   replaced by the gradient of the scaled scores' softmax input: p * (g - sum(g * p)) up to the
   diagonal, zeros beyond (times `scale`, the scores' scale, if not 1). If `kept` (the forward
   pass's kept probabilities) is not NULL, g is the gradient of those instead: taken as 0 where
   they are 0 (dropped; where a kept probability is 0 itself, p is too, so g there counts for
   nothing either way). */
void gpt2kit_causal_softmax_backward(uint16_t *g, const uint16_t *p, const uint16_t *kept, int64_t R, int64_t T,
                                     float scale, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < R; r++) {
        uint16_t *gr = g + r * T;
        const uint16_t *pr = p + r * T;
        int64_t n = r % T + 1;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            __mmask16 m = first16(n - j);
            if (kept)  /* bfloat16 0 and -0 are the only words with no bits but the sign */
                m = _mm256_mask_test_epi16_mask(m, _mm256_maskz_loadu_epi16(m, kept + r * T + j), _mm256_set1_epi16(0x7FFF));
            acc = _mm512_fmadd_ps(load_bf16(gr + j, m), load_bf16(pr + j, m), acc);
        }
        __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(acc)), sc = _mm512_set1_ps(scale);
        for (int64_t j = 0; j < T; j += 16) {
            __mmask16 live = first16(n - j), all = first16(T - j), g_live = live;
            if (kept)
                g_live = _mm256_mask_test_epi16_mask(live, _mm256_maskz_loadu_epi16(live, kept + r * T + j), _mm256_set1_epi16(0x7FFF));
            __m512 d = _mm512_mul_ps(_mm512_mul_ps(load_bf16(pr + j, live), _mm512_sub_ps(load_bf16(gr + j, g_live), dot)), sc);
            store_bf16(gr + j, all, _mm512_maskz_mov_ps(live, d));
        }
    }
}
