/* The sum of squares of many float32 or bfloat16 arrays in one parallel pass: a training step's
   gradient norm (kernels/grad_clip.py; bfloat16: the gradients of kernels/half_copies.py's
   copies). Built and loaded by kernels/native.py.

   torch's clip_grad_norm_ takes one norm per tensor on CPU (no foreach kernel there): ~47 ms of a
   ~1.04 s bfloat16 step of GPT-2 124M at 4 x 256 tokens on 2 cores, its 496 MB of gradients read
   at ~10 GB/s. Here the arrays are cut into chunks of CHUNK elements shared out over the caller's
   OpenMP threads (chunks.h); each chunk is summed in 4 float32 vectors, the chunks' sums in double. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "chunks.h"
#include "vector_math.h"

#define CHUNK 16384

/* 16 elements from k on (lanes past n zero), float32 or bfloat16. */
static inline __m512 load16(const void *x, int bf16, int64_t k, int64_t n) {
    __mmask16 m = first16(n - k);
    return bf16 ? widen_bf16((const uint16_t *)x + k, m) : _mm512_maskz_loadu_ps(m, (const float *)x + k);
}

/* Software prefetch, AHEAD elements on: the hardware prefetchers alone read the gradients at
   ~19 GB/s on 2 cores (GPT-2 124M's ~330 MB: 17-18 -> ~13 ms; 512 to 4,096 ahead ran alike). */
#define AHEAD 1024

static double chunk_squares(const void *x, int bf16, int64_t n) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t k = 0, size = bf16 ? 2 : 4;
    for (; k + 64 <= n; k += 64) {
        if (k + AHEAD + 64 <= n) prefetch((const char *)x + (k + AHEAD) * size, 64 * size);
        for (int j = 0; j < 4; j++) {
            __m512 v = bf16 ? widen_bf16((const uint16_t *)x + k + 16 * j, 0xFFFF) : _mm512_loadu_ps((const float *)x + k + 16 * j);
            acc[j] = _mm512_fmadd_ps(v, v, acc[j]);
        }
    }
    for (; k < n; k += 16) {
        __m512 v = load16(x, bf16, k, n);
        acc[0] = _mm512_fmadd_ps(v, v, acc[0]);
    }
    return (double)_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

/* sum over the n arrays x[i] (sizes[i] elements each, bfloat16 where bf16[i], else float32) of
   their elements' squares; -1 without memory for the chunks' index. */
double gpt2kit_sum_squares(const void *const *x, const uint8_t *bf16, const int64_t *sizes, int64_t n, int threads) {
    int64_t *first = chunk_starts(sizes, n, CHUNK);
    if (!first) return -1.0;
    double total = 0.0;
    #pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : total)
    for (int64_t c = 0; c < first[n]; c++) {
        int64_t i = chunk_array(first, n, c);
        int64_t at = (c - first[i]) * CHUNK, left = sizes[i] - at;
        const char *base = (const char *)x[i] + at * (bf16[i] ? 2 : 4);
        total += chunk_squares(base, bf16[i], left < CHUNK ? left : CHUNK);
    }
    free(first);
    return total;
}
