/* Many arrays cut into chunks of a fixed number of elements, numbered across all the arrays, so
   one OpenMP loop over the chunks shares out every array's elements evenly (a training step's
   gradients and parameters: a few large matrices and many small vectors). Part of every
   including file's build key (native.py). */
#ifndef GPT2KIT_CHUNKS_H
#define GPT2KIT_CHUNKS_H
#include <stdint.h>
#include <stdlib.h>

/* first[i]: array i's first chunk, first[n]: the number of chunks; malloc'd (free it), NULL
   without memory. */
static inline int64_t *chunk_starts(const int64_t *sizes, int64_t n, int64_t chunk) {
    int64_t *first = malloc((size_t)(n + 1) * sizeof(int64_t));
    if (!first) return NULL;
    first[0] = 0;
    for (int64_t i = 0; i < n; i++) first[i + 1] = first[i] + (sizes[i] + chunk - 1) / chunk;
    return first;
}

/* The array holding chunk c: the last i with first[i] <= c. */
static inline int64_t chunk_array(const int64_t *first, int64_t n, int64_t c) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (first[mid] <= c) lo = mid; else hi = mid - 1;
    }
    return lo;
}
#endif
