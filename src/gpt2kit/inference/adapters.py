"""Several LoRA adapters over one base model, in one batch (issue 16, item 6).

Each adapted linear layer is wrapped in a `MultiLoraLinear` holding every served adapter's A and B
for it; the rows of a batch each name their adapter (an index; -1 is the base model), and each
adapter's low-rank update is added to its own rows only (S-LoRA's and Punica's scheme: one base
product for the whole batch, then a small product per adapter present). So requests for different
fine-tunes decode together in the one running batch, and base rows get exactly the base's output.

Which adapter each row uses is set around a forward call with `AdapterRows.use`, per thread: the
server's decoding thread sets it for its batch, while a forward on any other thread (the Python
API, scoring a prompt) runs the base unless it sets its own.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

BASE = -1  # the adapter index of rows that run the base model


class AdapterRows:
    """Which adapter each batch row of the current thread's forward runs, shared by the model's
    MultiLoraLinear layers: grouped once per forward, not once per layer."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)  # adapter k is names[k]
        self._local = threading.local()

    def groups(self) -> list[tuple[int, torch.Tensor]]:
        """(adapter, its rows (n,)) for each adapter present in the current forward."""
        return getattr(self._local, "groups", [])

    @contextmanager
    def use(self, adapters: Sequence[int], device: torch.device | str = "cpu") -> Iterator[None]:
        """Run the forwards inside with batch row r on adapter `adapters[r]` (BASE: none)."""
        rows: dict[int, list[int]] = {}
        for r, k in enumerate(adapters):
            if k != BASE:
                rows.setdefault(k, []).append(r)
        self._local.groups = [(k, torch.tensor(r, device=device)) for k, r in rows.items()]
        try:
            yield
        finally:
            self._local.groups = []


class MultiLoraLinear(nn.Module):
    """`base_layer(x)`, plus (alpha / r) * B_k A_k x on the rows `rows` puts on adapter k. The
    base layer may be any module computing a linear map (nn.Linear, or a fast path's stand-in)."""

    def __init__(self, base_layer: nn.Module, rows: AdapterRows):
        super().__init__()
        self.base_layer = base_layer
        self.rows = rows
        self.scaling: dict[int, float] = {}

    def add(self, k: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Adapter k's A (r, in) and B (out, r) for this layer."""
        self.register_buffer(f"lora_A_{k}", a)
        self.register_buffer(f"lora_B_{k}", b)
        self.scaling[k] = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, in)
        y = self.base_layer(x)
        for k, rows in self.rows.groups():
            if k not in self.scaling:  # this adapter leaves this layer as it is
                continue
            a, b = getattr(self, f"lora_A_{k}"), getattr(self, f"lora_B_{k}")
            every = len(rows) == len(x)  # one adapter for the whole batch: no gather, no scatter
            # as lora.LoraLinear computes it (the adapter in its own dtype, float32 over bfloat16)
            update = F.linear(F.linear((x if every else x[rows]).to(a.dtype), a), b) * self.scaling[k]
            y = y + update.to(y.dtype) if every else y.index_add(0, rows, update.to(y.dtype))
        return y

    def extra_repr(self) -> str:
        return "adapters: " + ", ".join(f"{self.rows.names[k]} (scale {s:g})" for k, s in self.scaling.items())
