/* float32 products for a few rows (decode), AVX512. Built and loaded by kernels/native.py.

   Decoding reads every weight once per step: its speed is the speed the weights stream from
   memory. The weight is read in its plain (N, K) layout, 8 rows side by side, and each vector of
   weights loaded serves up to 3 rows of x (one accumulator per weight row and x row); the 8
   accumulators of an x row are summed across lanes by a transpose at the end. Weight rows are
   split over the caller's OpenMP threads (torch's runtime: see native.py). */
#include <immintrin.h>
#include <stdint.h>

#include "attention.h"
#include "decode_stack.h"
#include "vector_math.h"

/* Bytes ahead of each weight row's reads to prefetch (one thread, GPT-2 124M's products: a few
   percent; more for 2-byte weights, which a bfloat16 variant of this loop showed: 18%). */
#ifndef PREFETCH
#define PREFETCH 256
#endif

/* Transpose-and-add steps: 8 accumulators (16 lanes each) -> 8 row sums in lanes 0-7. */
static inline __m512 pair(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
}
static inline __m512 quad(__m512 a, __m512 b) {
    __m512d x = _mm512_castps_pd(a), y = _mm512_castps_pd(b);
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
}
static inline __m512 lanes(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}
static inline __m512 sums8(const __m512 *acc) {
    __m512 f = lanes(quad(pair(acc[0], acc[1]), pair(acc[2], acc[3])), quad(pair(acc[4], acc[5]), pair(acc[6], acc[7])));
    return lanes(f, f);
}

/* Weight rows n0..n0+7 (pointers past N clamped to row N-1, their sums discarded) times T (<= 3,
   a constant after inlining) rows of x: row sums of x row t in lanes 0-7 of out[t]. */
static inline __attribute__((always_inline)) void rows8(const float *x, int T, const float *w, int64_t n0,
                                                        int64_t N, int64_t K, __m512 *out) {
    __m512 acc[3][8];
    const float *row[8];
    for (int r = 0; r < 8; r++) {
        row[r] = w + (n0 + r < N ? n0 + r : N - 1) * K;
        for (int t = 0; t < T; t++) acc[t][r] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 m = first16(K - k);
        __m512 xv[3];
        for (int t = 0; t < T; t++) xv[t] = _mm512_maskz_loadu_ps(m, x + t * K + k);
        for (int r = 0; r < 8; r++) {
            _mm_prefetch((const char *)(row[r] + k) + PREFETCH, _MM_HINT_T0);
            __m512 wv = _mm512_maskz_loadu_ps(m, row[r] + k);
            for (int t = 0; t < T; t++) acc[t][r] = _mm512_fmadd_ps(wv, xv[t], acc[t][r]);
        }
    }
    for (int t = 0; t < T; t++) out[t] = sums8(acc[t]);
}

/* out (M, N) = x (M, K), through a LayerNorm first if ln_w is not NULL, times w (N, K) transposed,
   plus bias (or NULL), through GPT-2's GELU if `gelu`. Returns 0, or -1 without memory for the
   normalized rows. */
int gpt2kit_f32_rows(const float *x, const float *ln_w, const float *ln_b, float eps, const float *w,
                     const float *bias, float *out, int64_t M, int64_t N, int64_t K, int gelu, int threads) {
    float *owned;
    if (!(x = layer_norm_rows(x, ln_w, ln_b, eps, M, K, &owned))) return -1;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < (N + 7) / 8; blk++) {
        int64_t n0 = blk * 8;
        __mmask16 valid = first16(N - n0 < 8 ? N - n0 : 8);
        __m512 b = bias ? _mm512_maskz_loadu_ps(valid, bias + n0) : _mm512_setzero_ps();
        __m512 sums[3];
        for (int64_t m = 0; m < M;) {
            int T = M - m >= 3 ? 3 : (int)(M - m);
            if (T == 3) rows8(x + m * K, 3, w, n0, N, K, sums);
            else if (T == 2) rows8(x + m * K, 2, w, n0, N, K, sums);
            else rows8(x + m * K, 1, w, n0, N, K, sums);
            for (int t = 0; t < T; t++, m++) {
                __m512 y = _mm512_add_ps(sums[t], b);
                _mm512_mask_storeu_ps(out + m * N + n0, valid, gelu ? gelu16(y) : y);
            }
        }
    }
    free(owned);
    return 0;
}

/* ---- A decode step's whole block in one call (kernels/decode_blocks.py). ---- */

struct f32_weights {
    const float *w, *bias;
};

/* What a block's call needs that does not change between steps, filled once by the caller: the
   LayerNorms before attention and MLP, the four products, and the sizes (C model width, H heads,
   hidden the MLP's width, scale the attention's). */
struct f32_block {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    float ln1_eps, ln2_eps, scale;
    struct f32_weights c_attn, attn_proj, c_fc, mlp_proj;
    int64_t C, H, hidden;
};

/* out (B, C) = y + mlp(norm2(y)) where y = x + attention(norm1(x)), for B (<= 8) rows of one token:
   the products as gpt2kit_f32_rows computes them, the cache write and attention as
   gpt2kit_cached_attention (attention.h), so the same bits as the block's modules. k, v (B, H, L,
   D) with strides kv_b, kv_h, kv_s; the new keys and values go to slot *slot, each query attends
   over slots 0..S-1 where mask (B or 1 rows of S, mask_b apart) allows. out may be x. Returns 0,
   or -1 without scratch memory. */
int gpt2kit_f32_block(const struct f32_block *b, const float *x, float *out, float *k, float *v, int64_t kv_b,
                      int64_t kv_h, int64_t kv_s, const int64_t *slot, const uint8_t *mask, int64_t mask_b, int64_t B,
                      int64_t S, int threads) {
    int64_t C = b->C, n = B * C;
    float *qkv = malloc((size_t)(3 * n) * sizeof(float)), *heads = malloc((size_t)n * sizeof(float)),
          *delta = malloc((size_t)n * sizeof(float)), *h = malloc((size_t)(B * b->hidden) * sizeof(float));
    int failed = !qkv || !heads || !delta || !h
        || gpt2kit_f32_rows(x, b->ln1_w, b->ln1_b, b->ln1_eps, b->c_attn.w, b->c_attn.bias, qkv, B, 3 * C, C, 0, threads)
        || cached_attention(qkv, 3 * C, k, v, kv_b, kv_h, kv_s, slot, mask, mask_b, heads, B, b->H, S, C / b->H,
                            b->scale, 0, threads)
        || gpt2kit_f32_rows(heads, NULL, NULL, 0.0f, b->attn_proj.w, b->attn_proj.bias, delta, B, C, C, 0, threads);
    if (!failed) {
        for (int64_t i = 0; i < n; i++) out[i] = x[i] + delta[i];
        failed = gpt2kit_f32_rows(out, b->ln2_w, b->ln2_b, b->ln2_eps, b->c_fc.w, b->c_fc.bias, h, B, b->hidden, C, 1,
                                  threads)
            || gpt2kit_f32_rows(h, NULL, NULL, 0.0f, b->mlp_proj.w, b->mlp_proj.bias, delta, B, C, b->hidden, 0, threads);
    }
    if (!failed)
        for (int64_t i = 0; i < n; i++) out[i] += delta[i];
    free(qkv); free(heads); free(delta); free(h);
    return failed ? -1 : 0;
}

/* gpt2kit_f32_blocks: the stack of blocks in one call (decode_stack.h). */
DECODE_STACK(gpt2kit_f32_blocks, f32_block, gpt2kit_f32_block)

/* gpt2kit_f32_step: a decode step from token ids through the stack (decode_stack.h). */
DECODE_STEP(gpt2kit_f32_step, f32_block, gpt2kit_f32_blocks)
