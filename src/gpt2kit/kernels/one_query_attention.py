"""Attention for one query per row (decoding), swapped into every block of a CPU model that only
runs forward (`use_one_query_attention`, applied by the API): `CachedDecodeAttention` for `attn`
(an eager float32 decode step's cache write and attention in one native call) and
`OneQueryAttention` for `attn.core` (the compiled step's, and the eager one's where the first
does not apply)."""

from __future__ import annotations

import torch

from ..model import CausalSelfAttention, ScaledDotProduct
from .int8 import fuses_attention, int8_attention_block
from .native import library


def use_one_query_attention(model: torch.nn.Module) -> None:
    """Swap CachedDecodeAttention in for each block's attention and OneQueryAttention for its
    plain attention core (CPU models only)."""
    if model.transformer.wpe.weight.device.type != "cpu":
        return
    for block in model.transformer.h:
        if type(block.attn) is CausalSelfAttention:
            block.attn = CachedDecodeAttention(block.attn)
        core = block.attn.core
        if type(core) is ScaledDotProduct:
            block.attn.core = OneQueryAttention(core.p).train(core.training)


class CachedDecodeAttention(CausalSelfAttention):
    """The block's attention, the same modules (and state-dict keys), with an eager decode step
    (one float32 or bfloat16 token per row, a KVCache) taken in one native call after c_attn: the new keys and
    values written into the cache and every head's attention over it (native/attention.c). That
    replaces the split into heads, the cache's two index copies and the re-assembly of heads, ~30
    us a layer of a ~4 ms int8 step at GPT-2 124M's size; with native int8 x int8 linears, c_attn
    and c_proj run in the same call (int8.int8_attention_block). Anything else runs the plain
    forward."""

    def __init__(self, attn: CausalSelfAttention):
        torch.nn.Module.__init__(self)  # not CausalSelfAttention's: no new weights to initialise
        self.n_head = attn.n_head
        for name, module in attn.named_children():
            self.add_module(name, module)
        self.train(attn.training)

    def forward(self, x, layer, cache, at, mask):
        if (self.training or x.dtype not in NATIVE_CACHE_DTYPES or (step := decode_step(x, layer, cache, at, mask)) is None
                or (kernels := library("attention")) is None):  # decode_step first: None when compiling
            return super().forward(x, layer, cache, at, mask)
        k, v, slot, mask, S = step
        B, _, C = x.shape
        c_attn, c_proj = self.c_attn, self.c_proj
        if x.dtype == torch.float32 and fuses_attention(c_attn, c_proj, B):  # int8: the products too
            return self.resid_dropout(int8_attention_block(x, c_attn, c_proj, self.n_head, k, v, slot, mask, S))
        qkv = c_attn(x).contiguous()  # (B, 1, 3C)
        y = torch.empty(B, 1, C)  # float32 sums whatever the cache's dtype
        D = C // self.n_head
        attention = (kernels.gpt2kit_cached_attention if x.dtype == torch.float32
                     else kernels.gpt2kit_cached_attention_bf16)
        failed = attention(
            qkv.data_ptr(), qkv.stride(0), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
            slot.data_ptr(), mask.data_ptr(), S if mask.shape[0] > 1 else 0, y.data_ptr(), B, self.n_head, S, D,
            D ** -0.5, torch.get_num_threads())
        if failed:
            raise MemoryError(f"attention: no memory for {B * self.n_head * S} scores")
        return self.resid_dropout(c_proj(y.to(x.dtype)))


NATIVE_CACHE_DTYPES = (torch.float32, torch.bfloat16)  # what native/attention.c reads


def decode_step(x: torch.Tensor, layer: int, cache, at, mask: torch.Tensor | None) -> tuple | None:
    """The cache arguments of a native decode step (one token a row of x, eager): (keys, values,
    slot (int64, one element), mask (contiguous, (B or 1, 1, 1, S)), S), or None where the native
    kernels do not apply (a prompt, no cache, compiling, a cache of another dtype or layout)."""
    if x.shape[1] != 1 or cache is None or mask is None or torch.compiler.is_compiling():
        return None
    k, v = cache.k[layer], cache.v[layer]
    if not (k.dtype == x.dtype and k.stride() == v.stride() and k.stride(3) == 1 and at.slots.numel() == 1):
        return None
    mask = mask if mask.is_contiguous() else mask.contiguous()  # read as (B or 1, S)
    slot = at.slots if at.slots.dtype == torch.int64 else at.slots.to(torch.int64)
    return k, v, slot, mask, at.keys.shape[0]


class OneQueryAttention(ScaledDotProduct):
    """Attention for one query per row; anything else (a prompt, training) goes to the plain core.

    Eager, float32: one native call (native/attention.c) instead of SDPA's flash kernel, ~20 us a
    layer at GPT-2 124M's decode shapes, of a ~4 ms int8 step. Under compilation: broadcasts and
    reductions that Inductor fuses into two passes over the cache; SDPA's flash kernel took about
    twice as long for 12 heads of one query over 256 slots (126-165 against 87-105 us per
    compiled call). Sums and softmax in float32 whatever the cache's dtype (the conversions happen
    inside the fused kernels' loads)."""

    def forward(self, q, k, v, mask):
        if q.shape[-2] != 1 or mask is None or self.training:
            return super().forward(q, k, v, mask)
        if torch.compiler.is_compiling():
            scores = (q.float() * k.float()).sum(-1, keepdim=True) * q.shape[-1] ** -0.5  # (B, nh, S, 1)
            scores = scores.masked_fill(~mask.transpose(-1, -2), float("-inf"))
            return (scores.softmax(dim=2) * v.float()).sum(2, keepdim=True).to(q.dtype)  # (B, nh, 1, hs)
        if native_fits(q, k, v) and (kernels := library("attention")) is not None:
            return _native(kernels, q, k, v, mask)
        return super().forward(q, k, v, mask)


def native_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """float32, keys and values laid out alike, each vector contiguous: what the C kernel reads."""
    return (q.dtype == k.dtype == v.dtype == torch.float32 and k.stride() == v.stride()
            and k.stride(3) == 1 and q.stride(3) == 1)


def _native(kernels, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    B, H, _, D = q.shape
    S = k.shape[2]
    mask = mask.reshape(mask.shape[0], S).contiguous()
    out = q.new_empty(B, 1, H, D)  # the layout the model's next transpose makes contiguous
    failed = kernels.gpt2kit_one_query_attention(
        q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
        mask.data_ptr(), S if mask.shape[0] > 1 else 0, out.data_ptr(), B, H, S, D, D ** -0.5,
        torch.get_num_threads())
    if failed:
        raise MemoryError(f"attention: no memory for {B * H * S} scores")
    return out.transpose(1, 2)
