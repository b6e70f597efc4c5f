"""Sequences decoding together over one pre-allocated KV cache, joining and leaving between steps.

This is what continuous batching needs (the server adds requests to a running batch and drops
finished or cancelled ones at every step), and plain batch generation is its simplest use.

Layout: batch row r of the cache holds one sequence, right-aligned so that every row's next token
goes to the same slot `start` (one decode step is then one forward pass with a scalar position).
Row r's text fills slots pad[r]..start-1; the slots before pad[r] are hidden from attention and
its positions count from 0 after them, as for any left-padded batch (model.attention_mask).

  - join: the new sequences are prefilled into free rows, ending at `start` (if one is longer
    than `start`, the running rows are first moved right to make room);
  - leave: the last row is copied into the leaver's place, so live rows stay 0..B-1;
  - full cache (start == max_len): the columns of padding every row has are dropped (all rows
    move left); a row with no padding has filled the window, and is handed back to be re-joined
    with a shorter context (sliding window).
"""

from __future__ import annotations

from typing import Generic, Sequence, TypeVar

import torch

from ..kernels import compiled_decode
from ..model import GPT
from .kv_cache import KVCache

R = TypeVar("R")


class RunningBatch(Generic[R]):
    """Up to `capacity` sequences (any row objects `R`) with their next-token logits.

    `compiled`: True (default) decodes with the step `compiled_decode.enable` attached to the
    model, if any; False decodes eagerly; or the `CompiledDecode` step to use."""

    def __init__(self, model: GPT, capacity: int, max_len: int | None = None,
                 compiled: compiled_decode.CompiledDecode | bool = True):
        self.model = model
        self.compiled = compiled_decode.attached(model) if compiled is True else compiled or None
        if self.compiled:  # a cache of the compiled step's shape (it may have spare rows and slots)
            self.cache = self.compiled.new_cache(capacity, max_len)
        else:
            self.cache = KVCache.for_model(model, capacity, max_len)
        self.capacity = capacity
        self.rows: list[R] = []
        self.pads: list[int] = []
        self.start = 0  # the slot the next token of every row is written to
        self.logits: torch.Tensor | None = None  # (B, V) float32, next-token logits per row

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def free(self) -> int:
        return self.capacity - len(self.rows)

    def join(self, rows: Sequence[R], contexts: Sequence[list[int]]) -> None:
        """Prefill `contexts` (token ids, each non-empty) as new rows; their logits join `self.logits`."""
        if len(rows) > self.free:
            raise ValueError(f"{len(rows)} rows do not fit: {self.free} of {self.capacity} free")
        longest = max(len(c) for c in contexts)
        if longest > self.cache.max_len:
            raise ValueError(f"a context of {longest} tokens does not fit a cache of {self.cache.max_len}")
        if not self.rows:
            self.start = longest
        elif longest > self.start:  # move the running rows right so the new ones fit before `start`
            shift = longest - self.start
            self.cache.move_slots(len(self.rows), 0, shift, self.start)
            self.pads = [p + shift for p in self.pads]
            self.start = longest
        lo, hi = len(self.rows), len(self.rows) + len(rows)
        pads = [self.start - len(c) for c in contexts]
        first = self.start - longest  # the first slot this prefill writes
        device = self.cache.k[0].device
        idx = torch.tensor([[0] * (p - first) + c for p, c in zip(pads, contexts)], device=device)
        pad = torch.tensor(pads, device=device) if any(pads) else None
        logits = self.model(idx, first, self.cache.rows(lo, hi), pad, last_only=True)[:, -1].float()
        self.rows += rows
        self.pads += pads
        self.logits = logits if self.logits is None or lo == 0 else torch.cat([self.logits[:lo], logits])

    def leave(self, rows: Sequence[R]) -> None:
        """Drop `rows` from the batch (their cache rows are reused by later joins)."""
        gone = {id(row) for row in rows}
        for r in reversed(range(len(self.rows))):
            if id(self.rows[r]) in gone:
                self._drop(r)
        if not self.rows:
            self.logits, self.start = None, 0

    def _drop(self, r: int) -> None:
        last = len(self.rows) - 1
        if r != last:
            self.cache.copy_row(last, r, self.start)
            self.rows[r], self.pads[r] = self.rows[last], self.pads[last]
            self.logits[r] = self.logits[last]
        self.rows.pop()
        self.pads.pop()
        self.logits = self.logits[:last]

    def make_room(self) -> list[R]:
        """Ensure slot `start` is free for the next decode step. Rows that have filled the whole
        cache leave the batch and are returned: re-join them with a shorter context."""
        if self.start < self.cache.max_len or not self.rows:
            return []
        full = [row for row, p in zip(self.rows, self.pads) if p == 0]
        self.leave(full)
        if self.rows:
            drop = min(self.pads)
            self.cache.move_slots(len(self.rows), drop, 0, self.start - drop)
            self.pads = [p - drop for p in self.pads]
            self.start -= drop
        return full

    def decode(self, tokens: Sequence[int]) -> None:
        """Feed one token per row (in row order) at slot `start`; refresh `self.logits`."""
        if self.compiled:
            self.logits = self.compiled(self.cache, list(tokens), self.start, self.pads)
            self.start += 1
            return
        device = self.cache.k[0].device
        idx = torch.tensor(tokens, device=device)[:, None]
        pad = torch.tensor(self.pads, device=device) if any(self.pads) else None
        view = self.cache.rows(0, len(self.rows))
        self.logits = self.model(idx, self.start, view, pad, last_only=True)[:, -1].float()
        self.start += 1
