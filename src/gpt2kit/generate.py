"""Generation: prefill the prompts once, then decode one token per step against a KV cache.

`generate_events` is a generator of text events, so streaming and batch generation are the same
code. Prompts of different lengths share a batch through left padding (the model hides padded
keys and starts each row's positions after its padding). Stop rules live here, not in the model
or the sampler: <|endoftext|>, stop strings (text that might still become a stop string is held
back, never emitted then retracted) and the token budget. A finished row leaves the batch at once.
Each row samples from its own generator, seeded from (seed, sample index), so a prompt's text
does not depend on what else is in the batch.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Iterator

import torch

from . import sampling
from .config import GenerationConfig
from .errors import PromptTooLong
from .kv_cache import KVCache
from .model import GPT
from .runtime import make_generator
from .tokenizer import StreamDecoder, Tokenizer

# When generation runs past the context window, keep this fraction of it and re-prefill.
SLIDE_KEEP = 0.75


@dataclass
class TokenLogprob:
    """A chosen token's log-probability under the model (before any sampling filters), and the
    `logprobs` most likely alternatives."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]


@dataclass
class Completion:
    """One generated continuation: the richer result behind `Model.generate`."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (<|endoftext|> or a stop string) or "length"
    prompt_tokens: int
    prompt_index: int = 0
    sample_index: int = 0
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Event:
    """A piece of new text for row `row`; `completion` is set on the row's last event."""

    row: int
    text: str
    completion: Completion | None = None


@dataclass(eq=False)
class _Row:
    index: int  # position in the caller's list of prompts
    prompt: list[int]
    budget: int
    generator: torch.Generator | None
    decoder: StreamDecoder
    prompt_index: int
    sample_index: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # emitted so far
    pending: str = ""  # decoded but held back: it may be the start of a stop string
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


def sample_seed(seed: int, sample_index: int) -> int:
    """The seed of sample `sample_index` of a prompt: the seed itself for the first sample."""
    if sample_index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generate_events(model: GPT, tokenizer: Tokenizer, prompts: list[list[int]],
                    cfg: GenerationConfig, sample_indices: list[int] | None = None,
                    prompt_indices: list[int] | None = None) -> Iterator[Event]:
    """Generate one continuation per entry of `prompts` (token ids), yielding text as it is final."""
    n_ctx = model.config.n_positions
    for ids in prompts:
        if len(ids) >= n_ctx:
            raise PromptTooLong(len(ids), n_ctx)
    device = next(model.parameters()).device
    seed = cfg.seed if cfg.seed is not None else secrets.randbits(63)
    sample_indices = sample_indices or [0] * len(prompts)
    prompt_indices = prompt_indices or list(range(len(prompts)))
    rows = [
        _Row(index=k, prompt=list(ids) or [tokenizer.eos_id], budget=cfg.new_tokens_for(len(ids)),
             generator=None if cfg.greedy else make_generator(sample_seed(seed, j), device),
             decoder=tokenizer.stream_decoder(), prompt_index=i, sample_index=j,
             logprobs=[] if cfg.logprobs is not None else None)
        for k, (ids, i, j) in enumerate(zip(prompts, prompt_indices, sample_indices))
    ]
    with torch.inference_mode():
        yield from _decode(model, tokenizer, rows, cfg)


def _decode(model: GPT, tokenizer: Tokenizer, rows: list[_Row], cfg: GenerationConfig) -> Iterator[Event]:
    active = list(rows)
    cache, pad, start, logits = _prefill(model, active, cfg)
    while active:
        logits = logits[:, -1, :].float()  # (B, V)
        tokens = _choose(logits, active, cfg, tokenizer.eos_id)
        for r, row in enumerate(active):
            events = _accept(row, int(tokens[r]), logits[r], cfg, tokenizer)
            yield from (Event(row.index, text, done) for text, done in events)
        keep = [r for r, row in enumerate(active) if row.finish_reason is None]
        if not keep:
            return
        if len(keep) < len(active):
            active = [active[r] for r in keep]
            index = torch.tensor(keep, device=tokens.device)
            cache.select(index)
            tokens, pad = tokens[index], None if pad is None else pad[index]
        if start == cache.max_len:  # past the context window: slide it and re-read the text
            cache, pad, start, logits = _prefill(model, active, cfg, slide=True)
            continue
        logits = model(tokens[:, None], start, cache, pad, last_only=True)
        start += 1


def _prefill(model: GPT, rows: list[_Row], cfg: GenerationConfig, slide: bool = False):
    """Run the (left-padded) contexts through the model; return cache, pad, next slot, logits."""
    n_ctx = model.config.n_positions
    keep = max(1, int(n_ctx * SLIDE_KEEP)) if slide else n_ctx
    contexts = [(row.prompt + row.tokens)[-keep:] for row in rows]
    length = max(len(c) for c in contexts)
    room = max(row.budget - len(row.tokens) for row in rows)
    device = next(model.parameters()).device
    pads = [length - len(c) for c in contexts]
    idx = torch.tensor([[0] * p + c for p, c in zip(pads, contexts)], device=device)
    pad = torch.tensor(pads, device=device) if any(pads) else None
    cache = KVCache.for_model(model, len(rows), max_len=min(n_ctx, length + room))
    logits = model(idx, 0, cache, pad, last_only=True)
    return cache, pad, length, logits


def _choose(logits: torch.Tensor, rows: list[_Row], cfg: GenerationConfig, eos_id: int) -> torch.Tensor:
    """Next token for each active row, with <|endoftext|> banned until min_new_tokens."""
    if cfg.min_new_tokens and cfg.stop_at_eos:
        early = torch.tensor([len(row.tokens) < cfg.min_new_tokens for row in rows], device=logits.device)
        if early.any():
            ban = torch.zeros_like(logits, dtype=torch.bool)
            ban[:, eos_id] = early
            logits = logits.masked_fill(ban, sampling.NEG_INF)
    seen = counts = None
    if cfg.repetition_penalty != 1.0 or cfg.presence_penalty or cfg.frequency_penalty:
        seen, counts = _history(rows, logits)
    return sampling.choose(logits, cfg, [row.generator for row in rows], seen, counts)


def _history(rows: list[_Row], logits: torch.Tensor):
    """(seen, counts): tokens in each row's prompt or output (bool), and output-token counts."""
    seen = torch.zeros_like(logits, dtype=torch.bool)
    counts = torch.zeros_like(logits)
    for r, row in enumerate(rows):
        seen[r, row.prompt + row.tokens] = True
        if row.tokens:
            counts[r].index_add_(0, torch.tensor(row.tokens, device=logits.device),
                                 torch.ones(len(row.tokens), device=logits.device))
    return seen, counts


def _accept(row: _Row, token: int, logits: torch.Tensor, cfg: GenerationConfig,
            tokenizer: Tokenizer) -> list[tuple[str, Completion | None]]:
    """Add one token to a row, apply the stop rules; return the (text, completion) events."""
    if cfg.stop_at_eos and token == tokenizer.eos_id:
        return [_finish(row, "stop", row.pending + row.decoder.flush())]
    row.tokens.append(token)
    if row.logprobs is not None:
        row.logprobs.append(_logprob(logits, token, cfg.logprobs, tokenizer))
    undecided = row.pending + row.decoder.add(token)
    emit, stopped = split_stop(undecided, cfg.stop)
    if stopped:  # the stop string and anything after it are dropped
        return [_finish(row, "stop", emit)]
    if len(row.tokens) >= row.budget:
        return [_finish(row, "length", undecided + row.decoder.flush())]
    row.text += emit
    row.pending = undecided[len(emit):]
    return [(emit, None)] if emit else []


def _finish(row: _Row, reason: str, tail: str) -> tuple[str, Completion]:
    """End a row: `tail` is its last piece of text."""
    row.text += tail
    row.pending = ""
    row.finish_reason = reason
    done = Completion(text=row.text, token_ids=row.tokens, finish_reason=reason,
                      prompt_tokens=len(row.prompt), prompt_index=row.prompt_index,
                      sample_index=row.sample_index, logprobs=row.logprobs)
    return tail, done


def split_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """(what can be emitted, whether a stop string was found) for undecided text `text`.

    If a stop string occurs, everything before the earliest one is returned with True. Otherwise
    the longest tail of `text` that is the start of some stop string is held back.
    """
    if not stops:
        return text, False
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[:min(hits)], True
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return text[:len(text) - hold], False


def _logprob(logits: torch.Tensor, token: int, top_n: int, tokenizer: Tokenizer) -> TokenLogprob:
    logp = torch.log_softmax(logits, dim=-1)
    top = torch.topk(logp, top_n) if top_n else None
    alternatives = [] if top is None else [
        (int(i), tokenizer.decode([int(i)]), float(v)) for v, i in zip(top.values, top.indices)]
    return TokenLogprob(token, tokenizer.decode([token]), float(logp[token]), alternatives)
