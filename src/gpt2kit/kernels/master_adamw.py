"""AdamW over float32 master weights that also writes their bfloat16 copies (issue 15): the
optimizer of bfloat16 CPU training in one process (kernels/half_copies.py says why).

`MasterAdamW` is torch.optim.AdamW(fused=True) (same parameter groups, hyper-parameters, state
keys and state_dict, so checkpoints resume either way) whose step is one native pass over every
parameter (native/adamw.c): it reads each gradient where it is (the master's float32 .grad, or the
copy's bfloat16 one), updates the master and the moments with fused AdamW's arithmetic (the same
bits, tests/test_master_adamw.py), and writes the copy. Gradient clipping folds into it as into
torch's fused step (kernels/grad_clip.py: the factor as `grad_scale`).
"""

from __future__ import annotations

import ctypes
import math

import torch

from .half_copies import HalfCopy
from .native import library


def available() -> bool:
    """Whether this machine runs the step (and the gradient norm of its bfloat16 gradients) natively."""
    return library("adamw") is not None and library("grad_norm") is not None


class MasterAdamW(torch.optim.AdamW):
    """AdamW (fused=True's arithmetic and state) over the float32 parameters of `groups`, keeping
    `copies` (kernels/half_copies.py) written with their masters."""

    def __init__(self, groups: list[dict], copies: list[HalfCopy], lr: float, betas: tuple[float, float],
                 eps: float):
        super().__init__(groups, lr=lr, betas=betas, eps=eps, fused=True)
        self.copies = {c.master: c for c in copies}

    def gradients(self) -> list[torch.Tensor]:
        """Each parameter's gradient the next step reads: its .grad, or its copy's (bfloat16)."""
        return [g for group in self.param_groups for p in group["params"] if (g := self._gradient(p)) is not None]

    def _gradient(self, p: torch.Tensor) -> torch.Tensor | None:
        half = self.copies.get(p)
        return p.grad if p.grad is not None or half is None else half.grad

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale = getattr(self, "grad_scale", None)  # kernels/grad_clip.py's clipping factor, inverted
        hyper = shared(self.param_groups)
        pairs = [(group, p, grad) for group in self.param_groups for p in group["params"]
                 if (grad := self._gradient(p)) is not None]
        for _, p, grad in pairs:  # all checked before any state moves
            check(p, grad)
        rows = [self._row(group, p, grad) for group, p, grad in pairs]
        if rows:
            self._native_step(rows, hyper, 1.0 if scale is None else float(scale))
        for p, *_ in rows:  # a master without a gradient is not stepped: its copy is as it was
            if (half := self.copies.get(p)) is not None:
                half.written()
        return loss

    def _row(self, group: dict, p: torch.Tensor, grad: torch.Tensor):
        state = self.state[p]
        if not state:  # as torch's AdamW initialises it for fused=True
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step, (beta1, beta2), lr = float(state["step"]), group["betas"], float(group["lr"])
        # fused AdamW's coefficients, in double as its kernel computes them
        coefficients = (1 - lr * group["weight_decay"], -lr / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step))
        half = self.copies.get(p)
        return (p, grad.contiguous(), state["exp_avg"], state["exp_avg_sq"], None if half is None else half.copy,
                coefficients)

    def _native_step(self, rows: list, hyper: tuple[float, float, float], scale: float) -> None:
        n, (beta1, beta2, eps) = len(rows), hyper

        def pointers(column: int):
            return (ctypes.c_void_p * n)(*[0 if r[column] is None else r[column].data_ptr() for r in rows])

        coefficients = [c for r in rows for c in r[5]]
        status = library("adamw").gpt2kit_adamw(
            pointers(0), pointers(1), (ctypes.c_uint8 * n)(*[r[1].dtype == torch.bfloat16 for r in rows]),
            pointers(2), pointers(3), pointers(4), (ctypes.c_int64 * n)(*[r[0].numel() for r in rows]),
            (ctypes.c_float * len(coefficients))(*coefficients), n, 1 - beta1, beta2, 1 - beta2, eps, scale,
            torch.get_num_threads())
        if status:
            raise MemoryError(f"AdamW step: no memory for an index of {n} tensors")

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for half in self.copies.values():
            if half.copy.grad is not None:
                if set_to_none:
                    half.copy.grad = None
                else:
                    half.copy.grad.zero_()


def check(p: torch.Tensor, grad: torch.Tensor) -> None:
    """A parameter and gradient the native step takes: contiguous float32 on CPU, a float32 or
    bfloat16 gradient of its shape."""
    if not (p.is_contiguous() and p.dtype == torch.float32 and p.device.type == "cpu"
            and grad.dtype in (torch.float32, torch.bfloat16) and grad.shape == p.shape):
        raise ValueError(f"MasterAdamW takes contiguous float32 CPU parameters, got {p.dtype} {tuple(p.shape)} "
                         f"on {p.device} with a {grad.dtype} gradient")


def shared(groups: list[dict]) -> tuple[float, float, float]:
    """(beta1, beta2, eps), which every group must share (one native call takes one of each), of
    groups without amsgrad or maximize, with a float learning rate."""
    if any(g["amsgrad"] or g["maximize"] or not isinstance(g["lr"], float | int) for g in groups):
        raise ValueError("MasterAdamW takes AdamW without amsgrad or maximize and a float learning rate")
    values = {(*g["betas"], g["eps"]) for g in groups}
    if len(values) != 1:
        raise ValueError(f"MasterAdamW takes the same betas and eps for all parameter groups, got {sorted(values)}")
    return next(iter(values))
