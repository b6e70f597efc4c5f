/* A decode step through a stack of blocks in one call, and from token ids through the stack, shared
   by f32_rows.c and int8_rows.c. Part of every including file's build key (native.py). */
#ifndef GPT2KIT_DECODE_STACK_H
#define GPT2KIT_DECODE_STACK_H
#include <stdint.h>
#include <stdlib.h>

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

/* The stack's input and mask for B rows of one token each at cache slot `start`, as the model's
   modules and model.Positions make them. Row b of x (B, C): token tokens[b]'s embedding plus that
   of position start - pads[b] (at least 0; pads NULL: no padding), the token's row of wte read as
   float32, or int8 times the row's scale where wte_scale is not NULL (quantize.py's
   Int8Embedding): a product, then a sum, each rounded once (the build has no fused multiply-add),
   so the same bits as the modules. mask (B rows of start + 1 with pads, else 1): slot s visible
   where s >= pads[b] or s == start. */
static void embed_step(const int64_t *tokens, const int64_t *pads, const void *wte, const float *wte_scale,
                       const float *wpe, float *x, uint8_t *mask, int64_t B, int64_t C, int64_t start) {
    for (int64_t b = 0; b < B; b++) {
        int64_t t = tokens[b], pad = pads ? pads[b] : 0, at = start - pad > 0 ? start - pad : 0;
        const float *p = wpe + at * C;
        float *xb = x + b * C;
        if (wte_scale) {
            const int8_t *q = (const int8_t *)wte + t * C;
            for (int64_t c = 0; c < C; c++) xb[c] = (float)q[c] * wte_scale[t] + p[c];
        } else {
            const float *e = (const float *)wte + t * C;
            for (int64_t c = 0; c < C; c++) xb[c] = e[c] + p[c];
        }
        if (b == 0 || pads)
            for (int64_t s = 0; s <= start; s++) mask[b * (start + 1) + s] = s >= pad || s == start;
    }
}

/* Defines int NAME(const struct BLOCK *blocks, int64_t L, tokens, pads, wte, wte_scale, wpe, out,
   k, v, kv_b, kv_h, kv_s, start, B, threads): out (B, C) = the stack STACK (a DECODE_STACK
   function) over embed_step's rows, each row's key and value written to slot `start` and
   attending over slots 0..start. Returns 0, or -1 without scratch memory. */
#define DECODE_STEP(NAME, BLOCK, STACK)                                                                           \
    int NAME(const struct BLOCK *blocks, int64_t L, const int64_t *tokens, const int64_t *pads, const void *wte,  \
             const float *wte_scale, const float *wpe, float *out, float *const *k, float *const *v, int64_t kv_b, \
             int64_t kv_h, int64_t kv_s, int64_t start, int64_t B, int threads) {                                 \
        int64_t S = start + 1;                                                                                    \
        uint8_t *mask = malloc((size_t)(B * S));                                                                  \
        if (!mask) return -1;                                                                                     \
        embed_step(tokens, pads, wte, wte_scale, wpe, out, mask, B, blocks[0].C, start);                          \
        int failed = STACK(blocks, L, out, out, k, v, kv_b, kv_h, kv_s, &start, mask, pads ? S : 0, B, S,         \
                           threads);                                                                              \
        free(mask);                                                                                               \
        return failed;                                                                                            \
    }

#endif
