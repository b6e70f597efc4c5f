/* The greedy choice: the index of each row's largest float32 value, as torch's max(dim) finds it
   (the first on ties; a NaN counts as the largest, the first NaN wins). Built and loaded by
   kernels/native.py.

   Why: torch's reduction takes ~40 us over GPT-2's 50,257 logits (a scalar loop), ~1.5% of a
   batch-1 int8 decode step; 16 lanes at a time take a few. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "vector_math.h"

static int64_t argmax_row(const float *x, int64_t n) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i at = _mm512_set1_epi32(-1), lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __mmask16 nan = 0;
    int64_t k = 0;
    for (; k < n; k += 16) {  /* n < 2^31 (the caller checks): indices fit the int32 lanes */
        __mmask16 live = first16(n - k);
        __m512 v = _mm512_maskz_loadu_ps(live, x + k);
        if ((nan = _mm512_mask_cmp_ps_mask(live, v, v, _CMP_UNORD_Q))) break;
        /* strictly greater: a lane keeps its first maximum; the first index of -inf rows too */
        __mmask16 gt = _mm512_mask_cmp_ps_mask(live, v, best, _CMP_GT_OQ) | (live & _mm512_cmpeq_epi32_mask(at, _mm512_set1_epi32(-1)));
        best = _mm512_mask_mov_ps(best, gt, v);
        at = _mm512_mask_mov_epi32(at, gt, _mm512_add_epi32(lane, _mm512_set1_epi32((int)k)));
    }
    if (nan) return k + __builtin_ctz(nan);
    float top = _mm512_reduce_max_ps(best);
    __mmask16 tops = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ) & _mm512_cmpneq_epi32_mask(at, _mm512_set1_epi32(-1));
    /* the smallest index among the lanes holding the maximum */
    return _mm512_mask_reduce_min_epi32(tops, at);
}

/* out[r] = the index of row r's largest value, for M rows of n floats, `stride` floats apart. */
void gpt2kit_argmax_rows(const float *x, int64_t M, int64_t n, int64_t stride, int64_t *out) {
    for (int64_t r = 0; r < M; r++) out[r] = argmax_row(x + r * stride, n);
}
