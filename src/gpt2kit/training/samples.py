"""Samples during training, and whether they copy the training text.

A sample "copies" its training data when it contains a span of COPY_SPAN (16) consecutive tokens
found in the training tokens, or when it is a whole training document shorter than that (the
sample ended with <|endoftext|> and equals a document exactly): one-line jokes are often under
16 tokens, and a verbatim joke is the copy that matters. Only the first INDEX_LIMIT (10M)
training tokens are indexed: 8 bytes per position, 80 MB at most, built once in about a second.
"""

from __future__ import annotations

import numpy as np

from ..config import GenerationConfig
from ..inference.generate import generate_events
from ..model import GPT
from ..tokenizer import Tokenizer
from .runs import SAMPLES, Run

COPY_SPAN = 16
INDEX_LIMIT = 10_000_000
SHORT_DOCUMENTS_LIMIT = 1_000_000
N_SAMPLES, SAMPLE_TOKENS = 3, 48
_PRIME = np.uint64(0x100000001B3)  # FNV-1a's 64-bit prime: any odd multiplier mixes well enough


class CopyDetector:
    """Hashes of every COPY_SPAN-token span of the training text, and of its short documents."""

    def __init__(self, tokens: np.ndarray, eos_id: int):
        t = np.asarray(tokens[:INDEX_LIMIT], dtype=np.uint64)
        self.spans = np.unique(span_hashes(t, COPY_SPAN))  # sorted, for searchsorted
        ends = np.flatnonzero(t == eos_id)
        starts = np.concatenate(([0], ends[:-1] + 1))
        short = [(s, e) for s, e in zip(starts.tolist(), ends.tolist()) if 0 < e - s < COPY_SPAN]
        self.documents = {t[s:e].tobytes() for s, e in short[:SHORT_DOCUMENTS_LIMIT]}

    def copies(self, ids: list[int], ended: bool) -> bool:
        """Does a sample (`ended`: it stopped at <|endoftext|>) copy the training text?"""
        sample = np.asarray(ids, dtype=np.uint64)
        if len(sample) < COPY_SPAN:
            return ended and sample.tobytes() in self.documents
        if not len(self.spans):
            return False
        h = span_hashes(sample, COPY_SPAN)
        at = np.minimum(np.searchsorted(self.spans, h), len(self.spans) - 1)
        return bool(np.any(self.spans[at] == h))


def span_hashes(t: np.ndarray, n: int) -> np.ndarray:
    """A polynomial hash of each n-token window of `t` (uint64, wrapping), one per start position."""
    if len(t) < n:
        return np.empty(0, dtype=np.uint64)
    h = np.zeros(len(t) - n + 1, dtype=np.uint64)
    for j in range(n):
        h = h * _PRIME + t[j:j + len(h)] + np.uint64(1)
    return h


def write_samples(model: GPT, tokenizer: Tokenizer, run: Run, step: int, seed: int,
                  copies: CopyDetector | None) -> list[dict]:
    """N_SAMPLES short samples from an empty prompt (the model in eval mode, then back to its
    mode), appended to samples.jsonl. Seeded by (seed, step): reproducible, and independent of
    the training random state, which they never touch."""
    cfg = GenerationConfig(max_new_tokens=SAMPLE_TOKENS, seed=(seed + step) % 2**63)
    was_training = model.training
    model.eval()
    try:
        events = generate_events(model, tokenizer, [[]] * N_SAMPLES, cfg,
                                 sample_indices=list(range(N_SAMPLES)), prompt_indices=[0] * N_SAMPLES)
        done = {e.row: e.completion for e in events if e.completion is not None}
    finally:
        model.train(was_training)
    records = []
    for i in range(N_SAMPLES):
        c = done[i]
        ended = c.finish_reason == "stop"
        records.append({"step": step, "index": i, "text": c.text, "tokens": len(c.token_ids),
                        "finish_reason": c.finish_reason,
                        "memorized": None if copies is None else copies.copies(c.token_ids, ended)})
        run.append(SAMPLES, records[-1])
    return records
