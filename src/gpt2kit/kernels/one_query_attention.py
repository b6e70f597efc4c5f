"""Attention for one query per row (decoding), swapped in for each block's `attn.core` of a CPU
model that only runs forward (`use_one_query_attention`, applied by the API)."""

from __future__ import annotations

import torch

from ..model import ScaledDotProduct
from .native import library


def use_one_query_attention(model: torch.nn.Module) -> None:
    """Swap OneQueryAttention in for each block's plain attention core (CPU models only)."""
    if model.transformer.wpe.weight.device.type != "cpu":
        return
    for block in model.transformer.h:
        core = block.attn.core
        if type(core) is ScaledDotProduct:
            block.attn.core = OneQueryAttention(core.p).train(core.training)


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
