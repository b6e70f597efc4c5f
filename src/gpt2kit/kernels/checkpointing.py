"""Gradient checkpointing, applied from outside the model: less activation memory for more compute."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..model import GPT, Block, Positions

if TYPE_CHECKING:
    from ..inference.kv_cache import KVCache


def checkpoint_blocks(model: GPT) -> None:
    """Swap each block for a CheckpointedBlock holding the same children: it keeps only its
    input and recomputes the rest in the backward pass, with the same dropout masks."""
    blocks = model.transformer.h
    for i, block in enumerate(blocks):
        if not isinstance(block, CheckpointedBlock):
            blocks[i] = CheckpointedBlock(block)


class CheckpointedBlock(Block):
    """A Block whose forward runs under torch.utils.checkpoint while gradients are on (training);
    evaluation and sampling run it as it is. It takes over the block's own submodules (ln_1,
    attn, ln_2, mlp) under the same names, so parameter names and state-dict keys do not change,
    and swaps made inside them before or after (kernels/lean_backward.py) still apply."""

    def __init__(self, block: Block):
        nn.Module.__init__(self)  # not Block.__init__: that would build new, unused submodules
        for name, child in block.named_children():
            setattr(self, name, child)
        self.train(block.training)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache | None, at: Positions | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x, layer, cache, at, mask)
        # use_reentrant=False, PyTorch's recommended variant. The recompute replays the forward's
        # random state (preserve_rng_state, the default), so it draws the same dropout masks.
        return checkpoint(super().forward, x, layer, cache, at, mask, use_reentrant=False)
