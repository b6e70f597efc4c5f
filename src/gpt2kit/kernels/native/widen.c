/* bfloat16 -> float32 times a scale, in one parallel pass: the LM head's weight gradient, made in
   bfloat16 by the fused head + loss and scaled by the loss's upstream gradient in the backward
   pass (kernels/fused_loss.py). Built and loaded by kernels/native.py.

   torch takes two passes for it (the cast, then an in-place multiply) over a 154 MB float32
   result for GPT-2's head; measured inside a 4 x 256 bfloat16 step on 2 cores, 20-30 ms of a
   ~0.75 s step. Here each element is read once, widened exactly (its bits the float32's high
   half), multiplied in float32 (the bits of x.float() * scale) and written with streamed stores
   (the result is write-only: no line is read first). */
#include <immintrin.h>
#include <stdint.h>

#include "vector_math.h"

#define BLOCK 16384

/* out[i] = float(x[i]) * scale for n elements. */
void gpt2kit_widen_scaled(const uint16_t *x, float *out, int64_t n, float scale, int threads) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    __m512 s = _mm512_set1_ps(scale);
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static) nowait
        for (int64_t b = 0; b < blocks; b++) {
            int64_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
            for (int64_t k = b * BLOCK; k < end; k += 16) {
                __mmask16 m = first16(end - k);
                __m512 y = _mm512_mul_ps(widen_bf16(x + k, m), s);
                if (m == 0xFFFF && ((uintptr_t)(out + k) & 63) == 0)
                    _mm512_stream_ps(out + k, y);
                else
                    _mm512_mask_storeu_ps(out + k, m, y);
            }
        }
        _mm_sfence();  /* this thread's streamed stores visible before the caller reads out */
    }
}
