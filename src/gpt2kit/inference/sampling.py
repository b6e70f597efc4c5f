"""Turning next-token logits into a choice: a fixed chain of small pure functions.

Order (as in Hugging Face's logits processors): repetition penalty, presence/frequency penalties,
temperature, top-k, top-p, min-p; then `sample` draws (or `greedy` takes the argmax). Before the
chain, per-row token rules (`ban_sequences`, then `apply_logit_bias`) are applied by the caller,
row by row (rows of one batch may carry different rules), as OpenAI and vLLM apply logit_bias
before penalties and temperature. Each step takes logits (B, V) and returns a
new tensor (never edits its input); filtered-out tokens get -inf. Only `sample` uses randomness,
and only through the per-row `torch.Generator`s it is given, so a row's draws do not depend on what
else is in the batch. Temperature 0 means greedy decoding.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import GenerationConfig

NEG_INF = float("-inf")


# logit_bias's ends are exact, not merely large: -100 bans a token, 100 forces it (OpenAI's meaning).
BAN, FORCE = -100.0, 100.0


def ban_sequences(logits: torch.Tensor, contexts: list[list[int]],
                  sequences: list[tuple[tuple[int, ...], ...]]) -> torch.Tensor:
    """transformers' bad_words_ids (NoBadWordsLogitsProcessor), each row with its own list:
    a sequence's last token gets -inf in row i where contexts[i] (the row's tokens so far, prompt
    included, or at least their last len(sequence) - 1) ends with the rest of it; a one-token
    sequence is banned always."""
    ban = [(r, seq[-1]) for r, (context, seqs) in enumerate(zip(contexts, sequences)) for seq in seqs
           if len(seq) - 1 <= len(context) and tuple(context[len(context) - len(seq) + 1:]) == seq[:-1]]
    if not ban:
        return logits
    rows, ids = (torch.tensor(column, device=logits.device) for column in zip(*ban))
    # Written entry by entry: a (B, V) mask and masked_fill cost ~10x more on CPU.
    return logits.index_put((rows, ids), torch.tensor(NEG_INF, dtype=logits.dtype, device=logits.device))


def apply_logit_bias(logits: torch.Tensor, biases: list[tuple[tuple[int, float], ...]]) -> torch.Tensor:
    """OpenAI's logit_bias, each row with its own (token id, bias) pairs: the bias is added to
    the token's logit, except at the ends: -100 bans the token (-inf) and 100 forces it (every
    token not forced gets -inf). A forced token that is already banned (-inf: a banned phrase,
    <|endoftext|> before min_new_tokens) stays banned: a ban is never overridden."""
    if not any(biases):
        return logits
    device = logits.device
    rows = torch.tensor([r for r, pairs in enumerate(biases) for _ in pairs], device=device)
    ids = torch.tensor([token for pairs in biases for token, _ in pairs], device=device)
    values = torch.tensor([b for pairs in biases for _, b in pairs], dtype=logits.dtype, device=device)
    current = logits[rows, ids]
    biased = torch.where(values == BAN, NEG_INF, current + values)
    forced = (values == FORCE) & torch.isfinite(current)
    if not forced.any():  # only the biased entries change (no (B, V) pass but the copy)
        return logits.index_put((rows, ids), biased)
    out = logits.index_put((rows, ids), biased)  # a copy, then edited in place
    out[rows[forced].unique()] = NEG_INF  # a row with a forced token keeps only its forced tokens
    return out.index_put_((rows[forced], ids[forced]), biased[forced])


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): for tokens already in the text (`seen`, bool (B, V)),
    divide positive logits by `penalty` and multiply negative ones by it."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's penalties over generated tokens: `counts` (B, V) is how often each was generated."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError("temperature 0 is greedy decoding: take the argmax instead of sampling")
    return logits if temperature == 1.0 else logits / temperature


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits per row (ties beyond k are dropped); k = 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    values, indices = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, NEG_INF).scatter(-1, indices, values)


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probabilities sum to at least p. The most likely token is always kept."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # A token is dropped when the mass above it reaches p, i.e. when it and everything less
    # likely hold at most 1 - p. Summed from the small end: a float32 softmax over 50k tokens is
    # off from 1 by ~1e-6, which a running sum from the top would charge against p.
    at_and_below = probs.flip(-1).cumsum(-1).flip(-1)
    drop_sorted = at_and_below <= 1 - p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least p times the most likely token's (Nguyen et al. 2024)."""
    if p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, NEG_INF)


def settings_key(cfg: GenerationConfig) -> tuple:
    """The options `process` reads: rows with equal keys can be processed as one batch."""
    return (cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, cfg.repetition_penalty,
            cfg.presence_penalty, cfg.frequency_penalty)


def process(logits: torch.Tensor, cfg: GenerationConfig, seen: torch.Tensor | None = None,
            counts: torch.Tensor | None = None) -> torch.Tensor:
    """The whole chain, in the documented order. Greedy decoding (temperature 0) keeps the
    penalties, which change the argmax, and skips the rest, which cannot."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if counts is not None:
        logits = apply_presence_frequency(logits, counts, cfg.presence_penalty, cfg.frequency_penalty)
    if cfg.greedy:
        return logits
    logits = apply_temperature(logits, cfg.temperature)
    logits = top_k(logits, cfg.top_k)
    logits = top_p(logits, cfg.top_p)
    return min_p(logits, cfg.min_p)


def choose(logits: torch.Tensor, cfg: GenerationConfig, generators: list[torch.Generator],
           seen: torch.Tensor | None = None, counts: torch.Tensor | None = None,
           argmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Next token per row (B,) from raw logits (B, V). `argmax` finds each row's largest value
    (default `greedy`; a fast path may bring its own, the same index)."""
    logits = process(logits, cfg, seen, counts)
    return (argmax or greedy)(logits) if cfg.greedy else sample(logits, generators, argmax)


def sample(logits: torch.Tensor, generators: list[torch.Generator],
           argmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Draw one token per row (B,) from softmax(logits), row i using generators[i] alone.

    Uses the exponential-race form (argmax of p / E, E ~ Exp(1)), which equals a categorical draw
    and needs no cumulative sums; each row's noise comes from its own generator.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    noise = torch.empty_like(probs)
    for row, g in enumerate(generators):
        noise[row].exponential_(generator=g)
    return (argmax or greedy)(probs / noise)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Index of each row's largest value (the first, on ties), as torch.argmax: max(dim)'s indices,
    which the CPU finds in ~0.6x argmax's time over GPT-2's 50,257 logits."""
    return logits.max(dim=-1).indices
