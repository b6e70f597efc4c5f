/* Dropout masks for bfloat16 training (kernels/bf16_training.py: keep_bits), AVX512. Built and
   loaded by kernels/native.py.

   The mask of a (8, 12, 1024, 1024) attention is 100M int16 words; torch's random_ filled their
   random bits on one thread and three more int16 passes turned them into -1/0: ~45 ms a layer,
   a sixth of a bfloat16 training step at 8 x 1024 tokens. Here each 64-bit word w of random bits
   is splitmix64's output for the counter seed + (w + 1) * golden gamma (Steele, Lea and Flood
   2014: the finalizer passes BigCrush as a counter-based generator), computed 8 words at a time on
   the caller's OpenMP threads, and turned into 4 mask lanes in registers: the same lanes,
   threshold and arithmetic as keep_bits' torch path, from a different stream of bits. The seed is
   one draw from torch's global generator, so a run's masks follow its (checkpointed) RNG state. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline __m512i splitmix64(__m512i z) {
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), _mm512_set1_epi64((long long)0xBF58476D1CE4E5B9ULL));
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), _mm512_set1_epi64((long long)0x94D049BB133111EBULL));
    return _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
}

/* out (n int16): -1 where kept, 0 where dropped, each lane r (a 16-bit lane of random bits shifted
   right by one: uniform over -16384..16383) kept where r >= threshold. */
void gpt2kit_keep_bits(int16_t *out, int64_t n, uint64_t seed, int16_t threshold, int threads) {
    const int64_t chunk = 32;  /* int16 lanes per vector: 8 words of 4 */
    int64_t vectors = (n + chunk - 1) / chunk;
    const __m512i gamma = _mm512_set1_epi64((long long)0x9E3779B97F4A7C15ULL);
    const __m512i lane = _mm512_set_epi64(8, 7, 6, 5, 4, 3, 2, 1);  /* word w + 1, words 0..7 of a vector */
    const __m512i limit = _mm512_set1_epi16((short)(threshold - 1));
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < vectors; i++) {
        __m512i counter = _mm512_add_epi64(_mm512_set1_epi64((long long)(i * 8)), lane);
        __m512i z = splitmix64(_mm512_add_epi64(_mm512_set1_epi64((long long)seed), _mm512_mullo_epi64(counter, gamma)));
        __m512i r = _mm512_srai_epi16(z, 1);
        __m512i keep = _mm512_srai_epi16(_mm512_sub_epi16(limit, r), 15);
        int64_t left = n - i * chunk;
        if (left >= chunk) {
            _mm512_storeu_si512(out + i * chunk, keep);
        } else {
            _mm512_mask_storeu_epi16(out + i * chunk, (__mmask32)((1ULL << left) - 1), keep);
        }
    }
}
