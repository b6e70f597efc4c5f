/* Dropout masks for bfloat16 training (kernels/bf16_training.py: keep_bits), AVX512. Built and
   loaded by kernels/native.py.

   The mask of a (8, 12, 1024, 1024) attention is 100M int16 words; torch's random_ filled their
   random bits on one thread and three more int16 passes turned them into -1/0: ~45 ms a layer,
   a sixth of a bfloat16 training step at 8 x 1024 tokens. Here the bits come from the
   counter-based generator of counter_rng.h, 32 mask lanes at a time on the caller's OpenMP
   threads: the same lanes, threshold and arithmetic as keep_bits' torch path, from a different
   stream of bits. The seed is one draw from torch's global generator, so a run's masks follow its
   (checkpointed) RNG state. */
#include <immintrin.h>
#include <stdint.h>

#include "counter_rng.h"
#include "vector_math.h"

/* out (n int16): -1 where kept, 0 where dropped (counter_rng.h's element i of the stream for
   `seed`). */
void gpt2kit_keep_bits(int16_t *out, int64_t n, uint64_t seed, int16_t threshold, int threads) {
    const int64_t chunk = 32;  /* int16 lanes per vector: 8 words of 4 */
    int64_t vectors = (n + chunk - 1) / chunk;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < vectors; i++) {
        __m512i keep = _mm512_movm_epi16(kept32(seed, i * 8, threshold));
        int64_t left = n - i * chunk;
        if (left >= chunk) {
            _mm512_storeu_si512(out + i * chunk, keep);
        } else {
            _mm512_mask_storeu_epi16(out + i * chunk, (__mmask32)((1ULL << left) - 1), keep);
        }
    }
}

/* Residual dropout in bfloat16 training (bf16_training.py: WideningDropout), its mask never
   stored: the mask gpt2kit_keep_bits draws for `seed`, made again from the seed in the backward
   pass. One pass either way: widen, bfloat16 x -> float32 out (the forward: the branch's output
   for the float32 residual stream, where torch took the mask's AND, the scaling and the add's
   conversion), else float32 x -> bfloat16 out rounded once (the backward, from the stream's
   gradient); out = x * scale where kept, 0 where dropped. */
static void dropout_pass(const void *x, void *out, int64_t n, uint64_t seed, int16_t threshold, float scale,
                         int widen, int threads) {
    int64_t vectors = (n + 31) / 32;
    __m512 s = _mm512_set1_ps(scale);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < vectors; i++) {
        __mmask32 keep = kept32(seed, i * 8, threshold);
        for (int h = 0; h < 2; h++) {
            int64_t at = i * 32 + h * 16;
            __mmask16 m = first16(n - at), kept = (__mmask16)(keep >> (16 * h));
            if (widen)
                _mm512_mask_storeu_ps((float *)out + at, m,
                                      _mm512_maskz_mul_ps(kept, widen_bf16((const uint16_t *)x + at, m), s));
            else
                _mm256_mask_storeu_epi16((uint16_t *)out + at, m,
                                         round_bf16(_mm512_maskz_mul_ps(kept, _mm512_maskz_loadu_ps(m, (const float *)x + at), s)));
        }
    }
}

void gpt2kit_dropout_widen(const uint16_t *x, float *out, int64_t n, uint64_t seed, int16_t threshold, float scale,
                           int threads) {
    dropout_pass(x, out, n, seed, threshold, scale, 1, threads);
}

void gpt2kit_dropout_narrow(const float *g, uint16_t *out, int64_t n, uint64_t seed, int16_t threshold, float scale,
                            int threads) {
    dropout_pass(g, out, n, seed, threshold, scale, 0, threads);
}
