"""gpt2kit's own C kernels (`kernels/native/*.c`): compiled on first use with the machine's C
compiler, cached on disk, loaded with ctypes, run on torch's own OpenMP threads.

Why C at all: a batch-1 decode step is 49 products of one row, as fast as the weights stream from
memory; oneDNN streams them at about half the speed the memory allows, and an int8 product also
needs ~6 small torch operators quantizing the row (issue 15's profile). One C function per
product does it all (a LayerNorm before and the GELU after included): `int8_rows.c` (int8 x int8,
AVX512-VNNI rows; AMX tiles for many rows, where oneDNN's GEMM spent ~30 us a call before any
work; a decode step's whole int8 block in one call), `f32_rows.c` (float32, AVX512),
`bf16_tiles.c` (bfloat16 on AMX tiles for any number of rows: ~1.9x oneDNN's packed kernels at
decode); `argmax.c` takes the greedy choice over a row of logits; `attention.c` does a decode step's cache write and attention of one query per head
(SDPA's costs ~20 us a layer); `tiles.h` asks Linux for the AMX tiles and configures them.
Training: `dropout.c` (masks from a counter-based generator, `counter_rng.h`), `layer_norm.c` and `causal_softmax.c`
(bfloat16 attention's softmax up to the diagonal, with its dropout), `transpose.c` (a bfloat16
gradient made row-major for its weight-gradient product), `widen.c` (the LM head's bfloat16
gradient to float32, scaled), `grad_norm.c` and `adamw.c` (the optimizer step, writing the next
forward's bfloat16 weights).
Why ctypes, not a torch C++ extension: the kernels take raw pointers only, so they need no torch
headers; the file compiles in well under a second where a C++ extension takes ~40 s.
Why torch's OpenMP runtime: the library is linked against the runtime torch itself loaded (found
in /proc/self/maps), so the kernels share torch's thread pool; a second pool in one process
slows both several times over.

Anything missing (not Linux x86-64, a CPU feature, no C compiler, an unwritable cache, a failed
build) makes `library(name)` None and leaves the callers on their torch path; the reason is logged.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..runtime import cpu_has

SOURCES = Path(__file__).with_name("native")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-ffp-contract=off", "-fPIC")
_P, _N, _F, _T = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int  # pointer, size, float, thread count


@dataclass(frozen=True)
class Library:
    """A C file of kernels/native: the CPU features it needs (torch.cpu probes), its extra compiler
    flags, and each function's (argument types, result type)."""

    needs: tuple[str, ...]
    flags: tuple[str, ...]
    functions: dict[str, tuple[list, object]]


LIBRARIES = {
    "int8_rows": Library(("_is_avx512_supported", "_is_vnni_supported"), ("-mavx512vnni", "-mamx-tile", "-mamx-int8"), {
        "gpt2kit_int8_linear": ([_P, _P, _P, _F] + [_P] * 5 + [_N] * 3 + [ctypes.c_int, _T], ctypes.c_int),
        "gpt2kit_quantize_rows": ([_P, _P, _P, _F, _P, _P] + [_N] * 2 + [_T], ctypes.c_int),
        "gpt2kit_finish_rows": ([_P, _P, _P, _N, _N, ctypes.c_int, _T], None),
        "gpt2kit_int8_mlp": ([_P, _P, _P, _F] + [_P] * 9 + [_N] * 3 + [_T], ctypes.c_int),
        "gpt2kit_int8_attention": ([_P, _P, _P, _F] + [_P] * 6 + [_N] * 3 + [_P, _P, _N] + [_P] * 5 + [_N] * 4 + [_F, _T],
                                   ctypes.c_int),
        "gpt2kit_int8_block": ([_P, _P, _P, _P, _P, _N, _N, _N, _P, _P, _N, _N, _N, _T], ctypes.c_int),
        "gpt2kit_int8_blocks": ([_P, _N, _P, _P, _P, _P, _N, _N, _N, _P, _P, _N, _N, _N, _T], ctypes.c_int),
        "gpt2kit_int8_step": ([_P, _N] + [_P] * 8 + [_N] * 5 + [_T], ctypes.c_int),
        "gpt2kit_tiles_ready": ([], ctypes.c_int),  # AMX: called only where the CPU has it
        "gpt2kit_pack_tiles": ([_P, _P, _N, _N, _T], None),
        "gpt2kit_int8_tiles_linear": ([_P, _P, _P, _F] + [_P] * 4 + [_N] * 3 + [ctypes.c_int, _T], ctypes.c_int)}),
    "bf16_tiles": Library(("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_amx_tile_supported"),
                          ("-mavx512bf16", "-mamx-tile", "-mamx-bf16"), {
        "gpt2kit_bf16_tiles_ready": ([], ctypes.c_int),
        "gpt2kit_pack_bf16_tiles": ([_P, _P, _N, _N, _T], None),
        "gpt2kit_bf16_tiles_linear": ([_P] * 4 + [_N] * 3 + [ctypes.c_int, _T], ctypes.c_int)}),
    "f32_rows": Library(("_is_avx512_supported",), (), {
        "gpt2kit_f32_rows": ([_P, _P, _P, _F] + [_P] * 3 + [_N] * 3 + [ctypes.c_int, _T], ctypes.c_int),
        "gpt2kit_f32_block": ([_P, _P, _P, _P, _P, _N, _N, _N, _P, _P, _N, _N, _N, _T], ctypes.c_int),
        "gpt2kit_f32_blocks": ([_P, _N, _P, _P, _P, _P, _N, _N, _N, _P, _P, _N, _N, _N, _T], ctypes.c_int),
        "gpt2kit_f32_step": ([_P, _N] + [_P] * 8 + [_N] * 5 + [_T], ctypes.c_int)}),
    "causal_softmax": Library(("_is_avx512_supported", "_is_avx512_bf16_supported"), ("-mavx512bf16", "-mavx512dq"), {
        "gpt2kit_causal_softmax": ([_P, _P, _N, _N, _F, ctypes.c_uint64, ctypes.c_int16, _F, _T], None),
        "gpt2kit_causal_softmax_backward": ([_P, _P, _P, _N, _N, _F, _T], None),
        "gpt2kit_softmax_rows": ([_P, _P, _N, _N, _T], None)}),
    "dropout": Library(("_is_avx512_supported",), ("-mavx512dq",), {
        "gpt2kit_keep_bits": ([_P, _N, ctypes.c_uint64, ctypes.c_int16, _T], None),
        "gpt2kit_dropout_widen": ([_P, _P, _N, ctypes.c_uint64, ctypes.c_int16, _F, _T], None),
        "gpt2kit_dropout_narrow": ([_P, _P, _N, ctypes.c_uint64, ctypes.c_int16, _F, _T], None)}),
    "transpose": Library(("_is_avx512_supported",), (), {
        "gpt2kit_transpose16": ([_P, _P, _N, _N, _N, _T], None)}),
    "grad_norm": Library(("_is_avx512_supported",), (), {
        "gpt2kit_sum_squares": ([_P, _P, _P, _N, _T], ctypes.c_double)}),
    "layer_norm": Library(("_is_avx512_supported",), (), {
        "gpt2kit_layer_norm_bf16": ([_P, _P, _P, _F, _P, _P, _P, _N, _N, _T], None),
        "gpt2kit_layer_norm_bf16_backward": ([_P] * 8 + [_N, _N, _T], ctypes.c_int)}),
    "widen": Library(("_is_avx512_supported",), (), {
        "gpt2kit_widen_scaled": ([_P, _P, _N, _F, _T], None)}),
    "adamw": Library(("_is_avx512_supported",), (), {
        "gpt2kit_adamw": ([_P] * 8 + [_N] + [_F] * 5 + [_T], ctypes.c_int)}),
    "argmax": Library(("_is_avx512_supported",), (), {
        "gpt2kit_argmax_rows": ([_P, _N, _N, _N, _P], None)}),
    "attention": Library(("_is_avx512_supported",), (), {
        "gpt2kit_one_query_attention": ([_P, _N, _N, _P, _P, _N, _N, _N, _P, _N, _P] + [_N] * 4 + [_F, _T],
                                        ctypes.c_int),
        "gpt2kit_cached_attention": ([_P, _N, _P, _P, _N, _N, _N, _P, _P, _N, _P] + [_N] * 4 + [_F, _T],
                                     ctypes.c_int),
        "gpt2kit_cached_attention_bf16": ([_P, _N, _P, _P, _N, _N, _N, _P, _P, _N, _P] + [_N] * 4 + [_F, _T],
                                          ctypes.c_int)}),
}

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where built kernels are kept: $GPT2KIT_KERNEL_CACHE, else ~/.cache/gpt2kit/kernels."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2kit" / "kernels"
    return Path(os.environ.get("GPT2KIT_KERNEL_CACHE") or default).expanduser()


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """kernels/native/NAME.c (a key of LIBRARIES), built for this machine and loaded, or None (the
    reason logged at INFO: the callers' torch path is correct, only slower)."""
    spec = LIBRARIES[name]
    try:
        loaded = ctypes.CDLL(str(_built(name, spec)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.info("native kernels %s unavailable (%s); using torch's", name, str(e).splitlines()[0])
        return None
    for function, (arguments, result) in spec.functions.items():
        getattr(loaded, function).argtypes, getattr(loaded, function).restype = arguments, result
    return loaded


def _built(name: str, spec: Library) -> Path:
    """The shared library of kernels/native/NAME.c, built once per (source and headers, compiler,
    flags, OpenMP runtime) and kept in cache_dir(); published by rename, so concurrent builds are
    harmless."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        raise RuntimeError(f"the C kernels are built for Linux x86-64 only, not {platform.system()} {platform.machine()}")
    if missing := [probe for probe in spec.needs if not cpu_has(probe)]:
        raise RuntimeError(f"this CPU fails {', '.join(missing)}")
    compiler, openmp, flags = _compiler(), _openmp_runtime(), FLAGS + spec.flags
    source = SOURCES / f"{name}.c"
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    headers = [header.read_bytes() for header in sorted(SOURCES.glob("*.h"))]  # what the sources include
    key = hashlib.sha256(b"\0".join([source.read_bytes(), *headers, version.encode(), " ".join(flags).encode(),
                                     openmp.encode()]))
    target = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        obj, lib = Path(tmp) / f"{name}.o", Path(tmp) / f"{name}.so"
        # Compile with -fopenmp (the pragmas) but link without it, against torch's runtime only:
        # -fopenmp at link time would add the system's libgomp, a second runtime.
        _run([compiler, *flags, "-fopenmp", "-c", str(source), "-o", str(obj)])
        _run([compiler, "-shared", "-Wl,--no-undefined", str(obj), openmp, "-lm", "-o", str(lib)])
        os.replace(lib, target)
    log.info("built the native kernels %s", target)
    return target


def _compiler() -> str:
    # gcc first: clang's -fopenmp emits calls into LLVM's runtime, which torch's libgomp lacks.
    for name in (os.environ.get("CC"), "gcc", "cc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    raise RuntimeError("no C compiler found (install gcc, or set CC)")


def _openmp_runtime() -> str:
    """The OpenMP runtime torch loaded into this process (libgomp, or Intel's libiomp5, which also
    answers GOMP_* calls)."""
    import torch  # noqa: F401  (loads the runtime)

    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if any(runtime in Path(path).name for runtime in ("libgomp", "libiomp5")):
                return path
    raise RuntimeError("torch runs without an OpenMP runtime here")


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed: {(done.stderr or done.stdout).strip()}")
