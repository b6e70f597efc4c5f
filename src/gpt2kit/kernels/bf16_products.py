"""bfloat16 products for CPU training, cut into the blocks oneDNN multiplies fastest (issue 15).

oneDNN's AMX matmul (torch 2.13's) shares some product shapes badly between 2 threads: measured
on this project's 2-core Xeons, a (1024, K) x (K, 768) product ran at ~1,300-1,500 GFLOP/s, no
faster than on one thread, where (512, K) x (K, 768) ran at ~2,300-2,700 and (1024, 768) x (768,
3072) at ~3,000; the LM head's (1024, 768) x (768, 50257) at ~1,350, where each (1024, 768) x
(768, 4096) slice of it ran at ~3,000. Those shapes are half the products of a GPT-2 124M step at
4 x 256 tokens (the residual stream's 768 columns, and the head), so each is split into two halves
of rows, or into column slices of the vocabulary, written into one output
(benchmarks/bench_products.py measures every product of a step both ways).

The split is a pure function of the shapes and the thread count, so a run and its resumption cut
the same products alike and compute the same bits. It is applied only where it was measured: 2
threads (elsewhere oneDNN's own partition runs: on one thread every shape ran alike).
"""

from __future__ import annotations

import functools

import torch

from ..runtime import cpu_bfloat16
from .native import library

MEASURED_THREADS = 2
ROW_SPLIT = (512, 1024)  # M in (512, 1024] with at most NARROW columns: two halves of rows
NARROW = 768
COLUMN_BLOCK = 4096  # columns per call of an output wider than two of them (the vocabulary)


def blocks(M: int, N: int, threads: int, a_transposed: bool = False) -> tuple[int, int]:
    """(rows, columns) of (M, N)'s output per product call on `threads` threads. A transposed a
    (a weight's gradient, grad.t() @ x) is not cut by rows: halves of it ran slower."""
    if threads != MEASURED_THREADS:
        return M, N
    halve = ROW_SPLIT[0] < M <= ROW_SPLIT[1] and N <= NARROW and not a_transposed
    rows = -(-M // 64) * 32 if halve else M  # two halves, 32-row aligned
    return rows, (COLUMN_BLOCK if N > 2 * COLUMN_BLOCK else N)


def mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b (+ bias) for 2-D tensors: in blocks() on CPU, else one call. Each block's rows see
    all of K, so no sum is split; the bits may still differ from one call's (oneDNN blocks K by
    the shape it is given)."""
    M, N = a.shape[0], b.shape[1]
    transposed = a.stride(0) == 1 and a.stride(1) != 1
    rows, cols = blocks(M, N, torch.get_num_threads(), transposed) if a.device.type == "cpu" else (M, N)
    if rows >= M and cols >= N:
        return torch.mm(a, b) if bias is None else plus_bias(a, b, bias)
    out = torch.empty(M, N, dtype=a.dtype, device=a.device)
    for i in range(0, M, rows):
        for j in range(0, N, cols):
            part = out[i:i + rows, j:j + cols]
            if bias is None:
                torch.mm(a[i:i + rows], b[:, j:j + cols], out=part)
            else:
                torch.addmm(bias[j:j + cols], a[i:i + rows], b[:, j:j + cols], out=part)
    return out


def plus_bias(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """a @ b + bias for a bfloat16 CPU product whose b is a row-major weight's transpose, the bias
    added by oneDNN's linear as it writes the output (the same bits): torch.addmm first copies
    the bias into the whole output for oneDNN to add the product to, a pass more over it (inside
    a 4 x 256 step of GPT-2 124M, c_attn's and c_fc's forward products ~0.3-0.5 ms each)."""
    if (a.device.type == "cpu" and a.dtype == torch.bfloat16 and b.t().is_contiguous() and onednn_bfloat16()
            and not torch.compiler.is_compiling()):  # inductor lowers this op for constant weights only
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), bias, "none", [], "")
    return torch.addmm(bias, a, b)


@functools.cache
def onednn_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 products on this CPU (its linear refuses them where it does not)."""
    return cpu_bfloat16() is not None


def transposed(x: torch.Tensor) -> torch.Tensor:
    """x.t() as a row-major tensor, for a 2-D bfloat16 CPU x whose rows are contiguous: one
    native pass (native/transpose.c, ~4x torch's strided copy) where it is built, else torch's copy."""
    if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.stride(1) == 1
            and (kernels := library("transpose")) is not None):
        out = torch.empty(x.shape[1], x.shape[0], dtype=x.dtype)
        kernels.gpt2kit_transpose16(x.data_ptr(), out.data_ptr(), *x.shape, x.stride(0), torch.get_num_threads())
        return out
    return x.t().contiguous()


def weight_gradient(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad.t() @ x for grad (M, N), x (M, K): a weight's gradient (N, K), from a row-major copy
    of grad.t(), whose product oneDNN runs ~1.5x faster than from the transposed view (and ~2x
    for the LM head's), more than the copy costs (native/transpose.c)."""
    return mm(transposed(grad), x)


class Linear(torch.autograd.Function):
    """F.linear(x, w, b) under CPU autocast, its three products through mm(): x, w and b cast to
    bfloat16 as autocast casts them (the gradients come back in bfloat16 and autograd casts them
    to the float32 parameters' dtype, as it does autocast's)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.bfloat16)
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, w)
        ctx.shape = x.shape
        return mm(x2, w.t(), b).view(*x.shape[:-1], w.shape[0])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x2, w = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)  # (M, N)
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = mm(grad, w).view(ctx.shape) if need_x else None
        grad_w = weight_gradient(grad, x2) if need_w else None
        grad_b = grad.sum(0) if need_b else None
        return grad_x, grad_w, grad_b
