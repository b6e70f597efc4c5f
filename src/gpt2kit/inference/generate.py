"""Generation: prefill the prompts once, then decode one token per step against a KV cache.

`generate_events` is a generator of text events, so streaming and batch generation are the same
code, and `step` is one decoding step over a `RunningBatch`, which the server's scheduler drives
with requests joining and leaving (each row carries its own options). Prompts of different
lengths share a batch through left padding (see running_batch.py). Stop rules live here, not in the model
or the sampler: <|endoftext|>, stop strings (text that might still become a stop string is held
back, never emitted then retracted) and the token budget. A finished row leaves the batch at once.
Each row samples from its own generator, seeded from (seed, sample index), so a prompt's text
does not depend on what else is in the batch.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..config import GenerationConfig, sample_seed
from ..errors import OptionError, PromptTooLong
from ..model import GPT
from ..runtime import make_generator
from ..tokenizer import StreamDecoder, Tokenizer
from . import sampling
from .adapters import BASE
from .running_batch import Decoder, RunningBatch

# When generation runs past the context window, keep this fraction of it and re-prefill.
SLIDE_KEEP = 0.75


@dataclass
class TokenLogprob:
    """A chosen token's log-probability under the model (before any sampling filters), and the
    `logprobs` most likely alternatives."""

    token_id: int
    token: str
    logprob: float | None  # None only for the first token of an echoed prompt: it has no context
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
    logprobs: list[TokenLogprob] | None = None  # of the tokens accepted since the row's last event


@dataclass(eq=False)
class Row:
    """One sequence being generated: its prompt, options, random stream and text so far."""

    index: int  # the caller's number for it (the `row` of its events)
    prompt: list[int]
    cfg: GenerationConfig
    budget: int
    generator: torch.Generator | None
    decoder: StreamDecoder
    prompt_index: int = 0
    sample_index: int = 0
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # emitted so far
    pending: str = ""  # decoded but held back: it may be the start of a stop string
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    reported: int = 0  # logprobs already handed out with events
    banned: tuple[tuple[int, ...], ...] = ()  # token sequences of cfg.bad_words (banned_sequences)
    adapter: int = BASE  # the served LoRA adapter it runs on (inference/adapters.py); BASE: none

    def context(self, keep: int) -> list[int]:
        return (self.prompt + self.tokens)[-keep:]


def row_seed(seed: int | None, sample_index: int) -> int:
    """The seed of a row's generator. Without a seed every row draws a fresh one, so no two rows
    of a batch (the same prompt twice, or sample j of different prompts) share their draws."""
    return secrets.randbits(63) if seed is None else sample_seed(seed, sample_index)


def make_rows(tokenizer: Tokenizer, prompts: list[list[int]], cfg: GenerationConfig, n_ctx: int,
              device: torch.device, sample_indices: list[int] | None = None,
              prompt_indices: list[int] | None = None, first_index: int = 0) -> list[Row]:
    """One row per entry of `prompts` (token ids; empty means "start from <|endoftext|>")."""
    for ids in prompts:
        if len(ids) >= n_ctx:
            raise PromptTooLong(len(ids), n_ctx)
    check_logit_bias_ids(cfg, tokenizer.vocab_size)
    banned = banned_sequences(tokenizer, cfg.bad_words)
    sample_indices = sample_indices or [0] * len(prompts)
    prompt_indices = prompt_indices or list(range(len(prompts)))
    return [
        Row(index=first_index + k, prompt=list(ids) or [tokenizer.eos_id], cfg=cfg,
            budget=cfg.new_tokens_for(len(ids)),
            generator=None if cfg.greedy else make_generator(row_seed(cfg.seed, j), device),
            decoder=tokenizer.stream_decoder(), prompt_index=i, sample_index=j,
            logprobs=[] if cfg.logprobs is not None else None, banned=banned)
        for k, (ids, i, j) in enumerate(zip(prompts, prompt_indices, sample_indices))
    ]


def check_logit_bias_ids(cfg: GenerationConfig, vocab: int) -> None:
    """logit_bias names tokens of this vocabulary (the config alone cannot know its size)."""
    bad = next((token for token, _ in cfg.logit_bias if not 0 <= token < vocab), None)
    if bad is not None:
        raise OptionError("logit_bias", f"names token id {bad}, outside the vocabulary (ids 0 to {vocab - 1})")


def banned_sequences(tokenizer: Tokenizer, phrases: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """The token sequences that bad_words bans: each phrase as written and with a leading space.
    GPT-2's tokens carry the space before a word (" cat" is one token, "cat" another), so a word
    in running text is nearly always the spaced form; transformers users must add it by hand.
    Other spellings of a phrase in tokens (say "c" + "at") are not banned, as in transformers."""
    variants = [v for p in phrases for v in (p, " " + p) if v == p or not p[0].isspace()]
    return tuple(dict.fromkeys(tuple(ids) for ids in tokenizer.encode_batch(variants)))


def generate_events(model: GPT, tokenizer: Tokenizer, prompts: list[list[int]],
                    cfg: GenerationConfig, sample_indices: list[int] | None = None,
                    prompt_indices: list[int] | None = None, decoder: Decoder | None = None) -> Iterator[Event]:
    """Generate one continuation per entry of `prompts` (token ids), yielding text as it is final.
    `decoder` runs each decode step (default: the model's forward, eagerly)."""
    n_ctx = model.config.n_positions
    device = next(model.parameters()).device
    rows = make_rows(tokenizer, prompts, cfg, n_ctx, device, sample_indices, prompt_indices)
    # The cache holds no more than the longest prompt plus the largest budget.
    need = max(len(row.prompt) for row in rows) + max(row.budget for row in rows)
    with torch.inference_mode():
        batch = RunningBatch(model, len(rows), max_len=min(n_ctx, need), decoder=decoder)
        batch.join(rows, [row.prompt for row in rows])
        while batch.rows:
            yield from step(batch, tokenizer)


def step(batch: RunningBatch[Row], tokenizer: Tokenizer) -> list[Event]:
    """One token for every row of a running batch: take it, then feed it back to the model."""
    events = take_tokens(batch, tokenizer)
    feed_tokens(batch)
    return events


def take_tokens(batch: RunningBatch[Row], tokenizer: Tokenizer) -> list[Event]:
    """Choose each row's next token, apply the stop rules, and let finished rows leave."""
    rows = list(batch.rows)
    tokens = _choose(batch.logits, rows, tokenizer.eos_id, batch.decoder.argmax)
    events = []
    for r, row in enumerate(rows):
        events += [Event(row.index, text, done, _new_logprobs(row))
                   for text, done in _accept(row, int(tokens[r]), batch.logits[r], tokenizer)]
    batch.leave([row for row in rows if row.finish_reason is not None])
    return events


def feed_tokens(batch: RunningBatch[Row]) -> None:
    """Run the rows' last tokens through the model for the next logits, re-reading the last part
    of any row that filled the window."""
    slide = batch.make_room()
    if batch.rows:
        batch.decode([row.tokens[-1] for row in batch.rows])
    if slide:
        keep = max(1, int(batch.model.config.n_positions * SLIDE_KEEP))
        # a slid context starts mid-text: no later prompt starts with it, so it is not cached
        batch.join(slide, [row.context(keep) for row in slide], reuse=False, adapters=[row.adapter for row in slide])


def _new_logprobs(row: Row) -> list[TokenLogprob] | None:
    if row.logprobs is None:
        return None
    new, row.reported = row.logprobs[row.reported:], len(row.logprobs)
    return new


def _choose(logits: torch.Tensor, rows: list[Row], eos_id: int, argmax: Callable) -> torch.Tensor:
    """Next token for each row (B,): rows with the same sampling settings are processed together."""
    logits = _token_rules(logits, rows, eos_id)
    groups: dict[tuple, list[int]] = {}
    for r, row in enumerate(rows):
        groups.setdefault(sampling.settings_key(row.cfg), []).append(r)
    if len(groups) == 1:
        return _choose_group(logits, rows, argmax)
    tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    for members in groups.values():
        index = torch.tensor(members, device=logits.device)
        tokens[index] = _choose_group(logits[index], [rows[r] for r in members], argmax)
    return tokens


def _choose_group(logits: torch.Tensor, rows: list[Row], argmax: Callable) -> torch.Tensor:
    cfg = rows[0].cfg
    seen = counts = None
    if cfg.repetition_penalty != 1.0 or cfg.presence_penalty or cfg.frequency_penalty:
        seen, counts = _history(rows, logits)
    return sampling.choose(logits, cfg, [row.generator for row in rows], seen, counts, argmax)


def _token_rules(logits: torch.Tensor, rows: list[Row], eos_id: int) -> torch.Tensor:
    """Each row's own bans and biases, before the sampling chain: its banned phrases and, until
    it has min_new_tokens, <|endoftext|> (a one-token ban); then logit_bias (never lifting a ban)."""
    sequences = [row.banned + (((eos_id,),) if _too_early_to_end(row) else ()) for row in rows]
    if any(sequences):
        keep = [max(map(len, seqs), default=1) - 1 for seqs in sequences]  # what a ban looks back at
        contexts = [row.context(k) if k else [] for row, k in zip(rows, keep)]
        logits = sampling.ban_sequences(logits, contexts, sequences)
    return sampling.apply_logit_bias(logits, [row.cfg.logit_bias for row in rows])


def _too_early_to_end(row: Row) -> bool:
    return row.cfg.stop_at_eos and len(row.tokens) < row.cfg.min_new_tokens


def _history(rows: list[Row], logits: torch.Tensor):
    """(seen, counts): tokens in each row's prompt or output (bool), and output-token counts."""
    seen = torch.zeros_like(logits, dtype=torch.bool)
    counts = torch.zeros_like(logits)
    for r, row in enumerate(rows):
        seen[r, row.prompt + row.tokens] = True
        if row.tokens:
            counts[r].index_add_(0, torch.tensor(row.tokens, device=logits.device),
                                 torch.ones(len(row.tokens), device=logits.device))
    return seen, counts


def _accept(row: Row, token: int, logits: torch.Tensor,
            tokenizer: Tokenizer) -> list[tuple[str, Completion | None]]:
    """Add one token to a row, apply the stop rules; return the (text, completion) events."""
    cfg = row.cfg
    if cfg.stop_at_eos and token == tokenizer.eos_id:
        return [_finish(row, "stop", row.pending + row.decoder.flush())]
    row.tokens.append(token)
    if row.logprobs is not None:
        row.logprobs.append(token_logprob(logits, token, cfg.logprobs, tokenizer))
    undecided = row.pending + row.decoder.add(token)
    emit, stopped = split_stop(undecided, cfg.stop)
    if stopped:  # the stop string and anything after it are dropped
        return [_finish(row, "stop", emit)]
    if len(row.tokens) >= row.budget:
        return [_finish(row, "length", undecided + row.decoder.flush())]
    row.text += emit
    row.pending = undecided[len(emit):]
    return [(emit, None)] if emit else []


def _finish(row: Row, reason: str, tail: str) -> tuple[str, Completion]:
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


def token_logprob(logits: torch.Tensor, token: int, top_n: int, tokenizer: Tokenizer) -> TokenLogprob:
    logp = torch.log_softmax(logits, dim=-1)
    top = torch.topk(logp, top_n) if top_n else None
    alternatives = [] if top is None else [
        (int(i), tokenizer.decode([int(i)]), float(v)) for v, i in zip(top.values, top.indices)]
    return TokenLogprob(token, tokenizer.decode([token]), float(logp[token]), alternatives)
