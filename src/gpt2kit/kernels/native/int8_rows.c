/* int8 x int8 products: a few rows (decode) on AVX512-VNNI, many rows (batches, prompts) on AMX tiles
   (at the end of the file). Built and loaded by kernels/native.py.

   Each row of x is quantized with a scale of its own (symmetric, absmax / 127, rounded half to
   even: the same numbers as int8.quantize_tokens), shifted by +128 into uint8 because vpdpbusd
   multiplies unsigned by signed bytes; the shift comes back out as 128 * sum(w) per weight row
   (`wsum`, made once). The int32 sums are exact, so the result equals oneDNN's path bit for bit
   (tests/test_int8_products.py), including the epilogue: (sum * wscale) * xscale, the bias added
   in the one rounding of a fused multiply-add as torch's addcmul does.

   The weight stays in its plain (N, K) layout (no second copy): 16 rows (8 when several tokens
   share each load) are read side by side, one accumulator per row, and the accumulators are
   summed across lanes by a transpose at the end. Rows are split over the caller's OpenMP threads
   (torch's own runtime: see native.py). */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "decode_stack.h"
#include "tiles.h"
#include "vector_math.h"

/* Bytes ahead of each weight row's reads to prefetch: 16 streams are more than the hardware
   prefetcher follows well (one thread, GPT-2 124M's products: 6% faster at 256; 128-512 alike). */
#ifndef PREFETCH
#define PREFETCH 256
#endif

/* Each row of x (M, K), through a LayerNorm first if ln_w is not NULL, quantized into q with its
   scale. Returns 0, or -1 without memory for the normalized rows. */
int gpt2kit_quantize_rows(const float *x, const float *ln_w, const float *ln_b, float eps, int8_t *q, float *scale,
                          int64_t M, int64_t K, int threads) {
    float *owned;
    if (!(x = layer_norm_rows(x, ln_w, ln_b, eps, M, K, &owned))) return -1;
    #pragma omp parallel for schedule(static) num_threads(threads) if (M * K >= 65536)
    for (int64_t m = 0; m < M; m++) {
        /* Vectors of 16: a scalar loop (a division and a rounding per element) took ~5 ns an
           element, a third of a batch-8 int8 step. Exact either way: a max, then x / s correctly
           rounded and rounded half to even, as torch.round(x / scale). */
        const float *xm = x + m * K;
        __m512 top = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16)
            top = _mm512_max_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(first16(K - k), xm + k)), top);
        float s = fmaxf(_mm512_reduce_max_ps(top) / 127.0f, FLT_MIN);
        __m512 sv = _mm512_set1_ps(s);
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 live = first16(K - k);
            __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(live, xm + k), sv),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm_mask_storeu_epi8(q + m * K + k, live, _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(r)));
        }
        scale[m] = s;
    }
    free(owned);
    return 0;
}

/* Transpose-and-add steps: 16 accumulators (16 lanes each) -> one vector of 16 row sums. */
static inline __m512i pair(__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
}
static inline __m512i quad(__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
}
static inline __m512i lanes(__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x88), _mm512_shuffle_i32x4(a, b, 0xDD));
}

static inline __mmask64 tail(int64_t left) {
    return left >= 64 ? (__mmask64)-1 : (__mmask64)-1 >> (64 - left);
}

/* Rows n0..n0+15 of w (pointers past N clamped to row N-1, their sums discarded) dotted with one
   shifted row u: lane r holds row n0 + r. */
static inline __m512i rows16(const uint8_t *u, const int8_t *w, int64_t n0, int64_t N, int64_t K) {
    __m512i acc[16];
    const int8_t *row[16];
    for (int r = 0; r < 16; r++) {
        acc[r] = _mm512_setzero_si512();
        row[r] = w + (n0 + r < N ? n0 + r : N - 1) * K;
    }
    for (int64_t k = 0; k < K; k += 64) {
        __mmask64 m = tail(K - k);
        __m512i xv = _mm512_maskz_loadu_epi8(m, u + k);
        for (int r = 0; r < 16; r++) {
            _mm_prefetch((const char *)(row[r] + k) + PREFETCH, _MM_HINT_T0);
            acc[r] = _mm512_dpbusd_epi32(acc[r], xv, _mm512_maskz_loadu_epi8(m, row[r] + k));
        }
    }
    return lanes(lanes(quad(pair(acc[0], acc[1]), pair(acc[2], acc[3])), quad(pair(acc[4], acc[5]), pair(acc[6], acc[7]))),
                 lanes(quad(pair(acc[8], acc[9]), pair(acc[10], acc[11])), quad(pair(acc[12], acc[13]), pair(acc[14], acc[15]))));
}

/* Rows n0..n0+7 dotted with T (<= 3, a constant after inlining) shifted rows: each weight load
   serves T tokens. Lanes 0-7 of sums[t] hold token t's row sums. */
static inline __attribute__((always_inline)) void rows8(const uint8_t *u, int T, const int8_t *w, int64_t n0,
                                                        int64_t N, int64_t K, __m512i *sums) {
    __m512i acc[3][8];
    const int8_t *row[8];
    for (int r = 0; r < 8; r++) {
        row[r] = w + (n0 + r < N ? n0 + r : N - 1) * K;
        for (int t = 0; t < T; t++) acc[t][r] = _mm512_setzero_si512();
    }
    for (int64_t k = 0; k < K; k += 64) {
        __mmask64 m = tail(K - k);
        __m512i xv[3];
        for (int t = 0; t < T; t++) xv[t] = _mm512_maskz_loadu_epi8(m, u + t * K + k);
        for (int r = 0; r < 8; r++) {
            __m512i wv = _mm512_maskz_loadu_epi8(m, row[r] + k);
            for (int t = 0; t < T; t++) acc[t][r] = _mm512_dpbusd_epi32(acc[t][r], xv[t], wv);
        }
    }
    for (int t = 0; t < T; t++) {
        __m512i f = lanes(quad(pair(acc[t][0], acc[t][1]), pair(acc[t][2], acc[t][3])),
                          quad(pair(acc[t][4], acc[t][5]), pair(acc[t][6], acc[t][7])));
        sums[t] = lanes(f, f);
    }
}

static inline void finish(__m512i sums, __m512i wsum, __m512 wscale, const float *bias, __m512 b, float xscale,
                          int gelu, float *out, __mmask16 valid) {
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sums, wsum)), wscale);
    __m512 s = _mm512_set1_ps(xscale);
    y = bias ? _mm512_fmadd_ps(y, s, b) : _mm512_mul_ps(y, s);
    _mm512_mask_storeu_ps(out, valid, gelu ? gelu16(y) : y);
}

/* The oneDNN path's epilogue, in place: y (M, N), oneDNN's int32 sums times the weight's scales,
   times each row's scale, plus bias (or NULL), through GPT-2's GELU if `gelu`: the same
   operations, so the same bits, as the native product's finish(). */
void gpt2kit_finish_rows(float *y, const float *xscale, const float *bias, int64_t M, int64_t N, int gelu,
                         int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (M * N >= 65536)
    for (int64_t m = 0; m < M; m++) {
        __m512 s = _mm512_set1_ps(xscale[m]);
        for (int64_t n = 0; n < N; n += 16) {
            __mmask16 live = first16(N - n);
            __m512 v = _mm512_maskz_loadu_ps(live, y + m * N + n);
            v = bias ? _mm512_fmadd_ps(v, s, _mm512_maskz_loadu_ps(live, bias + n)) : _mm512_mul_ps(v, s);
            _mm512_mask_storeu_ps(y + m * N + n, live, gelu ? gelu16(v) : v);
        }
    }
}

/* out (M, N) = x (M, K), through a LayerNorm first if ln_w is not NULL, quantized, times w (N, K),
   scaled, plus bias (or NULL), through GPT-2's GELU if `gelu`. Returns 0, or -1 if the scratch
   memory could not be allocated. */
int gpt2kit_int8_linear(const float *x, const float *ln_w, const float *ln_b, float eps, const int8_t *w,
                        const int32_t *wsum, const float *wscale, const float *bias, float *out, int64_t M, int64_t N,
                        int64_t K, int gelu, int threads) {
    int8_t *q = malloc((size_t)(M * K));
    float *xscale = malloc((size_t)M * sizeof(float));
    if (!q || !xscale || gpt2kit_quantize_rows(x, ln_w, ln_b, eps, q, xscale, M, K, 1)) {
        free(q); free(xscale); return -1;
    }
    uint8_t *u = (uint8_t *)q;
    for (int64_t i = 0; i < M * K; i++) u[i] = (uint8_t)(q[i] + 128);
    int64_t R = M == 1 ? 16 : 8, blocks = (N + R - 1) / R;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t n0 = blk * R, left = N - n0 < R ? N - n0 : R;
        __mmask16 valid = (__mmask16)((1u << left) - 1);
        __m512i ws = _mm512_maskz_loadu_epi32(valid, wsum + n0);
        __m512 sc = _mm512_maskz_loadu_ps(valid, wscale + n0);
        __m512 b = bias ? _mm512_maskz_loadu_ps(valid, bias + n0) : _mm512_setzero_ps();
        if (M == 1) {
            finish(rows16(u, w, n0, N, K), ws, sc, bias, b, xscale[0], gelu, out + n0, valid);
            continue;
        }
        __m512i sums[3];
        for (int64_t m = 0; m < M;) {
            int T = M - m >= 3 ? 3 : (int)(M - m);
            if (T == 3) rows8(u + m * K, 3, w, n0, N, K, sums);
            else if (T == 2) rows8(u + m * K, 2, w, n0, N, K, sums);
            else rows8(u + m * K, 1, w, n0, N, K, sums);
            for (int t = 0; t < T; t++) finish(sums[t], ws, sc, bias, b, xscale[m + t], gelu, out + (m + t) * N + n0, valid);
            m += T;
        }
    }
    free(q);
    free(xscale);
    return 0;
}

/* A decode step's MLP for M (<= 3) rows in one call: out (M, K) = c_proj(gelu(c_fc(norm(x)))), both
   products as gpt2kit_int8_linear computes them (so the same bits as two calls), the hidden rows
   (M, H) in scratch memory. Saves a product's Python and module calls per block. Returns 0, or -1
   without scratch memory. */
int gpt2kit_int8_mlp(const float *x, const float *ln_w, const float *ln_b, float eps, const int8_t *fc_w,
                     const int32_t *fc_wsum, const float *fc_wscale, const float *fc_bias, const int8_t *proj_w,
                     const int32_t *proj_wsum, const float *proj_wscale, const float *proj_bias, float *out,
                     int64_t M, int64_t K, int64_t H, int threads) {
    float *h = malloc((size_t)(M * H) * sizeof(float));
    int failed = !h
        || gpt2kit_int8_linear(x, ln_w, ln_b, eps, fc_w, fc_wsum, fc_wscale, fc_bias, h, M, H, K, 1, threads)
        || gpt2kit_int8_linear(h, NULL, NULL, 0.0f, proj_w, proj_wsum, proj_wscale, proj_bias, out, M, K, H, 0, threads);
    free(h);
    return failed ? -1 : 0;
}

/* A decode step's attention block for B (<= 3) rows of one token in one call: qkv = c_attn(norm(x)),
   its keys and values written into the cache at *slot and each head's query attending over slots
   0..S-1 (attention.h, as gpt2kit_cached_attention, scores times `scale`), then out (B, C) =
   c_proj(heads): the same
   bits as the three calls. Returns 0, or -1 without scratch memory. */
int gpt2kit_int8_attention(const float *x, const float *ln_w, const float *ln_b, float eps, const int8_t *qkv_w,
                           const int32_t *qkv_wsum, const float *qkv_wscale, const float *qkv_bias, float *k, float *v,
                           int64_t kv_b, int64_t kv_h, int64_t kv_s, const int64_t *slot, const uint8_t *mask,
                           int64_t mask_b, const int8_t *proj_w, const int32_t *proj_wsum, const float *proj_wscale,
                           const float *proj_bias, float *out, int64_t B, int64_t H, int64_t S, int64_t C, float scale,
                           int threads) {
    float *qkv = malloc((size_t)(B * 3 * C) * sizeof(float)), *heads = malloc((size_t)(B * C) * sizeof(float));
    int64_t D = C / H;
    int failed = !qkv || !heads
        || gpt2kit_int8_linear(x, ln_w, ln_b, eps, qkv_w, qkv_wsum, qkv_wscale, qkv_bias, qkv, B, 3 * C, C, 0, threads)
        || cached_attention(qkv, 3 * C, k, v, kv_b, kv_h, kv_s, slot, mask, mask_b, heads, B, H, S, D, scale, 0, threads)
        || gpt2kit_int8_linear(heads, NULL, NULL, 0.0f, proj_w, proj_wsum, proj_wscale, proj_bias, out, B, C, C, 0,
                               threads);
    free(qkv);
    free(heads);
    return failed ? -1 : 0;
}

/* ---- A decode step's whole block in one call. ---- */

/* One int8 x int8 linear as the row kernel reads it. */
struct int8_weights {
    const int8_t *w;
    const int32_t *wsum;
    const float *wscale, *bias;
};

/* What a block's call needs that does not change between steps, filled once by the caller
   (kernels/decode_blocks.py): the LayerNorms before attention and MLP, the four products, and the
   sizes (C model width, H heads, hidden the MLP's width, scale the attention's). */
struct int8_block {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    float ln1_eps, ln2_eps, scale;
    struct int8_weights c_attn, attn_proj, c_fc, mlp_proj;
    int64_t C, H, hidden;
};

/* out (B, C) = y + mlp(norm2(y)) where y = x + attention(norm1(x)), for B (<= 3) rows of one token:
   gpt2kit_int8_attention and gpt2kit_int8_mlp with the residual sums between, so the same bits as
   the block's modules. The cache arguments as gpt2kit_int8_attention's. out may be x (each sum
   reads x[i] just before writing out[i]). Returns 0, or -1 without scratch memory. */
int gpt2kit_int8_block(const struct int8_block *b, const float *x, float *out, float *k, float *v, int64_t kv_b,
                       int64_t kv_h, int64_t kv_s, const int64_t *slot, const uint8_t *mask, int64_t mask_b, int64_t B,
                       int64_t S, int threads) {
    int64_t n = B * b->C;
    float *delta = malloc((size_t)n * sizeof(float));
    const struct int8_weights *qkv = &b->c_attn, *proj = &b->attn_proj, *fc = &b->c_fc, *down = &b->mlp_proj;
    int failed = !delta
        || gpt2kit_int8_attention(x, b->ln1_w, b->ln1_b, b->ln1_eps, qkv->w, qkv->wsum, qkv->wscale, qkv->bias, k, v,
                                  kv_b, kv_h, kv_s, slot, mask, mask_b, proj->w, proj->wsum, proj->wscale, proj->bias,
                                  delta, B, b->H, S, b->C, b->scale, threads);
    if (!failed) {
        for (int64_t i = 0; i < n; i++) out[i] = x[i] + delta[i];
        failed = gpt2kit_int8_mlp(out, b->ln2_w, b->ln2_b, b->ln2_eps, fc->w, fc->wsum, fc->wscale, fc->bias, down->w,
                                  down->wsum, down->wscale, down->bias, delta, B, b->C, b->hidden, threads);
    }
    if (!failed)
        for (int64_t i = 0; i < n; i++) out[i] += delta[i];
    free(delta);
    return failed ? -1 : 0;
}

/* gpt2kit_int8_blocks: the stack of blocks in one call (decode_stack.h). */
DECODE_STACK(gpt2kit_int8_blocks, int8_block, gpt2kit_int8_block)

/* gpt2kit_int8_step: a decode step from token ids through the stack (decode_stack.h). */
DECODE_STEP(gpt2kit_int8_step, int8_block, gpt2kit_int8_blocks)

/* ---- Many rows on AMX (batches, prompts): int8 x int8 tiles. ----

   TDPBSSD multiplies a 16 x 64-byte tile of activations (16 tokens, 64 of K, signed) by a
   16 x 64-byte tile of weights in the VNNI layout (row r: for each of 16 output columns, 4
   consecutive bytes of K) into 16 x 16 int32 sums: the same exact sums as the rows kernel above and
   oneDNN's GEMM, and the epilogue is finish()'s, so the same bits whichever path a row takes. Each
   thread takes groups of 4 column tiles (64 outputs); for each, every block of 16 tokens runs over
   K, so the group's weights stream from memory once and are re-read from cache by later blocks.
   oneDNN's GEMM spends ~30 us a call before any work at a batch of 8: ~1.4 ms of a GPT-2 124M step. */

/* 1 if Linux lets this process use the tiles (tiles.h). */
int gpt2kit_tiles_ready(void) {
    return tiles_permitted();
}

/* w (N, K) int8 into tiles (tiles.h: 4 bytes of K a column in each tile row, 64 of K a tile):
   ceil(N / 16) * ceil(K / 64) * 1024 bytes. */
void gpt2kit_pack_tiles(const int8_t *w, int8_t *tiles, int64_t N, int64_t K, int threads) {
    pack_tiles((const uint8_t *)w, (uint8_t *)tiles, N, K, 1, threads);
}

/* out (M, N) = x (M, K), through a LayerNorm first if ln_w is not NULL, quantized, times the
   packed weight `tiles` (gpt2kit_pack_tiles), scaled, plus bias (or NULL), through GPT-2's GELU if
   `gelu`. Returns 0, or -1 without memory for the quantized activations. */
int gpt2kit_int8_tiles_linear(const float *x, const float *ln_w, const float *ln_b, float eps, const int8_t *tiles,
                              const float *wscale, const float *bias, float *out, int64_t M, int64_t N, int64_t K,
                              int gelu, int threads) {
    int64_t KB = (K + 63) / 64, Kp = KB * 64, MB = (M + 15) / 16, NB = (N + 15) / 16, groups = (NB + 3) / 4;
    int8_t *q = calloc((size_t)(MB * 16 * Kp), 1), *rows = Kp == K ? q : malloc((size_t)(M * K));
    float *xscale = malloc((size_t)M * sizeof(float));
    if (!q || !rows || !xscale || gpt2kit_quantize_rows(x, ln_w, ln_b, eps, rows, xscale, M, K, threads)) {
        free(q); if (rows != q) free(rows); free(xscale); return -1;
    }
    if (rows != q) {  /* rows of Kp bytes, zero beyond K */
        for (int64_t m = 0; m < M; m++) memcpy(q + m * Kp, rows + m * K, (size_t)K);
        free(rows);
    }
    #pragma omp parallel num_threads(threads)
    {
        configure_tiles();
        int32_t sums[4][16][16];
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            int64_t nb0 = g * 4, tiles_n = NB - nb0 < 4 ? NB - nb0 : 4;
            const int8_t *b = tiles + nb0 * KB * TILE_BYTES;
            for (int64_t mb = 0; mb < MB; mb++) {
                const int8_t *a = q + mb * 16 * Kp;
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                for (int64_t kb = 0; kb < KB; kb++) {
                    _tile_loadd(4, a + kb * 64, Kp);
                    _tile_loadd(5, b + kb * TILE_BYTES, 64);
                    _tile_dpbssd(0, 4, 5);
                    if (tiles_n > 1) { _tile_loadd(6, b + (KB + kb) * TILE_BYTES, 64); _tile_dpbssd(1, 4, 6); }
                    if (tiles_n > 2) { _tile_loadd(5, b + (2 * KB + kb) * TILE_BYTES, 64); _tile_dpbssd(2, 4, 5); }
                    if (tiles_n > 3) { _tile_loadd(6, b + (3 * KB + kb) * TILE_BYTES, 64); _tile_dpbssd(3, 4, 6); }
                }
                _tile_stored(0, sums[0], 64);
                if (tiles_n > 1) _tile_stored(1, sums[1], 64);
                if (tiles_n > 2) _tile_stored(2, sums[2], 64);
                if (tiles_n > 3) _tile_stored(3, sums[3], 64);
                for (int64_t t = 0; t < tiles_n; t++) {
                    int64_t n0 = (nb0 + t) * 16;
                    __mmask16 valid = first16(N - n0);
                    __m512 sc = _mm512_maskz_loadu_ps(valid, wscale + n0);
                    __m512 bv = bias ? _mm512_maskz_loadu_ps(valid, bias + n0) : _mm512_setzero_ps();
                    for (int64_t r = 0; r < 16 && mb * 16 + r < M; r++) {
                        int64_t m = mb * 16 + r;
                        finish(_mm512_loadu_si512(sums[t][r]), _mm512_setzero_si512(), sc, bias, bv, xscale[m], gelu,
                               out + m * N + n0, valid);
                    }
                }
            }
        }
        _tile_release();
    }
    free(q);
    free(xscale);
    return 0;
}
