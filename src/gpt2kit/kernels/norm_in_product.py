"""Each block's LayerNorms moved into the product that follows them (`ln_1` into `attn.c_attn`,
`ln_2` into `mlp.c_fc`) where that product runs gpt2kit's native kernels: the kernel normalizes its
few decode rows itself, which saves a LayerNorm call and its module (~6 us each, two a block, of a
~4 ms int8 step at GPT-2 124M's size). Applied by the API to eager CPU float32 models; the block's
`ln_1`/`ln_2` become nn.Identity and the product keeps the LayerNorm as its `norm`. Rows the native
kernel does not take are normalized by that LayerNorm first, so every path computes the same thing.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def fuse_layer_norms(model: nn.Module) -> None:
    """Move ln_1 into attn.c_attn and ln_2 into mlp.c_fc wherever the product takes a norm
    (`takes_norm`: a native float32 kernel) and the LayerNorm is a plain float32 one."""
    for block in model.transformer.h:
        for name, linear in (("ln_1", block.attn.c_attn), ("ln_2", block.mlp.c_fc)):
            norm = getattr(block, name)
            if (type(norm) is nn.LayerNorm and getattr(linear, "takes_norm", False) and norm.bias is not None
                    and norm.weight.dtype == torch.float32 and norm.normalized_shape == (linear.weight.shape[1],)):
                linear.norm = norm
                setattr(block, name, nn.Identity())


def keep_layer_norms_apart(model: nn.Module) -> None:
    """Undo fuse_layer_norms: a LoRA adapter wrapping c_attn or c_fc must see normalized inputs."""
    for block in model.transformer.h:
        for name, linear in (("ln_1", block.attn.c_attn), ("ln_2", block.mlp.c_fc)):
            if getattr(linear, "norm", None) is not None:
                setattr(block, name, linear.norm)
                linear.norm = None


def norm_arguments(norm: nn.LayerNorm | None) -> tuple:
    """(weight pointer, bias pointer, eps) of a fused LayerNorm for a native kernel; (None, None, 0)."""
    if norm is None:
        return None, None, 0.0
    return norm.weight.data_ptr(), norm.bias.data_ptr(), norm.eps
