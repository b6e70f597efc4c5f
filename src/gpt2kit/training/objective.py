"""What training minimises, as one module: DDP, FSDP and torch.compile wrap the whole of it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.blocks import split_ignored
from ..kernels.fused_loss import HeadCrossEntropy, chunk_rows
from ..kernels.half_copies import HalfCopy
from ..model import GPT


class NextTokenLoss(torch.nn.Module):
    """Mean cross-entropy of predicting x[:, 1:] from x[:, :-1], in float32 (as
    inference/scoring.py), over the targets that are trained on (all of them, except in chat
    data: data/blocks.py marks the others). In float32 and under bfloat16 autocast the LM head and
    the loss run fused (HeadCrossEntropy: the (B, T, V) logits never exist whole); under float16
    autocast, plainly (its loss scaling must see the gradients the fused head would make too early)."""

    def __init__(self, model: GPT, head_copy: HalfCopy | None = None):
        super().__init__()
        self.model = model
        self.head_copy = head_copy  # the head's bfloat16 copy, where it has one (kernels/half_copies.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, trained = split_ignored(x)
        targets, keep, device = ids[:, 1:].flatten(), trained[:, 1:].flatten(), x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        plain = chunk_rows(dtype) is None
        head = LateGradient.apply(self.model.lm_head.weight)  # before the embedding: see LateGradient
        # (B*(T-1), V) logits on the plain path, else (B*(T-1), C) hidden states for the fused head
        rows = (self.model(ids[:, :-1]).float() if plain else self.model.hidden(ids[:, :-1])[0]).flatten(0, 1)
        if not keep.all():  # the loss is on the trained targets only, their mean
            if not keep.any():  # a micro-batch of context only: nothing to learn, zero gradients
                return rows.sum() * 0.0
            rows, targets = rows[keep], targets[keep]
        if plain:
            return F.cross_entropy(rows, targets)
        copy = self.head_copy.current() if self.head_copy is not None and dtype == torch.bfloat16 else None
        return HeadCrossEntropy.apply(rows, head, targets, dtype, copy)


class LateGradient(torch.autograd.Function):
    """The identity, whose backward autograd runs after those of the operations that followed
    it in the forward pass (its CPU engine takes ready nodes latest-created first).

    For the LM head's weight, tied to the token embedding: taken before the embedding lookup, the
    head's dense gradient reaches the weight after the embedding's. With a sparse embedding
    gradient (kernels/lean_backward.sparse_embedding_gradient) autograd adds the sparse rows into
    the dense gradient in place when the sparse one came first, and into a copy of the (V, C)
    dense one otherwise (GPT-2 124M: ~20 ms a step). Only the order changes, not the sum."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad
