"""The index of each row's largest value for float32 CPU logits in one native call
(native/argmax.c), where torch's max(dim) takes ~40 us over GPT-2's 50,257 logits (~1.5% of a
batch-1 int8 step); the same index, ties and NaN included (tests/test_argmax.py). The decoders'
`argmax` for the sampling chain (applied by the API and CompiledDecoder: inference/ does not
import kernels)."""

from __future__ import annotations

import torch

from ..inference.sampling import greedy
from .native import library


def argmax_rows(x: torch.Tensor) -> torch.Tensor | None:
    """(B,) int64 indices of each row's largest value of x (B, V), the first on ties, a NaN counting
    as the largest; None where the native kernel does not take x (not float32 on CPU with unit
    stride along V, no native kernels here): then use torch."""
    if (x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.stride(1) != 1 or x.shape[1] == 0
            or x.shape[1] >= 2**31 or x.requires_grad or (kernels := library("argmax")) is None):
        return None
    out = torch.empty(x.shape[0], dtype=torch.int64)
    kernels.gpt2kit_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr())
    return out


def fast_argmax(logits: torch.Tensor) -> torch.Tensor:
    """argmax_rows where it takes the logits, else sampling.greedy: a decoder's `argmax`."""
    found = argmax_rows(logits)
    return greedy(logits) if found is None else found
