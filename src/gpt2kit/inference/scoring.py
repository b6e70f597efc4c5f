"""Loss and perplexity: of a token sequence (score_tokens), of a file's documents
(evaluate_documents) and of validation blocks during training (evaluate_blocks).

One scoring rule throughout, transformers' causal-LM loss: the cross-entropy of float32 logits
at position t against the token at t + 1 (so a bfloat16 model is scored in float32 as well).
Perplexity is exp(mean negative log-likelihood per token), in nats. `score_sequences` is the one
path for token sequences: `gpt2kit eval` (one stream of documents) and `Model.score` (many
texts, batched) both run through it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import SCORE_BATCH_SIZE, check_integer
from ..errors import OptionError, TokenizerError
from ..model import GPT

if TYPE_CHECKING:
    from ..data.blocks import TokenBlocks

# Scored positions whose logits exist at once: (1024, V) float32 is 206 MB at GPT-2's vocabulary.
HEAD_ROWS = 1024


@dataclass
class Scores:
    token_logprobs: list[float]  # log p(token_i | the tokens before it), one per scored token
    n_tokens: int
    nll: float  # mean negative log-likelihood, nats per token
    token_ids: list[int] = field(default_factory=list)  # the scored tokens (not the leading <|endoftext|>)

    @property
    def ppl(self) -> float:
        return perplexity(self.nll)

    @property
    def total(self) -> float:
        """Log-probability of the whole sequence (nats): the sum of `token_logprobs`."""
        return math.fsum(self.token_logprobs)


def perplexity(nll: float) -> float:
    return math.exp(nll) if nll < 709 else math.inf  # beyond 709 exp overflows a float


def score_tokens(model: GPT, ids: list[int], bos_id: int, stride: int | None = None,
                 batch_size: int = SCORE_BATCH_SIZE) -> Scores:
    """Score every token of `ids`, the first one conditioned on `bos_id` (<|endoftext|>), as GPT-2
    was trained.

    A sequence longer than the context is scored with the sliding windows of the transformers
    perplexity guide (https://huggingface.co/docs/transformers/perplexity): windows of n_positions
    tokens, each `stride` (default n_positions // 2) after the last; every token is scored once,
    in the first window that reaches it, so it sees at least n_positions - stride tokens of
    context. Windows run `batch_size` at a time.
    """
    return score_sequences(model, [ids], bos_id, stride, batch_size)[0]


def score_sequences(model: GPT, seqs: Sequence[list[int]], bos_id: int, stride: int | None = None,
                    batch_size: int = SCORE_BATCH_SIZE, progress: bool = False) -> list[Scores]:
    """`score_tokens` of each sequence in `seqs`, computed together: the windows of every
    sequence run `batch_size` at a time, longest first, so short texts share a forward pass and
    a batch holds windows of similar length (little padding). A sequence's scores do not depend
    on what else is in its batch (right padding is invisible under causal attention).
    `progress` shows a bar of windows scored, on stderr."""
    seqs = [list(ids) for ids in seqs]
    n_ctx = model.config.n_positions
    stride = n_ctx // 2 if stride is None else stride
    _check_scoring(seqs, bos_id, stride, batch_size, model.config)
    device = model.transformer.wte.weight.device
    full = [torch.tensor([bos_id, *ids], device=device) for ids in seqs]
    jobs = [(k, w) for k, seq in enumerate(full) for w in sliding_windows(len(seq), n_ctx, stride)]
    order = sorted(range(len(jobs)), key=lambda j: jobs[j][1][0] - jobs[j][1][1])  # widest first
    logprobs: list[torch.Tensor | None] = [None] * len(jobs)
    with torch.inference_mode(), eval_mode(model), \
            tqdm(total=len(jobs), unit="window", desc="scoring", disable=not progress) as bar:
        for i in range(0, len(order), batch_size):
            chunk = order[i:i + batch_size]
            rows = [(full[jobs[j][0]], jobs[j][1]) for j in chunk]
            for j, values in zip(chunk, _score_windows(model, rows)):
                logprobs[j] = values
            bar.update(len(chunk))
    per_seq: list[list[torch.Tensor]] = [[] for _ in seqs]
    for (k, _), values in zip(jobs, logprobs):  # jobs list each sequence's windows in order
        per_seq[k].append(values)
    return [_scores(ids, torch.cat(parts).tolist()) for ids, parts in zip(seqs, per_seq)]


def _scores(ids: list[int], values: list[float]) -> Scores:
    return Scores(token_logprobs=values, n_tokens=len(values), nll=-math.fsum(values) / len(values),
                  token_ids=ids)


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


def _score_windows(model: GPT, rows: list[tuple[torch.Tensor, tuple[int, int, int]]]) -> list[torch.Tensor]:
    """Float32 log-probabilities of the scored tokens of each (sequence, window), run as one batch.

    Windows shorter than the widest are padded on the right; under causal attention no position
    sees the padding after it. The LM head runs on the scored positions only, HEAD_ROWS at a time,
    never on a whole (B, T, V) batch: at GPT-2's vocabulary that would be 1.6 GB in float32 for
    8 windows of 1024 tokens.
    """
    width = max(end - begin for _, (begin, end, _) in rows)
    batch = rows[0][0].new_zeros((len(rows), width))  # (B, T); token 0 pads
    for r, (seq, (begin, end, _)) in enumerate(rows):
        batch[r, :end - begin] = seq[begin:end]
    h, _ = model.hidden(batch)  # (B, T, C)
    # Position t predicts token t + 1: the hidden states before each scored token, as one (N, C).
    x = torch.cat([h[r, first - 1 - begin:end - 1 - begin]
                   for r, (_, (begin, end, first)) in enumerate(rows)])
    targets = torch.cat([seq[first:end] for seq, (_, end, first) in rows])  # (N,)
    values = torch.cat([-F.cross_entropy(model.lm_head(x[i:i + HEAD_ROWS]).float(), targets[i:i + HEAD_ROWS],
                                         reduction="none") for i in range(0, len(x), HEAD_ROWS)])
    return list(values.split([end - first for _, (_, end, first) in rows]))


def evaluate_documents(model: GPT, docs: Iterable[list[int]], bos_id: int,
                       stride: int | None = None, batch_size: int = SCORE_BATCH_SIZE) -> Scores:
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


def evaluate_blocks(model: GPT, blocks: TokenBlocks, batch_size: int = SCORE_BATCH_SIZE,
                    max_batches: int | None = None) -> tuple[float, float]:
    """(mean loss, perplexity) over the first `max_batches` batches of `blocks` (all by default),
    exactly as training computes its loss: cross-entropy of logits[:, :-1] against tokens[:, 1:],
    averaged over every predicted token the blocks' mask trains on (all without a mask; NaN if
    none is). Runs in eval mode (no dropout), then restores the mode."""
    if check_integer("batch_size", batch_size) < 1:
        raise OptionError("batch_size", f"must be at least 1, got {batch_size}")
    if max_batches is not None and check_integer("max_batches", max_batches) < 1:
        raise OptionError("max_batches", f"must be at least 1, got {max_batches}")
    if len(blocks) == 0:
        raise OptionError("blocks", f"is empty: the data holds {blocks.n_tokens} tokens, fewer than "
                          f"one block of {blocks.block_size}")
    n_batches = math.ceil(len(blocks) / batch_size)
    n_batches = n_batches if max_batches is None else min(n_batches, max_batches)
    device = model.transformer.wte.weight.device
    total, count = 0.0, 0
    with torch.inference_mode(), eval_mode(model):
        for i in range(n_batches):
            x, trained = blocks.batch_and_mask(range(i * batch_size, min((i + 1) * batch_size, len(blocks))))
            x = x.to(device)
            h, _ = model.hidden(x)  # (B, T, C); the head runs per row, for memory as in _score_windows
            for row in range(x.shape[0]):
                keep = slice(None) if trained is None else trained[row, 1:].to(device)
                logits = model.lm_head(h[row, :-1][keep]).float()  # (targets, V)
                total += F.cross_entropy(logits, x[row, 1:][keep], reduction="sum").item()
                count += logits.shape[0]
    loss = total / count if count else math.nan
    return loss, perplexity(loss)


@contextmanager
def eval_mode(model: GPT):
    """Dropout off for scoring, the caller's mode (training, say) restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_scoring(seqs: list[list[int]], bos_id: int, stride: int, batch_size: int, cfg) -> None:
    n_ctx = cfg.n_positions
    if not 1 <= check_integer("stride", stride) < n_ctx:
        raise OptionError("stride", f"must be in [1, {n_ctx - 1}]: below the context ({n_ctx} tokens) "
                          f"so that windows overlap and every token is scored; got {stride}")
    if check_integer("batch_size", batch_size) < 1:
        raise OptionError("batch_size", f"must be at least 1, got {batch_size}")
    if not seqs:
        raise OptionError("texts", "is an empty list: give at least one text to score")
    for k, ids in enumerate(seqs):
        if not ids:
            where = "" if len(seqs) == 1 else f"{k + 1} of {len(seqs)} "
            raise OptionError("text", f"{where}is empty: there is no token to score (the first token "
                              "is predicted from <|endoftext|>, so one token is enough)")
        low, high = min(min(ids), bos_id), max(max(ids), bos_id)
        if low < 0 or high >= cfg.vocab_size:
            bad = low if low < 0 else high
            raise TokenizerError(f"token id {bad} is outside the model's vocabulary (0..{cfg.vocab_size - 1})")
