"""Cold start and resident memory (issue 5): what a whole `gpt2kit.load` + generate process
imports, and that loading leaves neither the weights file mapped nor freed heap behind."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from gpt2kit.api import release_free_heap


def resident_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_release_free_heap_gives_freed_heap_pages_back():
    """64 MB of small malloc blocks, freed except the last: glibc keeps the freed pages resident
    (the live block above them stops it shrinking the heap) until malloc_trim returns them."""
    libc = ctypes.CDLL(None)
    if not sys.platform.startswith("linux") or getattr(libc, "malloc_trim", None) is None:
        pytest.skip("no glibc malloc_trim here (not Linux, or musl): release_free_heap does nothing")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 64 * 1024, 1024  # blocks below glibc's mmap threshold (128 KB) come from the heap
    blocks = [libc.malloc(size) for _ in range(count)]
    for block in blocks:
        ctypes.memset(block, 1, size)  # touched, so resident
    try:
        for block in blocks[:-1]:
            libc.free(block)
        freed = resident_bytes()
        release_free_heap()
        assert freed - resident_bytes() > size * count // 2
        release_free_heap()  # nothing left to give back: still fine
    finally:
        libc.free(blocks[-1])


def test_load_and_generate_import_nothing_heavy_and_release_the_file(tiny_folder):
    """A fresh process, as at a cold start: no torch._dynamo (~1 s), no transformers, server or
    hub code on the generate path, and the safetensors file no longer mapped after load."""
    script = f"""
import sys, gpt2kit
model = gpt2kit.load({str(tiny_folder)!r}, device="cpu")
model.generate("Hello", max_new_tokens=3, temperature=0)
heavy = [m for m in ("torch._dynamo", "transformers", "fastapi", "uvicorn", "huggingface_hub")
         if m in sys.modules]
assert not heavy, heavy
import os
weights = {str(tiny_folder / "model.safetensors")!r}
assert os.path.exists(weights)
try:
    maps = open("/proc/self/maps").read()
except OSError:  # not Linux: no map to read
    maps = ""
assert weights not in maps
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-800:]
