"""A pre-allocated key/value cache, one slab per layer, written in place by position.

The caller owns the cache and passes it to `GPT.forward`; nothing is hidden on the model. Slots are
indexed by position in the (left-padded) batch, so decoding never reallocates or concatenates.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values for every layer: each a tensor of shape (B, nh, max_len + spare_slots, hs),
    of which slots 0..max_len-1 are used (the spare ones are for compiled_decode's shapes)."""

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_size: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 spare_slots: int = 0):
        shape = (batch_size, n_head, max_len + spare_slots, head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None, spare_slots: int = 0) -> "KVCache":
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.n_layer, batch_size, cfg.n_head, max_len or cfg.n_positions, cfg.head_size,
                   device=p.device, dtype=p.dtype, spare_slots=spare_slots)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, nh, T, hs) at slots start..start+T-1; return slots 0..start+T-1 (B, nh, S, hs).

        `start` is a Python int, so a decode step costs no device sync and no index tensor.
        """
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot write up to {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows in `rows` (e.g. after some sequences finished)."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]

    def rows(self, lo: int, hi: int) -> "KVCache":
        """Batch rows lo..hi-1 as a cache sharing this one's storage: writes to it land here."""
        view = object.__new__(KVCache)
        view.k = [t[lo:hi] for t in self.k]
        view.v = [t[lo:hi] for t in self.v]
        view.max_len = self.max_len
        return view

    def move_slots(self, rows: int, src: int, dst: int, length: int) -> None:
        """Move slots src..src+length-1 to dst..dst+length-1 in the first `rows` batch rows."""
        for t in self.k + self.v:
            t[:rows, :, dst:dst + length] = t[:rows, :, src:src + length].clone()

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy batch row `src` over row `dst` (its first `length` slots)."""
        for t in self.k + self.v:
            t[dst, :, :length] = t[src, :, :length]
