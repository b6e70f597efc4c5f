"""Hidden states and pooled text embeddings: what the model computes before its LM head (issue 7).

Layers are numbered as transformers' `output_hidden_states=True` tuple, n_layer + 1 entries:
0 is the embedding output (token + position embeddings), i in 1..n_layer-1 is the output of the
i-th block (`transformer.h[i-1]`), and n_layer (also -1) is the last block's output *after* the
final LayerNorm, which is transformers' `last_hidden_state`. As in transformers (checked against
5.23), ln_f touches no other entry and the last block's output before ln_f is not exposed.
Negative indices count from the end, as in Python.

Sequences of different lengths are padded on the right: under causal attention no real token
sees the padding after it, so every real token's state equals its unpadded state and positions
need no shifting (generation pads on the left because every row's next token shares one slot).
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm import tqdm

from ..config import EMBED_BATCH_SIZE, POOLS, ModelConfig, check_integer
from ..errors import OptionError, TokenizerError
from ..model import GPT
from .scoring import eval_mode


def token_batch(token_ids, cfg: ModelConfig, device: torch.device) -> torch.Tensor:
    """Token ids (a list, a list of equal-length lists, or a (seq,) / (batch, seq) tensor) as a
    (B, T) long tensor on `device`, checked: non-empty, inside the vocabulary and the context."""
    try:
        idx = torch.as_tensor(token_ids, dtype=torch.long, device=device)
    except (ValueError, TypeError):  # ragged rows, or not numbers at all
        raise OptionError("token_ids", "must be a list of ids or of equal-length lists of ids "
                          "(pad rows of different lengths, or use embed/score for texts)") from None
    if idx.dim() == 1:
        idx = idx[None]
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise OptionError("token_ids", f"must be a non-empty (batch, seq) array, got shape {tuple(idx.shape)}")
    bad = (idx < 0) | (idx >= cfg.vocab_size)
    if bad.any():
        raise TokenizerError(f"token id {int(idx[bad][0])} is outside the vocabulary "
                             f"(size {cfg.vocab_size})")
    if idx.shape[1] > cfg.n_positions:
        raise OptionError("token_ids", f"has {idx.shape[1]} tokens per row, more than the model's "
                          f"context ({cfg.n_positions} tokens)")
    return idx


def layer_indices(layers: Sequence[int] | None, n_layer: int, name: str = "layers") -> list[int]:
    """`layers` as indices in 0..n_layer (None: all n_layer + 1 of them), checked; `name` is the
    option that errors blame."""
    if layers is None:
        return list(range(n_layer + 1))
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers:
        raise OptionError(name, "is empty: name at least one layer (-1 is the last)")
    for i in layers:
        if not -(n_layer + 1) <= check_integer(name, i) <= n_layer:
            raise OptionError(name, f"is {i}, but this model's layers are 0..{n_layer} (0 the "
                              f"embedding output, {n_layer} the last block after ln_f) or "
                              f"-{n_layer + 1}..-1 counting from the end")
    return [i % (n_layer + 1) for i in layers]


def hidden_states(model: GPT, idx: torch.Tensor, layers: Sequence[int] | None = (-1,)) -> list[torch.Tensor]:
    """Float32 hidden states (B, T, C) of tokens `idx` (B, T), one per entry of `layers`
    (numbered as in the module docstring)."""
    n = model.config.n_layer
    wanted = layer_indices(layers, n)
    with torch.inference_mode(), eval_mode(model):
        # Keep the per-block states only when asked for: they cost n_layer activations of memory.
        last, states = model.hidden(idx, keep_inputs=min(wanted) < n)
    return [(last if i == n else states[i]).float() for i in wanted]


def pool_states(h: torch.Tensor, lengths: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, C) from right-padded states `h` (B, T, C) whose row b holds lengths[b] real tokens:
    their mean, or the last real token's state."""
    if pool == "last":
        return h[torch.arange(h.shape[0], device=h.device), lengths - 1]
    real = torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]  # (B, T)
    return (h * real[..., None]).sum(dim=1) / lengths[:, None]


def embed_ids(model: GPT, seqs: Sequence[list[int]], pool: str = POOLS[0], layer: int = -1,
              batch_size: int = EMBED_BATCH_SIZE, progress: bool = False) -> torch.Tensor:
    """One float32 vector per token sequence, stacked (N, C) on the CPU: the `pool` ("mean" of
    its tokens' states or its "last" token's state) at `layer`. Sequences run `batch_size` at a
    time, longest first so a batch pads little; `progress` shows a bar on stderr."""
    seqs = [list(ids) for ids in seqs]
    _check_embedding(seqs, pool, batch_size, model.config)
    layers = layer_indices([layer], model.config.n_layer, name="layer")
    device = model.transformer.wte.weight.device
    order = sorted(range(len(seqs)), key=lambda k: -len(seqs[k]))
    out = torch.empty(len(seqs), model.config.n_embd)
    with tqdm(total=len(seqs), unit="text", desc="embedding", disable=not progress) as bar:
        for i in range(0, len(order), batch_size):
            chunk = order[i:i + batch_size]
            lengths = torch.tensor([len(seqs[k]) for k in chunk], device=device)
            rows = [ids + [0] * (int(lengths[0]) - len(ids)) for ids in (seqs[k] for k in chunk)]  # token 0 pads
            [h] = hidden_states(model, token_batch(rows, model.config, device), layers)
            out[chunk] = pool_states(h, lengths, pool).cpu()
            bar.update(len(chunk))
    return out


def _check_embedding(seqs: list[list[int]], pool: str, batch_size: int, cfg: ModelConfig) -> None:
    if pool not in POOLS:
        raise OptionError("pool", f"must be one of {', '.join(POOLS)}; got {pool!r}")
    if check_integer("batch_size", batch_size) < 1:
        raise OptionError("batch_size", f"must be at least 1, got {batch_size}")
    if not seqs:
        raise OptionError("texts", "is an empty list: give at least one text to embed")
    for k, ids in enumerate(seqs):
        where = "" if len(seqs) == 1 else f"{k + 1} of {len(seqs)} "
        if not ids:
            raise OptionError("text", f"{where}has no tokens: there is nothing to embed")
        if len(ids) > cfg.n_positions:
            raise OptionError("text", f"{where}has {len(ids)} tokens, more than the model's context "
                              f"({cfg.n_positions} tokens); shorten or split it")
