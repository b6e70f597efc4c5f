/* AMX tiles, shared by int8_rows.c and bf16_rows.c: Linux's permission and the one tile shape
   both use (16 rows of 64 bytes). Part of every including file's build key (native.py). */
#ifndef GPT2KIT_TILES_H
#define GPT2KIT_TILES_H
#include <immintrin.h>
#include <stdint.h>
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

#endif
