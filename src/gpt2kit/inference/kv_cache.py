"""A pre-allocated key/value cache for every layer, written in place by slot.

The caller owns the cache and passes it to `GPT.forward`; nothing is hidden on the model. Each
layer has its own keys and values, (B, nh, L, hs) tensors, so decoding never reallocates or
concatenates. One tensor per layer rather than one (n_layer, ...) stack: a compiled step writes a
stack's layer views through functionalization, which re-made the whole stack for every layer
written (O(n_layer x cache) copies per step; the compiled decode step ran at 0.2-0.6x the eager
one). Separate inputs are mutated in place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from ..model import Positions


class KVCache:
    def __init__(self, k: Sequence[torch.Tensor], v: Sequence[torch.Tensor]):
        """`k`, `v`: one (B, nh, L, hs) tensor per layer, used as they are (writes land in their
        storage)."""
        self.k, self.v = list(k), list(v)

    @classmethod
    def empty(cls, n_layer: int, batch_size: int, n_head: int, max_len: int, head_size: int,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "KVCache":
        shape = (batch_size, n_head, max_len, head_size)
        return cls(*([torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)] for _ in "kv"))

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None) -> "KVCache":
        """A cache of `max_len` slots (default: the context) in the dtype and device of `model`."""
        cfg = model.config
        p = model.transformer.wpe.weight  # never quantized or packed
        return cls.empty(cfg.n_layer, batch_size, cfg.n_head, max_len or cfg.n_positions, cfg.head_size,
                         device=p.device, dtype=p.dtype)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    def tensors(self) -> list[torch.Tensor]:
        """Every layer's keys, then every layer's values."""
        return self.k + self.v

    def update(self, layer: int, at: Positions, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, nh, T, hs) at slots `at.slots`; return the slots `at.keys` covers,
        0..S-1, as (B, nh, S, hs). Under autocast k, v may be narrower than the cache:
        index_copy_ does not convert, so they are cast here."""
        k_all, v_all = self.k[layer], self.v[layer]
        k_all.index_copy_(2, at.slots, k.to(k_all.dtype))
        v_all.index_copy_(2, at.slots, v.to(v_all.dtype))
        S = at.keys.shape[0]
        return k_all.narrow(2, 0, S), v_all.narrow(2, 0, S)

    def rows(self, lo: int, hi: int) -> "KVCache":
        """Batch rows lo..hi-1 as a cache sharing this one's storage: writes to it land here."""
        return KVCache([t[lo:hi] for t in self.k], [t[lo:hi] for t in self.v])

    def move_slots(self, rows: int, src: int, dst: int, length: int) -> None:
        """Move slots src..src+length-1 to dst..dst+length-1 in the first `rows` batch rows."""
        for t in self.tensors():
            t[:rows, :, dst:dst + length] = t[:rows, :, src:src + length].clone()

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy batch row `src` over row `dst` (its first `length` slots)."""
        for t in self.tensors():
            t[dst, :, :length] = t[src, :, :length]

    def read_slots(self, row: int, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of batch row `row`'s keys and values in slots start..start+length-1, each
        (n_layer, nh, length, hs): kept apart from the cache (inference/prefix_cache.py)."""
        return tuple(torch.stack([t[row, :, start:start + length] for t in layers]) for layers in (self.k, self.v))

    def write_slots(self, row: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write `k`, `v` (n_layer, nh, length, hs) to batch row `row`'s slots from `start` on."""
        length = k.shape[2]
        for layers, new in ((self.k, k), (self.v, v)):
            for t, block in zip(layers, new):
                t[row, :, start:start + length] = block
