"""Gradient clipping for a CPU step with fused AdamW over whole gradients (one process, or DDP's
replicas, each rank the same norm from the same gradients; FSDP's sharded DTensors are left to
clip_grad_norm_), without passes of its own over the gradients (issue 15: what surrounds a
bfloat16 step's products).

torch's clip_grad_norm_ takes one norm per tensor on CPU (it has no foreach kernel there), then
multiplies every gradient by the clipping factor: for GPT-2 124M at 4 x 256 tokens on 2 cores,
~47 and ~27 ms of a ~1.04 s step (496 MB of float32 gradients read twice, written once). Here
the total norm is one native pass over all of them (native/grad_norm.c), and the factor goes to
the fused step as its `grad_scale`, the hook torch.amp.GradScaler uses with fused optimizers:
the step divides each gradient by it as it reads it (and writes it back divided, as the
gradients clip_grad_norm_ leaves). The factor is clip_grad_norm_'s, min(1, max / (norm + 1e-6)).
"""

from __future__ import annotations

import ctypes
import math

import torch

from .master_adamw import MasterAdamW
from .native import library

EPS = 1e-6  # clip_grad_norm_'s: max_norm / (total_norm + 1e-6)


def gradients(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The gradients the optimizer's next step reads: its parameters' .grad, and a MasterAdamW's
    bfloat16 ones on its copies (kernels/master_adamw.py)."""
    if isinstance(optimizer, MasterAdamW):
        return optimizer.gradients()
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


def folds_into_step(optimizer: torch.optim.Optimizer, grads: list[torch.Tensor]) -> bool:
    """Whether `clipped_step` takes this step: a fused optimizer that honours `grad_scale` and
    gradients that are plain contiguous float32 (or a MasterAdamW's bfloat16) CPU tensors (not
    FSDP's sharded DTensors), natively."""
    dtypes = (torch.float32, torch.bfloat16) if isinstance(optimizer, MasterAdamW) else (torch.float32,)
    return (getattr(optimizer, "_step_supports_amp_scaling", False)
            and all(g.get("fused") for g in optimizer.param_groups) and library("grad_norm") is not None
            and all(type(g) is torch.Tensor and g.device.type == "cpu" and g.dtype in dtypes and g.is_contiguous()
                    for g in grads))


def total_norm(grads: list[torch.Tensor]) -> float:
    """The 2-norm of all the gradients together (as clip_grad_norm_ returns it), in one native
    pass; for what folds_into_step accepts."""
    grads = [g for g in grads if g.numel()]
    pointers, sizes = (ctypes.c_void_p * len(grads))(*[g.data_ptr() for g in grads]), (ctypes.c_int64 * len(grads))(
        *[g.numel() for g in grads])
    halves = (ctypes.c_uint8 * len(grads))(*[g.dtype == torch.bfloat16 for g in grads])
    squares = library("grad_norm").gpt2kit_sum_squares(pointers, halves, sizes, len(grads), torch.get_num_threads())
    if squares < 0:
        raise MemoryError(f"gradient norm: no memory for an index of {len(grads)} tensors")
    return math.sqrt(squares)


def clipped_step(optimizer: torch.optim.Optimizer, norm: float, max_norm: float) -> None:
    """optimizer.step() on the gradients clipped to `max_norm` given their total `norm`."""
    factor = max_norm / (norm + EPS)
    if factor >= 1:
        optimizer.step()
        return
    optimizer.grad_scale, optimizer.found_inf = torch.tensor(1 / factor), None
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf
