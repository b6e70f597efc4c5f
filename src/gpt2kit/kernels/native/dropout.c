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
