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

from .native import library

EPS = 1e-6  # clip_grad_norm_'s: max_norm / (total_norm + 1e-6)


def folds_into_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> bool:
    """Whether `clipped_step` takes this step: a fused optimizer that honours `grad_scale` and
    gradients that are plain contiguous float32 CPU tensors (not FSDP's sharded DTensors), natively."""
    return (getattr(optimizer, "_step_supports_amp_scaling", False)
            and all(g.get("fused") for g in optimizer.param_groups) and library("grad_norm") is not None
            and all(type(p.grad) is torch.Tensor and p.grad.device.type == "cpu" and p.grad.dtype == torch.float32
                    and p.grad.is_contiguous() for p in params if p.grad is not None))


def total_norm(params: list[torch.Tensor]) -> float:
    """The 2-norm of all the parameters' gradients together (as clip_grad_norm_ returns it), in
    one native pass; for what folds_into_step accepts."""
    grads = [p.grad for p in params if p.grad is not None and p.grad.numel()]
    pointers, sizes = (ctypes.c_void_p * len(grads))(*[g.data_ptr() for g in grads]), (ctypes.c_int64 * len(grads))(
        *[g.numel() for g in grads])
    squares = library("grad_norm").gpt2kit_sum_squares(pointers, sizes, len(grads), torch.get_num_threads())
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
