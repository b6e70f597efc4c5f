/* The sum of squares of many float32 arrays in one parallel pass: a training step's gradient norm
   (kernels/grad_clip.py). Built and loaded by kernels/native.py.

   torch's clip_grad_norm_ takes one norm per tensor on CPU (no foreach kernel there): ~47 ms of a
   ~1.04 s bfloat16 step of GPT-2 124M at 4 x 256 tokens on 2 cores, its 496 MB of gradients read
   at ~10 GB/s. Here the arrays are cut into chunks of CHUNK elements shared out over the caller's
   OpenMP threads; each chunk is summed in 4 float32 vectors, the chunks' sums in double. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "vector_math.h"

#define CHUNK 16384

static double chunk_squares(const float *x, int64_t n) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t k = 0;
    for (; k + 64 <= n; k += 64)
        for (int j = 0; j < 4; j++) {
            __m512 v = _mm512_loadu_ps(x + k + 16 * j);
            acc[j] = _mm512_fmadd_ps(v, v, acc[j]);
        }
    for (; k < n; k += 16) {
        __m512 v = _mm512_maskz_loadu_ps(first16(n - k), x + k);
        acc[0] = _mm512_fmadd_ps(v, v, acc[0]);
    }
    return (double)_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

/* sum over the n arrays x[i] (sizes[i] floats each) of their elements' squares; -1 without memory
   for the chunks' index. */
double gpt2kit_sum_squares(const float *const *x, const int64_t *sizes, int64_t n, int threads) {
    int64_t *first = malloc((size_t)(n + 1) * sizeof(int64_t));  /* first[i]: array i's first chunk */
    if (!first) return -1.0;
    first[0] = 0;
    for (int64_t i = 0; i < n; i++) first[i + 1] = first[i] + (sizes[i] + CHUNK - 1) / CHUNK;
    double total = 0.0;
    #pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : total)
    for (int64_t c = 0; c < first[n]; c++) {
        int64_t lo = 0, hi = n - 1;  /* the array holding chunk c: the last i with first[i] <= c */
        while (lo < hi) {
            int64_t mid = (lo + hi + 1) / 2;
            if (first[mid] <= c) lo = mid; else hi = mid - 1;
        }
        int64_t at = (c - first[lo]) * CHUNK, left = sizes[lo] - at;
        total += chunk_squares(x[lo] + at, left < CHUNK ? left : CHUNK);
    }
    free(first);
    return total;
}
