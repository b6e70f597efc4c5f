"""The LM head and the cross-entropy fused, for training: the (N, V) logits never exist whole."""

from __future__ import annotations

import torch

from .bf16_products import mm, weight_gradient
from .native import library

LOSS_CHUNK = 512  # rows of logits at a time in float32: 103 MB at GPT-2's vocabulary
# bfloat16: larger chunks, because each one's (V, C) head gradient comes out of its GEMM in
# bfloat16 and is added into a float32 sum (~25 ms for GPT-2's head): 1024 rows hold 103 MB of
# bfloat16 logits, which become their softmax in place (softmax_).
LOW_PRECISION_CHUNK = 1024
# softmax_'s rows of float32 at a time: 13 MB at GPT-2's vocabulary, in the last-level cache.
# Fewer rows fit L2 and were as fast on one thread, but each row block is six parallel ops: with
# 8 rows, two threads on a busy machine spent 3.4 s spinning at their barriers per 1024 rows.
SOFTMAX_ROWS = 64


def chunk_rows(dtype: torch.dtype | None) -> int | None:
    """Rows of logits HeadCrossEntropy holds at a time with products in `dtype` (None: float32),
    or None where it does not apply (float16) and the plain loss runs."""
    return {None: LOSS_CHUNK, torch.float32: LOSS_CHUNK, torch.bfloat16: LOW_PRECISION_CHUNK}.get(dtype)


class HeadCrossEntropy(torch.autograd.Function):
    """mean(cross_entropy(h @ w.T, targets)) for h (N, C), w (V, C), targets (N,), with both
    gradients computed in the forward pass, a chunk of rows at a time, so the (N, V) logits never
    exist whole: at GPT-2's vocabulary they are 206 MB per 1024 tokens in float32, and the plain
    path keeps four such tensors (logits, log-softmax and their gradients) at its peak.

    `dtype` None (or float32): float32 products, LOSS_CHUNK rows at a time. Same GEMMs as the plain
    path, fewer passes over the logits, none allocated twice: about 20% faster than cross_entropy
    over the whole logits, forward and backward, for 4 x 256 tokens of GPT-2 124M on 2 CPU cores.
    `dtype` bfloat16 (training under bfloat16 autocast): the products in bfloat16, the softmax in
    float32, as autocast runs the plain path (bfloat16 logits, cross_entropy over their float32
    copy), a few rows at a time (softmax_); the loss exact to float32, the gradients as close to
    the exact ones as the plain path's; not float16, whose gradients made here, before loss
    scaling, would underflow. 1.26x the previous bfloat16 path (a float32 log-softmax over whole
    chunks; interleaved, one thread, 4 x 256 tokens of GPT-2 124M). `w_copy`: w in `dtype` already
    (kernels/half_copies.py's copy of the head), used for the products instead of casting w; the
    gradient is still w's."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor,
                dtype: torch.dtype | None = None, w_copy: torch.Tensor | None = None) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # w is frozen under LoRA
        with torch.autocast(h.device.type, enabled=False):  # the dtypes below are chosen, not cast
            if dtype in (None, torch.float32):
                total, grad_h, grad_w = _float32_chunks(h, w, targets, need_h, need_w)
                ctx.w_scale = 1.0
            else:  # grad_w without the mean's 1 / N: applied with the backward's scale below
                wc = w.to(dtype) if w_copy is None else w_copy  # the GEMMs' operand, as autocast casts it
                total, grad_h, grad_w = _low_precision_chunks(h, wc, targets, need_h, need_w)
                ctx.w_scale = 1.0 / h.shape[0]
        ctx.save_for_backward(grad_h, grad_w)
        return total / h.shape[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        # Scaled in place, not copied (the head's is 154 MB for GPT-2): training never retains
        # the graph, so this backward runs once.
        grad_h, grad_w = ctx.saved_tensors
        grad_h = None if grad_h is None else grad_h.mul_(grad)
        return grad_h, None if grad_w is None else scaled_float(grad_w, grad * ctx.w_scale), None, None, None


def _float32_chunks(h, w, targets, need_h: bool, need_w: bool):
    n = h.shape[0]
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros_like(w) if need_w else None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, n, LOSS_CHUNK):
        rows, yc = slice(start, start + LOSS_CHUNK), targets[start:start + LOSS_CHUNK, None]
        z = h[rows] @ w.t()  # (r, V) logits
        top, target = z.amax(1, keepdim=True), z.gather(1, yc)
        e = z.sub_(top).exp_()  # in place: unnormalised softmax
        s = e.sum(1, keepdim=True)  # (r, 1)
        total += (s.log() + top - target).sum()  # logsumexp - target logit
        # d(mean loss)/d(logits) = (e / s - one_hot) / n = diag(1 / (s n)) (e - s one_hot): the
        # row scale is applied to the (r, C) GEMM operands and results, not to the (r, V) e.
        e.scatter_add_(1, yc, -s)
        scale = 1.0 / (s * n)
        if grad_h is not None:
            torch.mm(e, w, out=grad_h[rows]).mul_(scale)
        if grad_w is not None:
            grad_w.addmm_(e.t(), h[rows] * scale)
        del z, e  # before the next chunk's logits are made, not after
    return total, grad_h, grad_w


def _low_precision_chunks(h, wc, targets, need_h: bool, need_w: bool):
    n, dtype = h.shape[0], wc.dtype
    hc = h.to(dtype)  # the GEMM operand (autocast makes the same copy)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, n, LOW_PRECISION_CHUNK):
        rows, yc = slice(start, start + LOW_PRECISION_CHUNK), targets[start:start + LOW_PRECISION_CHUNK, None]
        z = mm(hc[rows], wc.t())  # (r, V) logits
        target = z.gather(1, yc).float()
        total += (softmax_(z) - target).sum()  # logsumexp - target logit; z is now the softmax
        # d(loss sum)/d(logits) = softmax - one_hot, in the GEMMs' dtype; the 1 / n of the mean
        # is applied to the (r, C) and (V, C) products, not to the (r, V) logits. The one_hot
        # through a flat index: a bfloat16 scatter_add_ copied the whole (r, V) block twice (~50
        # ms a chunk); this reads and writes one element a row, rounded alike.
        flat = z.view(-1)
        at = torch.arange(z.shape[0], device=h.device) * z.shape[1] + yc[:, 0]
        flat[at] = flat[at] - 1
        g = z
        if grad_h is not None:
            torch.mul(mm(g, wc), 1.0 / n, out=grad_h[rows])
        if need_w:  # one chunk's (V, C) stays in the GEMMs' dtype until the backward widens and scales it
            part = weight_gradient(g, hc[rows])
            grad_w = part if grad_w is None else grad_w.float().add_(part)
        del z, g
    return total, grad_h, grad_w


def scaled_float(g: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """g * factor in float32: in place for a float32 g; for a bfloat16 CPU g in one native pass
    (native/widen.c: the head's 154 MB float32 gradient written once, not cast then multiplied;
    the same bits)."""
    if g.dtype == torch.float32:
        return g.mul_(factor)
    if (g.dtype == torch.bfloat16 and g.device.type == "cpu" and g.is_contiguous()
            and (kernels := library("widen")) is not None):
        out = torch.empty(g.shape, dtype=torch.float32)
        kernels.gpt2kit_widen_scaled(g.data_ptr(), out.data_ptr(), g.numel(), float(factor), torch.get_num_threads())
        return out
    return g.float().mul_(factor)


def softmax_(z: torch.Tensor, rows: int = SOFTMAX_ROWS) -> torch.Tensor:
    """Replace low-precision logits z (r, V) by their softmax, in z's dtype, and return their
    logsumexp (r, 1) in float32. `rows` at a time in float32 (exact to float32, as the plain
    path's log-softmax over the float32 copy of the logits), few enough to stay in cache: one
    pass over z where the float32 log-softmax, its exp and the rounding made four over (r, V)."""
    lse = torch.empty(z.shape[0], 1, dtype=torch.float32, device=z.device)
    if (z.dtype == torch.bfloat16 and z.device.type == "cpu" and z.is_contiguous()
            and (kernels := library("causal_softmax")) is not None):
        # one pass per row in registers (native/causal_softmax.c), to within rounding of the
        # float32 steps below: ~10x fewer passes over (r, V)
        kernels.gpt2kit_softmax_rows(z.data_ptr(), lse.data_ptr(), *z.shape, torch.get_num_threads())
        return lse
    for start in range(0, z.shape[0], rows):
        block = z[start:start + rows]
        e = block.float()
        top = e.amax(1, keepdim=True)
        total = e.sub_(top).exp_().sum(1, keepdim=True)
        torch.mul(e, total.reciprocal(), out=block)
        torch.add(total.log_(), top, out=lse[start:start + rows])
    return lse
