/* The counter-based generator of bfloat16 training's dropout masks, shared by dropout.c (masks as
   int16 words) and causal_softmax.c (masks made inside the softmax). Part of every including
   file's build key (native.py).

   Word w of the stream for `seed` is splitmix64's finalizer of seed + (w + 1) * golden gamma
   (Steele, Lea and Flood 2014: the finalizer passes BigCrush as a counter-based generator). Each
   word gives 4 int16 lanes, low first, so element i of a tensor's mask is lane i % 4 of word
   i / 4: a lane shifted right by one is uniform over -16384..16383 and the element is kept where
   it is >= the threshold (kernels/bf16_training.py: keep_bits). Needs AVX512-DQ and -BW. */
#ifndef GPT2KIT_COUNTER_RNG_H
#define GPT2KIT_COUNTER_RNG_H
#include <immintrin.h>
#include <stdint.h>

static inline __m512i splitmix64(__m512i z) {
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), _mm512_set1_epi64((long long)0xBF58476D1CE4E5B9ULL));
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), _mm512_set1_epi64((long long)0x94D049BB133111EBULL));
    return _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
}

/* Which of elements 4 w0 .. 4 w0 + 31 are kept (bit l: element 4 w0 + l): words w0..w0+7. */
static inline __mmask32 kept32(uint64_t seed, int64_t w0, int16_t threshold) {
    const __m512i gamma = _mm512_set1_epi64((long long)0x9E3779B97F4A7C15ULL);
    __m512i counter = _mm512_add_epi64(_mm512_set1_epi64((long long)w0), _mm512_set_epi64(8, 7, 6, 5, 4, 3, 2, 1));
    __m512i z = splitmix64(_mm512_add_epi64(_mm512_set1_epi64((long long)seed), _mm512_mullo_epi64(counter, gamma)));
    return _mm512_cmpge_epi16_mask(_mm512_srai_epi16(z, 1), _mm512_set1_epi16(threshold));
}

/* Which of the 16 elements from flat index i on are kept (bit l: element i + l). */
static inline __mmask16 kept16(uint64_t seed, int64_t i, int16_t threshold) {
    return (__mmask16)((uint32_t)kept32(seed, i >> 2, threshold) >> (i & 3));
}

#endif
