"""GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners").

A decoder-only transformer: learned token and position embeddings, pre-LayerNorm blocks of causal
self-attention and a tanh-GELU MLP, a final LayerNorm, and an LM head tied to the token embedding.
Parameter names follow the Hugging Face checkpoint (`transformer.h.{i}.attn.c_attn`, ...), so
import/export is the same keys plus a transpose of the Conv1D weights (see checkpoints/hf.py).

Notation: B batch, T tokens in this call, S cached positions attended to, C = n_embd,
nh = n_head, hs = C // nh, V = vocab_size.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .inference.kv_cache import KVCache


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, layer: int, start: int, cache: KVCache | None, mask):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # (B, nh, S, hs), S = start + T
        p = self.dropout if self.training else 0.0
        if isinstance(mask, torch.Tensor):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:  # mask is True for plain causal attention, False when every key is visible
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        # GPT-2 uses the tanh approximation of GELU (Hugging Face's "gelu_new").
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, layer: int, start: int, cache: KVCache | None, mask):
        x = x + self.attn(self.ln_1(x), layer, start, cache, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.n_positions, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
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

    def hidden(self, idx: torch.Tensor, start: int = 0, cache: KVCache | None = None,
               pad: torch.Tensor | None = None, states: list | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C), after ln_f, for tokens `idx` (B, T) at slots start..start+T-1.

        `pad` (B,) is the number of left-padding slots per row: those keys are hidden from
        attention and each row's positions start at 0 after its padding. `states`, if a list,
        receives each block's input (B, T, C): the embedding output, then blocks 0..n_layer-2's
        outputs; with the returned tensor that is transformers' `hidden_states` tuple.
        """
        B, T = idx.shape
        S = start + T
        if S > self.config.n_positions:
            raise ValueError(f"Cannot forward up to position {S}, the context is only {self.config.n_positions}")
        slots = torch.arange(start, S, device=idx.device)  # (T,)
        pos = slots if pad is None else (slots[None, :] - pad[:, None]).clamp_min(0)  # (T,) or (B, T)
        mask = attention_mask(slots, S, pad)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            if states is not None:
                states.append(x)
            x = block(x, i, start, cache, mask)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, start: int = 0, cache: KVCache | None = None,
                pad: torch.Tensor | None = None, last_only: bool = False,
                head: bool = True) -> torch.Tensor:
        """Logits (B, T, V) for tokens `idx` (B, T); (B, 1, V) with `last_only` (saves the LM
        head's work over a prompt when only the next token is wanted). With head=False the final
        hidden states (B, T, C) instead, for a caller that runs the head itself (training fuses
        it with the loss) but must go through forward (a DDP or FSDP wrapper's hooks)."""
        x = self.hidden(idx, start, cache, pad)
        if last_only:
            x = x[:, -1:, :]
        return self.lm_head(x) if head else x


def attention_mask(slots: torch.Tensor, S: int, pad: torch.Tensor | None):
    """What the queries at `slots` (T,) may attend to among keys 0..S-1.

    Returns True (plain causal, the SDPA fast path), False (every key visible: one query at the
    end of the cache) or a boolean tensor (B or 1, 1, T, S), True where attention is allowed.
    """
    T = slots.shape[0]
    if pad is None and T == S:
        return True
    if pad is None and T == 1:
        return False
    keys = torch.arange(S, device=slots.device)
    allowed = keys[None, :] <= slots[:, None]  # (T, S) causal
    if pad is None:
        return allowed[None, None]
    # A padded query slot still sees itself, so no row is fully masked (which would give NaN).
    own = keys[None, :] == slots[:, None]
    allowed = allowed[None] & ((keys[None, None, :] >= pad[:, None, None]) | own[None])  # (B, T, S)
    return allowed[:, None]
