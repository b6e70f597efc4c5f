"""A pre-allocated key/value cache for every layer, written in place by slot.

The caller owns the cache and passes it to `GPT.forward`; nothing is hidden on the model. Keys
and values are two tensors of shape (n_layer, B, nh, L, hs), so decoding never reallocates or
concatenates, and a compiled step sees two inputs, not two per layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..model import Positions


class KVCache:
    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        """`k`, `v`: (n_layer, B, nh, L, hs), used as they are (writes land in their storage)."""
        self.k, self.v = k, v

    @classmethod
    def empty(cls, n_layer: int, batch_size: int, n_head: int, max_len: int, head_size: int,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "KVCache":
        shape = (n_layer, batch_size, n_head, max_len, head_size)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None) -> "KVCache":
        """A cache of `max_len` slots (default: the context) in the dtype and device of `model`."""
        cfg = model.config
        p = model.transformer.wpe.weight  # never quantized or packed
        return cls.empty(cfg.n_layer, batch_size, cfg.n_head, max_len or cfg.n_positions, cfg.head_size,
                         device=p.device, dtype=p.dtype)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

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
        return KVCache(self.k[:, lo:hi], self.v[:, lo:hi])

    def move_slots(self, rows: int, src: int, dst: int, length: int) -> None:
        """Move slots src..src+length-1 to dst..dst+length-1 in the first `rows` batch rows."""
        for t in (self.k, self.v):
            t[:, :rows, :, dst:dst + length] = t[:, :rows, :, src:src + length].clone()

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy batch row `src` over row `dst` (its first `length` slots)."""
        for t in (self.k, self.v):
            t[:, dst, :, :length] = t[:, src, :, :length]
