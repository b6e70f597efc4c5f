/* A decode step through a stack of blocks in one call, shared by f32_rows.c and int8_rows.c. Part
   of every including file's build key (native.py). */
#ifndef GPT2KIT_DECODE_STACK_H
#define GPT2KIT_DECODE_STACK_H
#include <stdint.h>

/* Defines int NAME(const struct BLOCK *blocks, int64_t L, x, out, k, v, kv_b, kv_h, kv_s, slot,
   mask, mask_b, B, S, threads): ONE (the file's one-block call) for each of the L blocks in turn,
   block l reading the cache tensors k[l], v[l] (all laid out alike), the first reading x, the
   others (in place) out. Returns 0, or -1 as soon as a block's call fails. */
#define DECODE_STACK(NAME, BLOCK, ONE)                                                                            \
    int NAME(const struct BLOCK *blocks, int64_t L, const float *x, float *out, float *const *k, float *const *v, \
             int64_t kv_b, int64_t kv_h, int64_t kv_s, const int64_t *slot, const uint8_t *mask, int64_t mask_b,  \
             int64_t B, int64_t S, int threads) {                                                                 \
        for (int64_t l = 0; l < L; l++)                                                                           \
            if (ONE(&blocks[l], l ? out : x, out, k[l], v[l], kv_b, kv_h, kv_s, slot, mask, mask_b, B, S,         \
                    threads))                                                                                     \
                return -1;                                                                                        \
        return 0;                                                                                                 \
    }

#endif
