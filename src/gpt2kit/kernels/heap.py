"""Training on CPU: keep freed memory in the C heap for the next step instead of the OS.

A training step frees and reallocates the same tensors every step. glibc's malloc serves those
of 32 MB or more (the LM head's bfloat16 copy, a chunk of logits, the head's float32 gradient)
with fresh mmaps, and hands the top of its heap back to the OS when enough is free, so every step
touches newly zeroed pages again: ~250,000 page faults (1 GB) per step of GPT-2 124M at 4 x 256
tokens, ~20% of a bfloat16 step on one core of this project's Xeon (2.42-2.58 -> 2.01-2.08 s of
CPU time with this, interleaved fresh processes; peak RSS 3,165 -> 3,242 MB).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
# Bytes free at the heap's top before malloc gives them back: -1, never (mallopt(3)). The largest
# int, 2 GB, was less than a step at 8 x 1024 tokens frees (~9 GB of activations): the seed job's
# steps re-faulted ~2.5 GB each (~630,000 faults, ~6% of a step).
KEEP_UP_TO = -1
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536  # glibc's defaults (mallopt(3))


@contextlib.contextmanager
def freed_memory_held(active: bool = True) -> Iterator[bool]:
    """While inside, glibc's malloc serves every size from its heap (no mmap) and keeps freed
    memory (no trim): peak memory stays resident, paid once. On leaving, glibc's
    defaults come back and the free memory goes back to the OS (a Python caller of `finetune`
    keeps its process). Yields whether it was set: not where malloc is not glibc's (macOS,
    musl), or when `active` is False."""
    libc = _glibc() if active else None
    if libc is None or not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, KEEP_UP_TO)):
        yield False
        return
    try:
        yield True
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2") and not hasattr(libc, "mallinfo"):  # glibc's; musl has neither
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc
