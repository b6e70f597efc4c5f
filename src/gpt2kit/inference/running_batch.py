"""Sequences decoding together over one pre-allocated KV cache, joining and leaving between steps.

This is what continuous batching needs (the server adds requests to a running batch and drops
finished or cancelled ones at every step), and plain batch generation is its simplest use.

Layout: batch row r of the cache holds one sequence, right-aligned so that every row's next token
goes to the same slot `start` (one decode step is then one forward pass with a scalar position).
Row r's text fills slots pad[r]..start-1; the slots before pad[r] are hidden from attention and
its positions count from 0 after them, as for any left-padded batch (model.Positions).

  - join: the new sequences are prefilled into free rows, ending at `start` (if one is longer
    than `start`, the running rows are first moved right to make room); with a prefix cache
    (prefix_cache.py), the blocks a context starts with that are cached are copied into its row
    and only the rest is computed;
  - leave: the last row is copied into the leaver's place, so live rows stay 0..B-1;
  - full cache (start == max_len): the columns of padding every row has are dropped (all rows
    move left); a row with no padding has filled the window, and is handed back to be re-joined
    with a shorter context (sliding window).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Generic, Protocol, Sequence, TypeVar

import torch

from ..model import GPT, Positions
from .adapters import BASE, AdapterRows
from .kv_cache import KVCache
from .prefix_cache import PrefixCache
from .sampling import greedy

R = TypeVar("R")


class Decoder(Protocol):
    """One decode step over a cache it allocated: `EagerDecoder`, or a fast path's
    (kernels/compiled_decode.CompiledDecoder), chosen by whoever builds the batch."""

    def new_cache(self, capacity: int, max_len: int | None) -> KVCache:
        """A cache for up to `capacity` rows of `max_len` slots (the decoder may round them up)."""

    def __call__(self, cache: KVCache, tokens: list[int], start: int, pads: list[int]) -> torch.Tensor:
        """Next-token logits (len(tokens), V) float32 after feeding one token per live row
        (rows 0..len(tokens)-1 of the cache) at slot `start`; `pads` is each row's padding."""

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's index of its largest logit, for the sampling chain (sampling.greedy's index)."""


class EagerDecoder:
    """The model's forward as it is, over the live rows and the written slots only; `argmax`:
    sampling.greedy, or a fast path's (the API gives CPU models kernels/argmax.py's)."""

    def __init__(self, model: GPT, argmax: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model = model
        self.argmax = argmax or greedy

    def new_cache(self, capacity: int, max_len: int | None) -> KVCache:
        return KVCache.for_model(self.model, capacity, max_len)

    def __call__(self, cache: KVCache, tokens: list[int], start: int, pads: list[int]) -> torch.Tensor:
        device = cache.device
        idx = torch.tensor(tokens, device=device)[:, None]
        pad = torch.tensor(pads, device=device) if any(pads) else None
        at = Positions.at(start, 1, pad, device)
        return self.model(idx, cache.rows(0, len(tokens)), at, last_only=True)[:, -1].float()


class RunningBatch(Generic[R]):
    """Up to `capacity` sequences (any row objects `R`) with their next-token logits. Prompts
    are prefilled by the model's forward; each decode step is `decoder`'s (default: eager)."""

    def __init__(self, model: GPT, capacity: int, max_len: int | None = None, decoder: Decoder | None = None,
                 prefix_cache: PrefixCache | None = None, adapters: AdapterRows | None = None):
        self.model = model
        self.prefix_cache = prefix_cache  # prompt starts' keys and values, shared with later batches
        self.adapters = adapters  # the LoRA adapters rows may pick (inference/adapters.py), if any
        self.adapter_ids: list[int] = []  # each row's (BASE: none)
        self.decoder = decoder or EagerDecoder(model)
        self.cache = self.decoder.new_cache(capacity, max_len)
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

    def join(self, rows: Sequence[R], contexts: Sequence[list[int]], reuse: bool = True,
             adapters: Sequence[int] | None = None) -> None:
        """Prefill `contexts` (token ids, each non-empty) as new rows; their logits join `self.logits`.
        `adapters`: each row's LoRA adapter (default: none). With a prefix cache and `reuse`, the
        cached blocks a context starts with are copied in instead of computed, and its own blocks
        are kept for later joiners; a context that needs a block another joiner will compute
        joins just after that one, to reuse it."""
        ids = list(adapters) if adapters is not None else [BASE] * len(rows)
        self._check_join(len(rows), max(len(c) for c in contexts), ids)
        prefix = self.prefix_cache if reuse else None
        later = prefix.shares_new_block(contexts, ids) if prefix is not None else [False]
        if any(later):
            for wave in (False, True):
                picked = [k for k, w in enumerate(later) if w == wave]
                self.join([rows[k] for k in picked], [contexts[k] for k in picked], adapters=[ids[k] for k in picked])
            return
        self._end_at(max(len(c) for c in contexts))
        lo = len(self.rows)
        pads = [self.start - len(c) for c in contexts]
        known = [prefix.load(c, self.cache, lo + k, p, a) if prefix is not None else 0
                 for k, (c, p, a) in enumerate(zip(contexts, pads, ids))]
        with self._selected(ids):
            logits = self._prefill(lo, contexts, pads, known)
        if prefix is not None:
            for k, (c, p, a) in enumerate(zip(contexts, pads, ids)):
                prefix.store(c, self.cache, lo + k, p, a)
        self.rows += rows
        self.pads += pads
        self.adapter_ids += ids
        self.logits = logits if self.logits is None or lo == 0 else torch.cat([self.logits[:lo], logits])

    def _check_join(self, n: int, longest: int, adapters: list[int]) -> None:
        if n > self.free:
            raise ValueError(f"{n} rows do not fit: {self.free} of {self.capacity} free")
        if longest > self.cache.max_len:
            raise ValueError(f"a context of {longest} tokens does not fit a cache of {self.cache.max_len}")
        served = len(self.adapters.names) if self.adapters is not None else 0
        if any(not BASE <= k < served for k in adapters):
            raise ValueError(f"adapters {adapters} name ones this batch does not have ({served})")

    def _selected(self, adapters: list[int]) -> ContextManager:
        """Forwards inside run batch row r on adapter adapters[r]."""
        if self.adapters is None:
            return nullcontext()
        return self.adapters.use(adapters, self.cache.device)

    def _end_at(self, longest: int) -> None:
        """Make `start` at least `longest`, moving the running rows right if they end earlier."""
        if not self.rows:
            self.start = longest
        elif longest > self.start:
            shift = longest - self.start
            self.cache.move_slots(len(self.rows), 0, shift, self.start)
            self.pads = [p + shift for p in self.pads]
            self.start = longest

    def _prefill(self, lo: int, contexts: Sequence[list[int]], pads: list[int], known: list[int]) -> torch.Tensor:
        """Run batch rows lo.. (context k ending at `start`, its first known[k] tokens already in the
        cache) from the first slot one of them still needs; their next-token logits (n, V)."""
        first = min(p + n for p, n in zip(pads, known))
        device = self.cache.device
        idx = torch.tensor([[0] * max(0, p - first) + c[max(0, first - p):] for p, c in zip(pads, contexts)],
                           device=device)
        pad = torch.tensor(pads, device=device) if any(pads) else None
        at = Positions.at(first, idx.shape[1], pad, device)
        return self.model(idx, self.cache.rows(lo, lo + len(contexts)), at, last_only=True)[:, -1].float()

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
            self.adapter_ids[r] = self.adapter_ids[last]
            self.logits[r] = self.logits[last]
        self.rows.pop()
        self.pads.pop()
        self.adapter_ids.pop()
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
        with self._selected(self.adapter_ids):
            self.logits = self.decoder(self.cache, list(tokens), self.start, self.pads)
        self.start += 1
