"""bfloat16 working copies of the trained weight matrices, for CPU training under bfloat16
autocast in one process (issue 15).

Under autocast each forward pass casts every float32 weight matrix to bfloat16 for its products,
and autograd casts every bfloat16 weight gradient back to float32 for the optimizer: for GPT-2
124M at 4 x 256 tokens on 2 cores ~75 ms of a ~0.8 s step, two passes over memory around the
optimizer's own. Here each trained matrix keeps a bfloat16 copy that the optimizer step writes as
it updates the float32 master (kernels/master_adamw.py), and the copy is a leaf tensor requiring
grad, so autograd leaves the matrix's bfloat16 gradient on it for the step to read as it is:
the same values as autocast's casts (the gradients come out of their products in bfloat16
anyway), without the passes.

Correct by construction: a copy is cast again from its master whenever the master was changed
other than by the step (its version counter moved: load_state_dict, a resume, a test); with
several micro-batches a step, each micro-batch's bfloat16 gradient is added into the master's
float32 .grad as soon as autograd leaves it (no sums in bfloat16), as autocast's path adds them.
The tied LM head's copy serves the fused head's products only: its gradient (the head's dense
one and the embedding's sparse rows) stays the master's, in float32.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..model import GPT
from .lean_backward import LeanGeluLinear, LeanLinear


class HalfCopy:
    """A float32 weight matrix's bfloat16 copy. `gradient`: the copy requires grad, so the
    products' bfloat16 weight gradient is left on it (`copy.grad`) instead of the master's
    float32 .grad; `accumulate` (several micro-batches a step): each one's is added into the
    master's .grad instead."""

    def __init__(self, master: nn.Parameter, gradient: bool, accumulate: bool = False):
        self.master = master
        self.copy = torch.empty_like(master, dtype=torch.bfloat16).requires_grad_(gradient)
        self._version = -1  # the master's version the copy holds: none yet
        if gradient and accumulate:
            self.copy.register_post_accumulate_grad_hook(self._add_into_master)

    def current(self) -> torch.Tensor:
        """The copy, cast again first if the master changed since it was written."""
        if self._version != self.master._version:
            with torch.no_grad():
                self.copy.copy_(self.master)
            self._version = self.master._version
        return self.copy

    def written(self) -> None:
        """The optimizer step wrote the master and the copy alike (natively: no version counter moved)."""
        self._version = self.master._version

    @property
    def grad(self) -> torch.Tensor | None:
        return self.copy.grad

    def _add_into_master(self, copy: torch.Tensor) -> None:
        master = self.master
        if master.grad is None:
            master.grad = copy.grad.float()
        else:
            master.grad.add_(copy.grad)
        copy.grad = None

    def __repr__(self) -> str:
        return f"HalfCopy({tuple(self.master.shape)}, gradient={self.copy.requires_grad})"


def hold_half_copies(model: GPT, accumulate: bool) -> list[HalfCopy]:
    """Give every trained matrix the products of kernels/lean_backward.py run (their modules'
    `half`) and the tied LM head a HalfCopy; returns them all, for the optimizer
    (kernels/master_adamw.py) to keep. For one process under bfloat16 autocast on CPU, with
    lean_backward's modules swapped in. A matrix appears once however many modules share it."""
    copies: dict[nn.Parameter, HalfCopy] = {}
    for module in model.modules():
        if type(module) in (LeanLinear, LeanGeluLinear) and module.weight.requires_grad:
            if module.weight not in copies:
                copies[module.weight] = HalfCopy(module.weight, gradient=True, accumulate=accumulate)
            module.half = copies[module.weight]
    head = model.lm_head.weight
    if head.requires_grad and head not in copies:
        copies[head] = HalfCopy(head, gradient=False)
    return list(copies.values())


def head_copy(model: GPT, copies: list[HalfCopy]) -> HalfCopy | None:
    """The LM head's copy among `copies`, if it has one."""
    return next((c for c in copies if c.master is model.lm_head.weight), None)
