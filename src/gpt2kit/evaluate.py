"""Loss and perplexity: of a token sequence (score_tokens), of a file's documents
(evaluate_documents) and of validation blocks during training (evaluate_blocks).

One scoring rule throughout, transformers' causal-LM loss: the cross-entropy of float32 logits
at position t against the token at t + 1 (so a bfloat16 model is scored in float32 as well).
Perplexity is exp(mean negative log-likelihood per token), in nats.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch
import torch.nn.functional as F

from .config import _integer
from .errors import OptionError, TokenizerError
from .model import GPT

if TYPE_CHECKING:
    from .blocks import TokenBlocks


@dataclass
class Scores:
    token_logprobs: list[float]  # log p(token_i | the tokens before it), one per scored token
    n_tokens: int
    nll: float  # mean negative log-likelihood, nats per token

    @property
    def ppl(self) -> float:
        return perplexity(self.nll)


def perplexity(nll: float) -> float:
    return math.exp(nll) if nll < 709 else math.inf  # beyond 709 exp overflows a float


def score_tokens(model: GPT, ids: list[int], bos_id: int, stride: int | None = None,
                 batch_size: int = 8) -> Scores:
    """Score every token of `ids`, the first one conditioned on `bos_id` (<|endoftext|>), as GPT-2
    was trained.

    A sequence longer than the context is scored with the sliding windows of the transformers
    perplexity guide (https://huggingface.co/docs/transformers/perplexity): windows of n_positions
    tokens, each `stride` (default n_positions // 2) after the last; every token is scored once,
    in the first window that reaches it, so it sees at least n_positions - stride tokens of
    context. Windows run `batch_size` at a time.
    """
    ids = list(ids)
    n_ctx = model.config.n_positions
    stride = n_ctx // 2 if stride is None else stride
    _check_scoring(ids, bos_id, stride, batch_size, model.config)
    seq = torch.tensor([bos_id, *ids], device=model.transformer.wte.weight.device)
    windows = sliding_windows(len(seq), n_ctx, stride)
    logprobs = []
    with torch.inference_mode(), _eval_mode(model):
        for i in range(0, len(windows), batch_size):
            logprobs += _score_windows(model, seq, windows[i:i + batch_size])
    values = torch.cat(logprobs).tolist()
    return Scores(token_logprobs=values, n_tokens=len(values), nll=-math.fsum(values) / len(values))


def sliding_windows(n: int, n_ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over a sequence of `n` tokens whose
    position 0 is the given <|endoftext|>; together the windows score positions 1..n-1 once each."""
    windows, scored = [], 1
    for begin in range(0, n, stride):
        end = min(begin + n_ctx, n)
        windows.append((begin, end, scored))
        scored = end
        if end == n:
            break
    return windows


def _score_windows(model: GPT, seq: torch.Tensor, windows: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Float32 log-probabilities of each window's scored tokens, the windows run as one batch.

    A window shorter than the others (the last) is padded on the right; under causal attention
    no position sees the padding after it. The LM head runs per window on the scored positions
    only, never on a whole (B, T, V) batch: at GPT-2's vocabulary that would be 1.6 GB in float32
    for 8 windows of 1024 tokens.
    """
    width = max(end - begin for begin, end, _ in windows)
    batch = seq.new_full((len(windows), width), int(seq[0]))  # (B, T)
    for row, (begin, end, _) in enumerate(windows):
        batch[row, :end - begin] = seq[begin:end]
    h = model.hidden(batch)  # (B, T, C)
    out = []
    for row, (begin, end, first) in enumerate(windows):
        logits = model.lm_head(h[row, first - 1 - begin:end - 1 - begin]).float()  # (n, V): t predicts t + 1
        out.append(-F.cross_entropy(logits, seq[first:end], reduction="none"))
    return out


def evaluate_documents(model: GPT, docs: Iterable[list[int]], bos_id: int,
                       stride: int | None = None, batch_size: int = 8) -> Scores:
    """Token-level scores of a file's documents read as one stream,
    [bos] + doc1 + [eos] + doc2 + [eos] ..., as GPT-2 saw its training data. <|endoftext|> is both
    bos and eos in GPT-2, so `bos_id` serves as both. Empty documents are skipped: a blank record
    adds no text and should not add an <|endoftext|> to predict."""
    stream: list[int] = []
    for doc in docs:
        if len(doc):
            stream.extend(doc)
            stream.append(bos_id)
    if not stream:
        raise OptionError("text", "has no tokens to score: every document is empty")
    return score_tokens(model, stream, bos_id, stride, batch_size)


def evaluate_blocks(model: GPT, blocks: TokenBlocks, batch_size: int = 8,
                    max_batches: int | None = None) -> tuple[float, float]:
    """(mean loss, perplexity) over the first `max_batches` batches of `blocks` (all by default),
    exactly as training computes its loss: cross-entropy of logits[:, :-1] against tokens[:, 1:],
    averaged over every predicted token. Runs in eval mode (no dropout), then restores the mode."""
    if _integer("batch_size", batch_size) < 1:
        raise OptionError("batch_size", f"must be at least 1, got {batch_size}")
    if max_batches is not None and _integer("max_batches", max_batches) < 1:
        raise OptionError("max_batches", f"must be at least 1, got {max_batches}")
    if len(blocks) == 0:
        raise OptionError("blocks", f"is empty: the data holds {blocks.n_tokens} tokens, fewer than "
                          f"one block of {blocks.block_size}")
    n_batches = math.ceil(len(blocks) / batch_size)
    n_batches = n_batches if max_batches is None else min(n_batches, max_batches)
    device = model.transformer.wte.weight.device
    total, count = 0.0, 0
    with torch.inference_mode(), _eval_mode(model):
        for i in range(n_batches):
            x = blocks.batch(range(i * batch_size, min((i + 1) * batch_size, len(blocks)))).to(device)
            h = model.hidden(x)  # (B, T, C); the head runs per row, for memory as in _score_windows
            for row in range(x.shape[0]):
                logits = model.lm_head(h[row, :-1]).float()  # (T - 1, V)
                total += F.cross_entropy(logits, x[row, 1:], reduction="sum").item()
                count += x.shape[1] - 1
    loss = total / count
    return loss, perplexity(loss)


@contextmanager
def _eval_mode(model: GPT):
    """Dropout off for scoring, the caller's mode (training, say) restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_scoring(ids: list[int], bos_id: int, stride: int, batch_size: int, cfg) -> None:
    if not ids:
        raise OptionError("text", "is empty: there is no token to score (the first token is "
                          "predicted from <|endoftext|>, so one token is enough)")
    n_ctx = cfg.n_positions
    if not 1 <= _integer("stride", stride) < n_ctx:
        raise OptionError("stride", f"must be in [1, {n_ctx - 1}]: below the context ({n_ctx} tokens) "
                          f"so that windows overlap and every token is scored; got {stride}")
    if _integer("batch_size", batch_size) < 1:
        raise OptionError("batch_size", f"must be at least 1, got {batch_size}")
    low, high = min(min(ids), bos_id), max(max(ids), bos_id)
    if low < 0 or high >= cfg.vocab_size:
        bad = low if low < 0 else high
        raise TokenizerError(f"token id {bad} is outside the model's vocabulary (0..{cfg.vocab_size - 1})")
