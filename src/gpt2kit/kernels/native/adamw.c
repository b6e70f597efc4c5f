/* One AdamW step over all of a model's float32 parameters in one parallel pass, reading float32 or
   bfloat16 gradients and writing, beside each updated parameter, its bfloat16 copy for the next
   forward pass (kernels/master_adamw.py; the copies: kernels/half_copies.py). Built and loaded by
   kernels/native.py.

   Why: a bfloat16 CPU training step otherwise casts every weight matrix to bfloat16 in its
   forward pass and every bfloat16 weight gradient to float32 for the optimizer (GPT-2 124M at
   4 x 256 tokens on 2 cores: ~75 ms of a ~0.8 s step, ~9%), two more passes over memory around
   torch's fused AdamW (~100 ms, memory-bound). Here the step reads the bfloat16 gradient as it
   is and writes the copy as it writes the parameter: 28 bytes a matrix element instead of 40.

   The arithmetic is torch's fused CPU AdamW's vector path, operation for operation as torch 2.13's
   build runs it (fused multiply-adds in the lerp and the second moment, IEEE division and square
   root; tests/test_master_adamw.py compares the bits), so a float32 gradient gives the same bits as torch.optim.AdamW(
   fused=True); a bfloat16 gradient the bits of its float32 cast. The copy is the parameter
   rounded to nearest even, as Tensor.to(torch.bfloat16) rounds it (NaN to 0x7FC0). */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "chunks.h"
#include "vector_math.h"

#define CHUNK 16384

/* Per tensor: float(1 - lr * weight_decay) (exactly 1 without decay), float(-lr / bias
   correction 1), float(sqrt(bias correction 2)), each computed in double as torch does. */
typedef struct { float decay, neg_step, correction2; } Coefficients;

/* Software prefetch: with four streams read per thread the hardware prefetchers left bandwidth
   unused (the native step of GPT-2 124M's parameters on 2 cores: ~82 -> ~70 ms, 512 elements
   ahead the best of 256-2048). */
#define AHEAD 512

static inline __m512 load_grad(const void *g, int bf16, int64_t k, __mmask16 m) {
    return bf16 ? widen_bf16((const uint16_t *)g + k, m) : _mm512_maskz_loadu_ps(m, (const float *)g + k);
}

static void chunk_step(float *p, const void *g, int bf16, float *m, float *v, uint16_t *copy, int64_t n,
                       Coefficients c, float lerp, float beta2, float sq_coefficient, float eps, float scale) {
    /* exp_avg.lerp_(grad, 1 - beta1) as torch's vector path: weight w < 0.5: m + w (g - m), else g + (w - 1)(g - m) */
    int small = lerp < 0.5f;
    __m512 weight = _mm512_set1_ps(small ? lerp : lerp - 1.0f);
    int64_t size = bf16 ? 2 : 4;  /* a gradient element's bytes */
    for (int64_t k = 0; k < n; k += 16) {
        __mmask16 mask = first16(n - k);
        if ((k & 63) == 0 && k + AHEAD < n) {  /* each stream's next 64 elements, AHEAD on */
            prefetch(p + k + AHEAD, 256);
            prefetch(m + k + AHEAD, 256);
            prefetch(v + k + AHEAD, 256);
            prefetch((const char *)g + (k + AHEAD) * size, 64 * size);
        }
        __m512 param = _mm512_maskz_loadu_ps(mask, p + k), grad = load_grad(g, bf16, k, mask);
        if (scale != 1.0f) {
            grad = _mm512_div_ps(grad, _mm512_set1_ps(scale));
            if (!bf16) _mm512_mask_storeu_ps((float *)g + k, mask, grad);  /* as torch leaves them */
        }
        if (c.decay != 1.0f) param = _mm512_mul_ps(param, _mm512_set1_ps(c.decay));
        __m512 avg = _mm512_maskz_loadu_ps(mask, m + k);
        avg = _mm512_fmadd_ps(weight, _mm512_sub_ps(grad, avg), small ? avg : grad);
        /* v beta2 + (1 - beta2) g g: torch's build contracts it to fma((1 - beta2) g, g, v beta2) */
        __m512 sq = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(sq_coefficient), grad), grad,
                                    _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, v + k), _mm512_set1_ps(beta2)));
        _mm512_mask_storeu_ps(m + k, mask, avg);
        _mm512_mask_storeu_ps(v + k, mask, sq);
        __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(sq), _mm512_set1_ps(c.correction2)),
                                     _mm512_set1_ps(eps));
        param = _mm512_add_ps(param, _mm512_div_ps(_mm512_mul_ps(_mm512_set1_ps(c.neg_step), avg), denom));
        _mm512_mask_storeu_ps(p + k, mask, param);
        if (!copy) continue;
        if (mask == 0xFFFF && ((uintptr_t)(copy + k) & 31) == 0)  /* write-only: no line read first */
            _mm256_stream_si256((__m256i *)(copy + k), round_bf16(param));
        else
            _mm256_mask_storeu_epi16(copy + k, mask, round_bf16(param));
    }
}

/* The step for n tensors: param[i] (sizes[i] floats), grad[i] (bfloat16 where grad_bf16[i], else
   float32), exp_avg[i], exp_avg_sq[i] (float32), copy[i] (bfloat16, or NULL: none), coefficients
   c[i]; lerp = 1 - beta1, sq_coefficient = 1 - beta2 (as floats); scale: every gradient divided by
   it as it is read (1: none; the clipping factor's inverse, torch's grad_scale), float32 ones
   written back divided. Returns 0, or -1 without memory for the chunks' index (nothing written). */
int gpt2kit_adamw(float *const *param, const void *const *grad, const uint8_t *grad_bf16, float *const *exp_avg,
                  float *const *exp_avg_sq, uint16_t *const *copy, const int64_t *sizes, const float *c, int64_t n,
                  float lerp, float beta2, float sq_coefficient, float eps, float scale, int threads) {
    int64_t *first = chunk_starts(sizes, n, CHUNK);
    if (!first) return -1;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static) nowait
        for (int64_t k = 0; k < first[n]; k++) {
            int64_t i = chunk_array(first, n, k);
            int64_t at = (k - first[i]) * CHUNK, left = sizes[i] - at;
            const char *g = (const char *)grad[i] + at * (grad_bf16[i] ? 2 : 4);
            Coefficients ci = {c[3 * i], c[3 * i + 1], c[3 * i + 2]};
            chunk_step(param[i] + at, g, grad_bf16[i], exp_avg[i] + at, exp_avg_sq[i] + at,
                       copy[i] ? copy[i] + at : NULL, left < CHUNK ? left : CHUNK, ci, lerp, beta2, sq_coefficient,
                       eps, scale);
        }
        _mm_sfence();  /* this thread's streamed copies visible before the next forward reads them */
    }
    free(first);
    return 0;
}
