/* Attention of one query per (row, head) over a KV cache, float32, AVX512 (decode). Built and
   loaded by kernels/native.py.

   One call replaces SDPA's ~20 us per layer at GPT-2 124M's shapes (12 heads, a few hundred
   slots) with a few: scores q.k * scale over the slots the mask allows, a max-subtracted softmax
   (vector_math.h's exp16), and the weighted sum of values.
   Masked slots weigh exactly 0. Sums in float32, as SDPA's. (row, head) pairs are split over the
   caller's OpenMP threads (torch's runtime: see native.py). */
#include "attention.h"

/* y[b, h] (D floats, rows of y B*H apart by D) for query q[b, h], keys and values k[b, h, s],
   v[b, h, s] (s < S, rows D floats), mask[b, s] (1 = attend; b stride 0 for one mask row).
   Strides are in elements. Returns 0, or -1 without memory for the scores. */
int gpt2kit_one_query_attention(const float *q, int64_t q_b, int64_t q_h, const float *k, const float *v,
                                int64_t kv_b, int64_t kv_h, int64_t kv_s, const uint8_t *mask, int64_t mask_b,
                                float *y, int64_t B, int64_t H, int64_t S, int64_t D, float scale,
                                int threads) {
    float *scores = malloc((size_t)(B * H * S) * sizeof(float));
    if (!scores) return -1;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t b = bh / H, h = bh % H;
        attend(q + b * q_b + h * q_h, k + b * kv_b + h * kv_h, v + b * kv_b + h * kv_h, kv_s, mask + b * mask_b,
               scores + bh * S, y + bh * D, S, D, scale, 0);
    }
    free(scores);
    return 0;
}

/* A decode step's whole attention from c_attn's output: qkv[b] (3 * H * D floats, rows qkv_b
   apart: the queries, keys and values of every head) has its keys and values written into the
   cache at slot *slot, then each query attends over slots 0..S-1 as above. Each (row, head)
   writes its own cache rows before reading them, so the threads never share one. */
int gpt2kit_cached_attention(const float *qkv, int64_t qkv_b, float *k, float *v, int64_t kv_b, int64_t kv_h,
                             int64_t kv_s, const int64_t *slot, const uint8_t *mask, int64_t mask_b, float *y,
                             int64_t B, int64_t H, int64_t S, int64_t D, float scale, int threads) {
    return cached_attention(qkv, qkv_b, k, v, kv_b, kv_h, kv_s, slot, mask, mask_b, y, B, H, S, D, scale, 0, threads);
}

/* The same for a bfloat16 model: qkv and the cache in bfloat16 (keys and values copied into the
   cache as they are), the scores, softmax and sums in float32, y (B * H * D) in float32. */
int gpt2kit_cached_attention_bf16(const uint16_t *qkv, int64_t qkv_b, uint16_t *k, uint16_t *v, int64_t kv_b,
                                  int64_t kv_h, int64_t kv_s, const int64_t *slot, const uint8_t *mask,
                                  int64_t mask_b, float *y, int64_t B, int64_t H, int64_t S, int64_t D, float scale,
                                  int threads) {
    return cached_attention(qkv, qkv_b, k, v, kv_b, kv_h, kv_s, slot, mask, mask_b, y, B, H, S, D, scale, 1, threads);
}
