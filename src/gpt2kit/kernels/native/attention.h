/* Decode attention shared by attention.c and int8_rows.c (whose fused attention block calls it):
   one query per (row, head) over a KV cache, float32, AVX512. Part of every including file's
   build key (native.py). */
#ifndef GPT2KIT_ATTENTION_H
#define GPT2KIT_ATTENTION_H
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vector_math.h"

/* 16 elements of a float32 or (bf16 != 0) bfloat16 array from element i on, as float32 (a
   bfloat16 is the top half of a float32's bits). */
static inline __m512 load16(const void *p, int64_t i, __mmask16 m, int bf16) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i)), 16));
    return _mm512_maskz_loadu_ps(m, (const float *)p + i);
}

static inline float dot(const float *a, const void *b, int64_t i, int64_t D, int bf16) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
        __mmask16 m = first16(D - d);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + d), load16(b, i + d, m, bf16), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* One (row, head): scores of query qv against keys kb[s] (s < S, kv_s elements apart; float32, or
   bfloat16 if bf16) where allowed[s], their softmax in w (S floats of scratch), and the weighted
   sum of values vb[s] into yo (D floats). Sums in float32 either way. */
static void attend(const float *qv, const void *kb, const void *vb, int64_t kv_s, const uint8_t *allowed,
                   float *w, float *yo, int64_t S, int64_t D, float scale, int bf16) {
    float top = -INFINITY;
    for (int64_t s = 0; s < S; s++) {
        w[s] = allowed[s] ? dot(qv, kb, s * kv_s, D, bf16) * scale : -INFINITY;
        top = w[s] > top ? w[s] : top;
    }
    __m512 total = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; s += 16) {
        __mmask16 m = first16(S - s);
        __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, w + s), _mm512_set1_ps(top));
        __mmask16 live = _mm512_mask_cmp_ps_mask(m, x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
        __m512 e = _mm512_maskz_mov_ps(live, exp16(x));
        _mm512_mask_storeu_ps(w + s, m, e);
        total = _mm512_add_ps(total, e);
    }
    float inv = 1.0f / _mm512_reduce_add_ps(total);
    for (int64_t d0 = 0; d0 < D; d0 += 64) {  /* 4 vectors of the output at a time */
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t s = 0; s < S; s++) {
            if (w[s] == 0.0f) continue;
            __m512 ws = _mm512_set1_ps(w[s]);
            for (int j = 0; j < 4; j++) {
                __mmask16 m = first16(D - d0 - 16 * j);
                acc[j] = _mm512_fmadd_ps(ws, load16(vb, s * kv_s + d0 + 16 * j, m, bf16), acc[j]);
            }
        }
        for (int j = 0; j < 4; j++)
            _mm512_mask_storeu_ps(yo + d0 + 16 * j, first16(D - d0 - 16 * j), _mm512_mul_ps(acc[j], _mm512_set1_ps(inv)));
    }
}

/* A decode step's whole attention from c_attn's output: qkv[b] (3 * H * D elements, rows qkv_b
   apart: the queries, keys and values of every head; float32, or bfloat16 if bf16, as the cache)
   has its keys and values written into the cache at slot *slot, then each query attends over
   slots 0..S-1 as above, into y (B * H * D floats). Each (row, head) writes its own cache rows
   before reading them, so the threads never share one. Returns 0, or -1 without scratch memory. */
static int cached_attention(const void *qkv, int64_t qkv_b, void *k, void *v, int64_t kv_b, int64_t kv_h,
                            int64_t kv_s, const int64_t *slot, const uint8_t *mask, int64_t mask_b, float *y,
                            int64_t B, int64_t H, int64_t S, int64_t D, float scale, int bf16, int threads) {
    int64_t size = bf16 ? 2 : 4, C = H * D, at = *slot, per = S + (bf16 ? D : 0);  /* + a float32 query */
    float *scores = malloc((size_t)(B * H * per) * sizeof(float));
    if (!scores) return -1;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t b = bh / H, h = bh % H;
        const char *row = (const char *)qkv + (b * qkv_b + h * D) * size;
        char *kb = (char *)k + (b * kv_b + h * kv_h) * size, *vb = (char *)v + (b * kv_b + h * kv_h) * size;
        memcpy(kb + at * kv_s * size, row + C * size, (size_t)(D * size));
        memcpy(vb + at * kv_s * size, row + 2 * C * size, (size_t)(D * size));
        float *w = scores + bh * per;
        const float *q = (const float *)row;
        if (bf16) {
            for (int64_t d = 0; d < D; d += 16) _mm512_mask_storeu_ps(w + S + d, first16(D - d), load16(row, d, first16(D - d), 1));
            q = w + S;
        }
        attend(q, kb, vb, kv_s, mask + b * mask_b, w, y + bh * D, S, D, scale, bf16);
    }
    free(scores);
    return 0;
}

#endif
