"""The machine a benchmark ran on, one line for the head of its results table: the CPU, which
matrix-engine flags it has, torch and the thread count (`machine_header`). Every benchmark prints
it first, so a table pasted into RESULTS.md says what it was measured on.

    from machine import machine_header   # benchmarks/ is the script's own directory
    print(machine_header(args.threads))
"""

from __future__ import annotations

import platform
from pathlib import Path

# The x86 flags that say which matrix engines the CPU offers (and so which int8/bf16 kernels
# the engines can pick): results from machines with and without them don't compare.
MATRIX_FLAGS = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


def cpu() -> tuple[str, set[str] | None]:
    """(the CPU's model name, its flags; None where /proc/cpuinfo is missing: unknown, not absent)."""
    name = platform.processor() or "unknown CPU"
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        return name, None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
        elif key.strip() == "flags":
            return name, set(value.split())  # every core lists the same
    return name, None


def machine_header(threads: int) -> str:
    """One line for the head of a results table: the CPU, which of MATRIX_FLAGS it has (the
    kernels an engine can use: int8 and bf16 results move with them), torch and the threads."""
    import torch  # here, not at import: a script may parse its arguments without torch
    name, flags = cpu()
    rest = f"torch {torch.__version__}; {threads} threads"
    if flags is None:
        return f"CPU: {name}; matrix flags unknown (no /proc/cpuinfo); {rest}"
    has = " ".join(f for f in MATRIX_FLAGS if f in flags) or "none"
    lacks = " ".join(f for f in MATRIX_FLAGS if f not in flags) or "none"
    return f"CPU: {name}; matrix flags: has {has}, lacks {lacks}; {rest}"
