/* AMX tiles, shared by int8_rows.c and bf16_rows.c: Linux's permission and the one tile shape
   both use (16 rows of 64 bytes). Part of every including file's build key (native.py). */
#ifndef GPT2KIT_TILES_H
#define GPT2KIT_TILES_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define TILE_BYTES 1024  /* 16 rows of 64 bytes */

/* Linux gives a process AMX's tile registers only once it asks (ARCH_REQ_XCOMP_PERM for
   XFEATURE_XTILEDATA); 1 if granted (or already). */
static inline int tiles_permitted(void) {
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
};

/* Tiles 0-7 as 16 rows of 64 bytes, for the calling thread. */
static inline void configure_tiles(void) {
    struct tile_config cfg = {0};
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.bytes_per_row[t] = 64; }
    /* inline assembly reading cfg: GCC 12 dropped the stores into a config passed to the builtin */
    __asm__ volatile("ldtilecfg %0" :: "m"(cfg));
}

/* w (N, K), elements of `size` bytes (1 or 2), into the B-tile layout of TDPBSSD / TDPBF16PS: for
   each block of 16 rows of w (output columns) and each P = 64 / size of K, a tile whose row r
   holds, for its 16 columns n, the 4 / size consecutive elements of K from P kb + (4 / size) r,
   zero-padded at the edges; the blocks of K of one column block contiguous. `tiles`:
   ceil(N / 16) * ceil(K / P) * 1024 bytes. Inlined with a constant `size`, so the copies are plain
   loads and stores. */
static inline __attribute__((always_inline)) void pack_tiles(const uint8_t *w, uint8_t *tiles, int64_t N, int64_t K, int size, int threads) {
    int64_t per = 4 / size, P = 16 * per, NB = (N + 15) / 16, KB = (K + P - 1) / P;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t nb = 0; nb < NB; nb++)
        for (int64_t kb = 0; kb < KB; kb++) {
            uint8_t *t = tiles + (nb * KB + kb) * TILE_BYTES;
            memset(t, 0, TILE_BYTES);
            for (int r = 0; r < 16; r++)
                for (int n = 0; n < 16; n++)
                    for (int64_t j = 0, row = nb * 16 + n, col = kb * P + per * r; j < per; j++)
                        if (row < N && col + j < K)
                            memcpy(t + r * 64 + n * 4 + j * size, w + (row * K + col + j) * size, (size_t)size);
        }
}

#endif
