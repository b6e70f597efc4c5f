"""What training minimises, as one module: DDP, FSDP and torch.compile wrap the whole of it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.fused_loss import HeadCrossEntropy, chunk_rows
from ..model import GPT


class NextTokenLoss(torch.nn.Module):
    """Mean cross-entropy of predicting x[:, 1:] from x[:, :-1], in float32 (as
    inference/scoring.py). In float32 and under bfloat16 autocast the LM head and the loss run
    fused (HeadCrossEntropy: the (B, T, V) logits never exist whole); under float16 autocast,
    plainly (its loss scaling must see the gradients the fused head would make too early)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        targets, device = x[:, 1:].flatten(), x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        if chunk_rows(dtype) is None:
            return F.cross_entropy(self.model(x[:, :-1]).float().flatten(0, 1), targets)
        h, _ = self.model.hidden(x[:, :-1])  # (B, T-1, C)
        return HeadCrossEntropy.apply(h.flatten(0, 1), self.model.lm_head.weight, targets, dtype)
