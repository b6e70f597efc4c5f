/* bfloat16 products (bfloat16 weights and activations, float32 sums) on AMX tiles, for any number
   of rows: a decode step's one row as well as a prompt's hundreds. Built and loaded by
   kernels/native.py.

   Why not oneDNN's: a batch-1 decode step streams every weight once, and oneDNN's packed bfloat16
   kernels stream them at ~21 GB/s on this project's 2-core machines. Measured there (two threads,
   GPT-2 124M's 49 products, distinct weights so that they come from memory): oneDNN 10.9-11.4 ms
   at 1 row and 8 rows, these tiles 5.7-5.9 and 6.5 (a plain AVX512-BF16 row kernel: 6.9 at 1 row,
   15 at 8), 64 rows alike, 512 rows ~10% slower (86 against 79 ms).

   Each weight is laid out in tiles once (gpt2kit_pack_bf16_tiles), in place of oneDNN's packed
   copy: for each block of 16 output columns and each 32 of K, the 16 x 64-byte B tile of
   TDPBF16PS (row r: the pair of K 2r, 2r + 1 for all 16 columns), a column block's K contiguous. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tiles.h"
#include "vector_math.h"

#define TILE_ELEMENTS (TILE_BYTES / 2)

/* 1 if Linux lets this process use the tiles (tiles.h). */
int gpt2kit_bf16_tiles_ready(void) {
    return tiles_permitted();
}

/* w (N, K) bfloat16 into tiles (tiles.h: a pair of K a column in each tile row, 32 of K a tile):
   ceil(N / 16) * ceil(K / 32) * 512 elements. */
void gpt2kit_pack_bf16_tiles(const uint16_t *w, uint16_t *tiles, int64_t N, int64_t K, int threads) {
    pack_tiles((const uint8_t *)w, (uint8_t *)tiles, N, K, 2, threads);
}

/* x (M, K) as rows of Kp >= K elements, zero beyond K, and Mp >= M rows, zero beyond M: x itself
   if nothing needs padding, else a new buffer the caller frees (*owned); NULL without memory. */
static const uint16_t *padded(const uint16_t *x, int64_t M, int64_t Mp, int64_t K, int64_t Kp, uint16_t **owned) {
    *owned = NULL;
    if (M == Mp && K == Kp) return x;
    uint16_t *p = calloc((size_t)(Mp * Kp), sizeof(uint16_t));
    if (!p) return NULL;
    for (int64_t m = 0; m < M; m++) memcpy(p + m * Kp, x + m * K, (size_t)K * sizeof(uint16_t));
    return *owned = p;
}

/* 16 outputs from their float32 sums: plus bias (float32, or NULL), through GPT-2's GELU if
   `gelu`, rounded to bfloat16 (to nearest even, as torch rounds). */
static inline void finish(__m512 y, const float *bias, int64_t n0, __mmask16 valid, int gelu, uint16_t *out) {
    if (bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(valid, bias + n0));
    if (gelu) y = gelu16(y);
    _mm256_mask_storeu_epi16(out, valid, (__m256i)_mm512_cvtneps_pbh(y));
}

/* Two blocks of 16 rows (a second block only if `two`) times two column blocks (only if `two_n`)
   over all of K, on AMX: tiles 0-3 the four 16 x 16 float32 sums, 4-5 the rows of x (32 of K),
   6-7 the weights; four TDPBF16PS for every four tile loads. Sums of block (i, j) into sums[2i + j]. */
static inline void tiles_2x2(const uint16_t *a, int64_t Kp, const uint16_t *b, int64_t KB, int two, int two_n,
                             float (*sums)[16][16]) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t kb = 0; kb < KB; kb++) {
        _tile_loadd(4, a + kb * 32, Kp * 2);
        _tile_loadd(6, b + kb * TILE_ELEMENTS, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (two_n) { _tile_loadd(7, b + (KB + kb) * TILE_ELEMENTS, 64); _tile_dpbf16ps(1, 4, 7); }
        if (two) {
            _tile_loadd(5, a + 16 * Kp + kb * 32, Kp * 2);
            _tile_dpbf16ps(2, 5, 6);
            if (two_n) _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, sums[0], 64);
    if (two_n) _tile_stored(1, sums[1], 64);
    if (two) _tile_stored(2, sums[2], 64);
    if (two && two_n) _tile_stored(3, sums[3], 64);
}

/* out (M, N) bfloat16 = x (M, K) bfloat16 times the tiled weight (gpt2kit_pack_bf16_tiles), plus
   bias (float32, or NULL), through GPT-2's GELU if `gelu`. Each thread takes pairs of column blocks (32 outputs); for each pair, every two
   blocks of 16 rows run over K, so the pair's weights stream from memory once and are re-read from
   cache by later blocks. Returns 0, or -1 without memory for a padded copy of x (rows not a multiple
   of 16, or K not of 32). */
int gpt2kit_bf16_tiles_linear(const uint16_t *x, const uint16_t *tiles, const float *bias, uint16_t *out, int64_t M,
                              int64_t N, int64_t K, int gelu, int threads) {
    int64_t KB = (K + 31) / 32, Kp = KB * 32, MB = (M + 15) / 16, NB = (N + 15) / 16;
    uint16_t *owned;
    const uint16_t *a = padded(x, M, MB * 16, K, Kp, &owned);
    if (!a) return -1;
    #pragma omp parallel num_threads(threads)
    {
        configure_tiles();
        float sums[4][16][16];
        #pragma omp for schedule(static)
        for (int64_t nb = 0; nb < NB; nb += 2) {
            int two_n = nb + 1 < NB;
            for (int64_t mb = 0; mb < MB; mb += 2) {
                int two = mb + 1 < MB;
                tiles_2x2(a + mb * 16 * Kp, Kp, tiles + nb * KB * TILE_ELEMENTS, KB, two, two_n, sums);
                for (int i = 0; i <= two; i++)
                    for (int j = 0; j <= two_n; j++) {
                        int64_t n0 = (nb + j) * 16;
                        __mmask16 valid = first16(N - n0);
                        for (int64_t r = 0, m = (mb + i) * 16; r < 16 && m < M; r++, m++)
                            finish(_mm512_loadu_ps(sums[2 * i + j][r]), bias, n0, valid, gelu, out + m * N + n0);
                    }
            }
        }
        _tile_release();
    }
    free(owned);
    return 0;
}
