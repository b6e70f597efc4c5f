/* 16-bit matrix transposes (bfloat16 gradients), 32 x 32 blocks in AVX512 registers. Built and
   loaded by kernels/native.py.

   Why: a weight's gradient grad.t() @ x reads grad column-wise, and oneDNN's AMX matmul repacks
   such a transposed operand at ~2,000 GFLOP/s where the same product from a row-major grad.t()
   runs at ~3,000-3,300 (measured on this project's 2-core Xeons: GPT-2 124M's weight gradients
   at 4 x 256 tokens, and 1,500 against 3,200 for the LM head's). torch's strided copy makes that
   row-major copy at ~5 GB/s, more than the product gains (kernels/bf16_products.py).

   A block is 32 rows of 32 elements, one register a row. Transposing swaps each bit of the row
   index with the same bit of the column index; stage h (16, 8, 4, 2, 1) swaps bit h: for rows i
   (bit h clear) and i + h, the columns with bit h set of row i trade places with the columns
   with bit h clear of row i + h, two two-source permutes per pair of rows. */
#include <immintrin.h>
#include <stdint.h>

static inline __mmask32 first32(int64_t n) {
    return n <= 0 ? 0 : n >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << n) - 1);
}

/* Stage h's permutes (_mm512_permutex2var_epi16: index bit 5 takes the second source). Row i's
   new elements: its own where column bit h is clear, else row i + h's column - h; row i + h's:
   row i's column + h where the bit is clear, else its own. */
static void stage_indices(int h, __m512i *low, __m512i *high) {
    uint16_t lo[32], hi[32];
    for (int c = 0; c < 32; c++) {
        lo[c] = (uint16_t)((c & h) ? 32 + c - h : c);
        hi[c] = (uint16_t)((c & h) ? 32 + c : c + h);
    }
    *low = _mm512_loadu_si512(lo);
    *high = _mm512_loadu_si512(hi);
}

/* The block of r <= 32 rows and c <= 32 columns at src (row stride ss) into dst (row stride ds). */
static void block(const uint16_t *src, int64_t ss, uint16_t *dst, int64_t ds, int64_t r, int64_t c,
                  const __m512i *low, const __m512i *high) {
    __m512i x[32];
    __mmask32 cols = first32(c);
    for (int i = 0; i < 32; i++) x[i] = i < r ? _mm512_maskz_loadu_epi16(cols, src + i * ss) : _mm512_setzero_si512();
    for (int s = 0; s < 5; s++) {
        int h = 16 >> s;
        for (int i = 0; i < 32; i++) {
            if (i & h) continue;
            __m512i a = x[i], b = x[i + h];
            x[i] = _mm512_permutex2var_epi16(a, low[s], b);
            x[i + h] = _mm512_permutex2var_epi16(a, high[s], b);
        }
    }
    __mmask32 rows = first32(r);
    if (r == 32 && ((uintptr_t)dst & 63) == 0 && (ds & 31) == 0) {
        /* whole aligned cache lines: streamed, not read first (the LM head's 103 MB gradient:
           24.6 -> 8.5 ms on 2 cores; 6 MB ones ~20% faster) */
        for (int j = 0; j < c; j++) _mm512_stream_si512((void *)(dst + j * ds), x[j]);
        return;
    }
    for (int j = 0; j < c; j++) _mm512_mask_storeu_epi16(dst + j * ds, rows, x[j]);
}

/* dst (cols, rows), row-major, = src (rows, cols) transposed; src's rows `stride` elements apart. */
void gpt2kit_transpose16(const uint16_t *src, uint16_t *dst, int64_t rows, int64_t cols, int64_t stride,
                         int threads) {
    __m512i low[5], high[5];
    for (int s = 0; s < 5; s++) stage_indices(16 >> s, &low[s], &high[s]);
    int64_t row_blocks = (rows + 31) / 32, col_blocks = (cols + 31) / 32;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < row_blocks * col_blocks; t++) {
        int64_t i = (t / col_blocks) * 32, j = (t % col_blocks) * 32;
        block(src + i * stride + j, stride, dst + j * rows + i, rows, rows - i < 32 ? rows - i : 32,
              cols - j < 32 ? cols - j : 32, low, high);
    }
    _mm_sfence();  /* the streamed stores visible before the caller reads dst */
}
