"""CPU training under bfloat16 autocast: dropout, attention with dropout and GELU made cheap, for
the modules of lean_backward.py to run in that case (issue 15: a bfloat16 step of GPT-2 124M
spent more time around its AMX products than in them).

What made them slow, measured on 2 cores of this project's Xeon (one thread, a (48, 256, 256)
bfloat16 tensor): a bool mask converted to bfloat16 (6.8 ms) or applied with masked_fill, where
or a multiply (8.5-9.7 ms); GPT-2's tanh GELU (10 ms forward, 10.7 backward for (4, 256, 3072)).
Instead:
- dropout masks are int16 words, -1 where kept and 0 where dropped, applied with a bitwise AND on
  the tensor's own bits (0.65 ms), made from 15-bit lanes of 64-bit random words in three int16
  passes (`keep_bits`);
- GELU is the exact erf GELU: 2.1 ms forward, 4.4 backward. GPT-2's tanh form approximates it
  to within 4.7e-4 (largest near x = +-2.7, where a bfloat16 step is 2^-7): below a bfloat16
  step wherever |GELU| >= 1/16, so in bfloat16 the two mostly round alike (a test bounds it);
- attention's causal softmax reads each row of scores up to its diagonal only, forward and
  backward, and applies the dropout mask as it writes the probabilities, drawing it inline
  (native/causal_softmax.c; elsewhere the scores are scaled and masked inside the batched
  product, baddbmm, torch's softmax runs and a keep_bits mask is kept); either way dropout's
  1/(1-p) goes to the (T, hs) output and gradient instead of the (T, T) probabilities.
None of it is bit for bit the plain modules' (float32 training keeps that, in lean_backward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .native import library

LANE_BITS = 15  # random bits per mask element: p is rounded to a multiple of 1/32768


def keep_bits(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(int16 mask of `shape`, -1 (all bits set) with probability 1 - p' and 0 otherwise, the
    dropout probability p' it draws): p rounded to a multiple of 1/32768. Each element is one
    16-bit lane of 64-bit random words (on CPUs with AVX512, native/counter_rng.h's counter-based
    generator seeded from the global one; else the global generator's own words: seeded and
    checkpointed like any other draw either way), shifted to 15 uniform bits r; kept where r >= the threshold, i.e. where
    (threshold - 1 - r) is negative, whose arithmetic shift by 15 is -1. No step overflows int16."""
    n = math.prod(shape)
    threshold, p = mask_threshold(p)
    if device.type == "cpu" and (kernels := library("dropout")) is not None:
        # the same lanes and arithmetic in one parallel native pass: torch's random_ filled the
        # words on one thread, ~12% of a step at 8 x 1024 tokens
        keep = torch.empty(shape, dtype=torch.int16)
        kernels.gpt2kit_keep_bits(keep.data_ptr(), n, native_seed(), threshold, torch.get_num_threads())
        return keep, p
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    r = words.view(torch.int16)[:n].view(shape).bitwise_right_shift(1)
    return torch.sub(threshold - 1, r).bitwise_right_shift_(LANE_BITS), p


def mask_threshold(p: float) -> tuple[int, float]:
    """(the threshold a mask lane is kept from, over -16384..16383; the dropout probability p' it
    draws): p rounded to a multiple of 1/32768."""
    dropped = round(p * 2**LANE_BITS)
    return dropped - 2**(LANE_BITS - 1), dropped / 2**LANE_BITS


def native_seed() -> int:
    """The native generator's seed (native/counter_rng.h): one draw from the global generator, so
    the masks follow its (checkpointed) state."""
    return torch.empty((), dtype=torch.int64).random_(-2**63, None).item() % 2**64


def apply_mask(x: torch.Tensor, keep: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """x where `keep` (from keep_bits) is -1, exactly 0 where it is 0: an AND of x's bits (a
    16-bit x directly, a 32-bit x with the mask sign-extended to 32 bits); in x itself if `inplace`."""
    bits = {2: torch.int16, 4: torch.int32}[x.element_size()]
    mask = keep if bits == torch.int16 else keep.to(bits)
    if inplace:
        x.view(bits).bitwise_and_(mask)
        return x
    return torch.bitwise_and(x.view(bits), mask).view(x.dtype)


def kept_scale(p: float) -> float:
    """Dropout's 1 / (1 - p) for what is kept; 0 where p rounded to 1 keeps nothing."""
    return 1 / (1 - p) if p < 1 else 0.0


def gelu(h: torch.Tensor) -> torch.Tensor:
    """GELU in bfloat16 training: the erf form, which GPT-2's tanh form approximates to 4.7e-4."""
    return F.gelu(h)


class BitsDropout(torch.autograd.Function):
    """Dropout with a keep_bits mask, kept for the backward pass as int16."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep, p = keep_bits(x.shape, p, x.device)
        ctx.scale = kept_scale(p)
        ctx.save_for_backward(keep)
        return apply_mask(x, keep).mul_(ctx.scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        keep, = ctx.saved_tensors
        return apply_mask(grad.contiguous(), keep).mul_(ctx.scale), None


def widens(x: torch.Tensor) -> bool:
    """Whether WideningDropout takes x: bfloat16 on a CPU with native/dropout.c."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and library("dropout") is not None


class WideningDropout(torch.autograd.Function):
    """Dropout p on a block's bfloat16 branch output, returned in float32 for the float32 residual
    stream it is added to (lean_backward.LeanResidualDropout): dropped, scaled and widened in one
    native pass (native/dropout.c), where BitsDropout's mask, AND and multiply, then the add's
    conversion, took four; the backward narrows the stream's float32 gradient the same way. The
    mask is keep_bits' for a seed drawn here, made again from the seed in the backward pass, never
    stored. For what `widens` accepts."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        threshold, p = mask_threshold(p)
        ctx.seed, ctx.threshold, ctx.scale = native_seed(), threshold, kept_scale(p)
        x = x.contiguous()
        out = torch.empty(x.shape, dtype=torch.float32)
        library("dropout").gpt2kit_dropout_widen(x.data_ptr(), out.data_ptr(), x.numel(), ctx.seed, threshold,
                                                 ctx.scale, torch.get_num_threads())
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        grad = grad.float().contiguous()
        out = torch.empty(grad.shape, dtype=torch.bfloat16)
        library("dropout").gpt2kit_dropout_narrow(grad.data_ptr(), out.data_ptr(), grad.numel(), ctx.seed,
                                                  ctx.threshold, ctx.scale, torch.get_num_threads())
        return out, None


def narrows(x: torch.Tensor) -> bool:
    """Whether NarrowingLayerNorm takes x: float32 on a CPU with native/layer_norm.c."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and library("layer_norm") is not None


class NarrowingLayerNorm(torch.autograd.Function):
    """layer_norm(x, (C,), weight, bias, eps) of the float32 residual stream, returned in bfloat16
    for the products after it (lean_backward.LeanLayerNorm): one native pass each way
    (native/layer_norm.c), where autocast's float32 LayerNorm was followed by a cast to bfloat16
    and its backward preceded by the cast back. For what `narrows` accepts, with weight and bias."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        x, C = x.contiguous(), x.shape[-1]
        M = x.numel() // C
        y = torch.empty(x.shape, dtype=torch.bfloat16)
        mean, rstd = torch.empty(M), torch.empty(M)
        library("layer_norm").gpt2kit_layer_norm_bf16(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), eps,
                                                      y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), M, C,
                                                      torch.get_num_threads())
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        grad = grad.to(torch.bfloat16).contiguous()
        dx, dw, db = torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)
        if library("layer_norm").gpt2kit_layer_norm_bf16_backward(
                grad.data_ptr(), x.data_ptr(), weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
                dw.data_ptr(), db.data_ptr(), mean.numel(), x.shape[-1], torch.get_num_threads()):
            raise MemoryError("LayerNorm backward: no memory for the per-thread sums")
        return dx, dw, db, None


class CausalDropoutAttention(torch.autograd.Function):
    """Causal softmax(q k^T / sqrt(hs)) v with dropout p on the probabilities, for q, k, v
    (B, nh, T, hs), computed in their dtype (bfloat16 under autocast), keeping the probabilities
    and what dropout kept of them for the backward pass, which runs the products autograd would
    run. With native/causal_softmax.c: the scores' rows up to the diagonal only, the dropout mask
    drawn inside the softmax (the same mask keep_bits draws for that seed), never stored; else the
    scores made with their scale and causal mask in one batched product, torch's softmax, and a
    keep_bits mask."""

    @staticmethod
    def forward(ctx, q, k, v, p: float):
        B, nh, T, hs = q.shape
        q3, k3, v3 = (t.reshape(B * nh, T, hs) for t in (q, k, v))
        ctx.scale = hs ** -0.5
        with torch.autocast(q.device.type, enabled=False):  # q's dtype throughout
            kernels = ctx.native = _causal_softmax(q)
            if kernels is not None:
                probs = torch.bmm(q3, k3.transpose(1, 2))  # (B*nh, T, T)
                threshold, p = mask_threshold(p)
                seed = native_seed()  # drawn even for p = 0, as keep_bits does: the generator moves alike
                ctx.dropout_scale = kept_scale(p)
                # the kept probabilities, scaled by 1 / (1 - p) as they are written (none: none dropped)
                mask = torch.empty_like(probs) if p > 0 else None
                kernels.gpt2kit_causal_softmax(probs.data_ptr(), None if mask is None else mask.data_ptr(), B * nh * T,
                                               T, ctx.scale, seed, threshold, ctx.dropout_scale, torch.get_num_threads())
                out = torch.bmm(probs if mask is None else mask, v3)
            else:
                causal = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
                probs = torch.baddbmm(causal, q3, k3.transpose(1, 2), alpha=ctx.scale).softmax(-1)
                mask, p = keep_bits(probs.shape, p, q.device)
                ctx.dropout_scale = kept_scale(p)
                out = torch.bmm(apply_mask(probs, mask), v3).mul_(ctx.dropout_scale)
        ctx.save_for_backward(q3, k3, v3, probs, mask)
        return out.view(B, nh, T, hs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):  # the saved tensors' dtypes
            return CausalDropoutAttention.gradients(ctx, grad)

    @staticmethod
    def gradients(ctx, grad):
        q3, k3, v3, probs, mask = ctx.saved_tensors
        B, nh, T, hs = grad.shape
        grad = grad.reshape(B * nh, T, hs).to(probs.dtype)
        if ctx.native is not None:  # mask: the kept probabilities times 1 / (1 - p), or None (none dropped)
            grad_v = (probs if mask is None else mask).transpose(1, 2).bmm(grad)
            grad_s = grad.bmm(v3.transpose(1, 2))  # the kept probabilities' gradient
            # the probabilities' gradient is 1 / (1 - p) of it where kept: applied with the scores'
            # scale to their (T, T) gradient as it is written, not to (T, hs) products after
            ctx.native.gpt2kit_causal_softmax_backward(grad_s.data_ptr(), probs.data_ptr(),
                                                       None if mask is None else mask.data_ptr(), B * nh * T, T,
                                                       ctx.scale * ctx.dropout_scale, torch.get_num_threads())
            grad_q, grad_k = grad_s.bmm(k3), grad_s.transpose(1, 2).bmm(q3)
        else:  # mask: keep_bits'
            grad = grad * ctx.dropout_scale
            grad_v = apply_mask(probs, mask).transpose(1, 2).bmm(grad)
            grad_p = apply_mask(grad.bmm(v3.transpose(1, 2)), mask, inplace=True)
            grad_s = torch._softmax_backward_data(grad_p, probs, -1, probs.dtype)
            del grad_p
            grad_q = grad_s.bmm(k3).mul_(ctx.scale)
            grad_k = grad_s.transpose(1, 2).bmm(q3).mul_(ctx.scale)
        return tuple(g.view(B, nh, T, hs) for g in (grad_q, grad_k, grad_v)) + (None,)


def _causal_softmax(x: torch.Tensor):
    """native/causal_softmax.c for bfloat16 CPU tensors where it is built, else None."""
    return library("causal_softmax") if x.dtype == torch.bfloat16 and x.device.type == "cpu" else None
