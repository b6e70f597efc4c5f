"""GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners").

A decoder-only transformer: learned token and position embeddings, pre-LayerNorm blocks of causal
self-attention and a tanh-GELU MLP, a final LayerNorm, and an LM head tied to the token embedding.
Parameter names follow the Hugging Face checkpoint (`transformer.h.{i}.attn.c_attn`, ...), so
import/export is the same keys plus a transpose of the Conv1D weights (see checkpoints/hf.py).

This is the one definition of the computation. Fast paths (kernels/) swap the small modules it
calls (`attn.core`, `mlp.act`, the linears, the dropouts) for classes of their own, or compile
`GPT.forward` itself over a static cache (kernels/compiled_decode.py): `print(model)` shows what runs.

Notation: B batch, T tokens in this call, S cache slots attended to, L cache slots in all,
C = n_embd, nh = n_head, hs = C // nh, V = vocab_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

if TYPE_CHECKING:  # the caller's object (inference/kv_cache.py); the model only calls its update
    from .inference.kv_cache import KVCache


@dataclass(frozen=True)
class Positions:
    """Where one call's tokens (B, T) sit in a KV cache and what they attend to: the cache slots
    they are written to, `slots` (T,), the same for every row; the slots attended over, 0..S-1,
    given as `keys` (S,) (a tensor, not an int, so that a compiled step can take S as a symbolic
    size); and `pad` (B,), each row's left padding: slots below pad[r] are hidden from row r and
    its positions count from 0 after them. All three may live on the device: no host sync."""

    slots: torch.Tensor
    keys: torch.Tensor
    pad: torch.Tensor | None = None

    @classmethod
    def at(cls, start: int, T: int, pad: torch.Tensor | None = None,
           device: torch.device | str = "cpu") -> "Positions":
        """T tokens at slots start..start+T-1, attending over slots 0..start+T-1."""
        return cls(torch.arange(start, start + T, device=device), torch.arange(start + T, device=device), pad)

    def positions(self) -> torch.Tensor:
        """Position ids: (T,), or (B, T) with padding."""
        return self.slots if self.pad is None else (self.slots[None, :] - self.pad[:, None]).clamp_min(0)

    def mask(self) -> torch.Tensor:
        """(B or 1, 1, T, S) bool, True where a query may attend to a key: causal, padding hidden.
        A padded query slot still sees itself, so no row is fully masked (which would give NaN)."""
        allowed = self.keys[None, :] <= self.slots[:, None]  # (T, S)
        if self.pad is None:
            return allowed[None, None]
        own = self.keys[None, :] == self.slots[:, None]
        visible = self.keys[None, None, :] >= self.pad[:, None, None]  # (B, 1, S)
        return (allowed[None] & (visible | own[None]))[:, None]


class ScaledDotProduct(nn.Module):
    """softmax(q k^T / sqrt(hs)) v over the keys `mask` allows (None: causal over the call's own
    tokens), with dropout `p` on the attention weights while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:  # (B, nh, T, hs)
        p = self.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v for all heads at once
        self.core = ScaledDotProduct(cfg.dropout)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, layer: int, cache: KVCache | None, at: Positions | None, mask):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, at, k, v)  # (B, nh, S, hs)
        y = self.core(q, k, v, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's tanh approximation (Hugging Face's "gelu_new")
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, layer: int, cache: KVCache | None, at: Positions | None, mask):
        x = x + self.attn(self.ln_1(x), layer, cache, at, mask)
        return x + self.mlp(self.ln_2(x))


class Blocks(nn.ModuleList):
    """The stack of blocks, each one's output the next one's input (a module of its own so that a
    fast path can take the whole stack: kernels/decode_blocks.py)."""

    def forward(self, x, cache: KVCache | None, at: Positions | None, mask, inputs: list | None = None):
        """x after every block; each block's input appended to `inputs` if given."""
        for i, block in enumerate(self):
            if inputs is not None:
                inputs.append(x)
            x = block(x, i, cache, at, mask)
        return x


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.n_positions, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=Blocks(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in the released models
        if not self.transformer.wte.weight.is_meta:
            self.apply(self._init_weights)
            # GPT-2 paper: residual projections scaled by 1/sqrt(2 * n_layer) at initialisation.
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def tie_weights(self) -> None:
        """Re-tie the LM head after loading parameters with `load_state_dict(assign=True)`."""
        self.lm_head.weight = self.transformer.wte.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None, at: Positions | None = None,
               keep_inputs: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(final hidden states (B, T, C) after ln_f, each block's input (B, T, C) if
        `keep_inputs`, else []) for tokens `idx` (B, T). Without a cache the tokens are a whole
        sequence from position 0 (causal attention among them); with one, `at` says where they
        sit in it. Blocks' inputs are the embedding output, then blocks 0..n_layer-2's outputs:
        with the final states, transformers' `hidden_states` tuple."""
        S = idx.shape[1] if at is None else at.keys.shape[0]
        if S > self.config.n_positions:
            raise ValueError(f"Cannot forward up to position {S}, the context is only {self.config.n_positions}")
        pos = torch.arange(S, device=idx.device) if at is None else at.positions()  # (T,) or (B, T)
        mask = None if at is None else at.mask()
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        inputs = []
        x = self.transformer.h(x, cache, at, mask, inputs if keep_inputs else None)
        return self.transformer.ln_f(x), inputs

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, at: Positions | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) for tokens `idx` (B, T) (see `hidden`); (B, 1, V) with `last_only`,
        which saves the LM head's work over a prompt when only the next token is wanted."""
        x, _ = self.hidden(idx, cache, at)
        if last_only:
            x = x[:, -1:, :]
        return self.lm_head(x)
