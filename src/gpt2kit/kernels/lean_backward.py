"""Training on CPU with fewer activations kept for the backward pass and cheaper dropout: small
modules the model calls (`attn.core`, the dropouts, the MLP's `act` and `c_proj`) swapped from
outside for classes of their own that save less and rebuild the rest in the backward pass, as
kernels/checkpointing.py swaps the blocks. `print(model)` shows them. Applied to every model
`finetune` trains (training/setup.py, load_for_training).

In float32 they compute the same bits as the plain modules (issue 5's peak-memory target). Under
autocast on CPU (bfloat16 training) they run kernels/bf16_training.py instead: dropout masks from
random bits applied to the tensors' bits, attention with dropout in bfloat16 without SDPA's math
path, the erf GELU (bernoulli_ alone took ~20% of a bfloat16 step of GPT-2 124M on AMX).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import GPT, ScaledDotProduct
from . import bf16_products, bf16_training


def save_less_for_backward(model: GPT) -> None:
    """Keep fewer activations for the backward pass, with the same numerics (the same operations
    and random draws, so the same bits): the default of float32 training on CPU.

    Each swapped module takes the training flag and the parameters of the one it replaces (so
    state-dict keys and the optimizer's parameter order do not change), and saves less in the
    training case, deferring to the plain computation otherwise:
    - MLP (`mlp.act` -> nn.Identity, `mlp.c_proj` -> LeanGeluLinear): c_proj's input gelu(h) is
      recomputed from h, which GELU's backward keeps anyway: one GELU per block in the backward
      (~3 ms each), 12.6 MB per block less. A LoRA-wrapped c_proj is left as it is.
    - attention with dropout (`attn.core` -> LeanScaledDotProduct): scaled_dot_product_attention
      takes its math path on CPU when dropout is on, which keeps three float (B, nh, T, T)
      tensors (probabilities, dropout noise, dropped probabilities) and scaled copies of q, k, v;
      this keeps the probabilities, the dropout mask as bool and q, k, v themselves: 22 MB per
      block less. (Without dropout SDPA's flash kernel already keeps no (T, T) tensor.)
    - dropout (every nn.Dropout, LoRA's too -> LeanDropout; a block's two branch outputs ->
      LeanResidualDropout): the noise is kept as a bool mask, not float32: 2.4 MB per use less.
    - the blocks' LayerNorms (`ln_1`, `ln_2` -> LeanLayerNorm): nn.LayerNorm in float32; under
      bfloat16 autocast its output in bfloat16, the cast the products after it made folded in.
    - the other linears (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc` -> LeanLinear): F.linear in
      float32; under bfloat16 autocast their products cut as kernels/bf16_products.py cuts them
      (as LeanGeluLinear's are): ~12% of a bfloat16 step of GPT-2 124M at 4 x 256 tokens.
    GPT-2 124M, 4 x 256 tokens, dropout 0.1: 1,236 -> 784 MB saved for the backward pass, peak
    RSS of the benchmark's step 3,490 -> ~3,070 MB; the step time unchanged within the noise of
    interleaved runs (benchmarks/RESULTS.md). Evaluation, sampling and autocast run the plain
    computation; a test checks loss and gradients are bitwise the plain path's.
    """
    for block in model.transformer.h:
        for name in ("ln_1", "ln_2"):
            if type(getattr(block, name)) is nn.LayerNorm:
                setattr(block, name, LeanLayerNorm(getattr(block, name)))
        core = block.attn.core
        if type(core) is ScaledDotProduct:
            block.attn.core = LeanScaledDotProduct(core.p).train(core.training)
        mlp = block.mlp
        if _is_tanh_gelu(mlp.act) and type(mlp.c_proj) is nn.Linear:
            mlp.act = nn.Identity().train(mlp.act.training)
            mlp.c_proj = LeanGeluLinear(mlp.c_proj)
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (mlp, "c_fc")):
            if type(getattr(parent, name)) is nn.Linear:
                setattr(parent, name, LeanLinear(getattr(parent, name)))
    for name, module in list(model.named_modules()):
        if type(module) is nn.Dropout:
            parent, _, child = name.rpartition(".")
            residual = name.endswith(("attn.resid_dropout", "mlp.dropout"))  # a block's branch output
            setattr(model.get_submodule(parent), child, (LeanResidualDropout if residual else LeanDropout)(module))


def sparse_embedding_gradient(model: GPT) -> None:
    """The token embedding's own gradient as the rows its tokens use (a sparse tensor), which
    autograd adds into the tied LM head's dense one: the dense embedding gradient was a zero-filled
    copy of the whole (V, C) table each step, then added to the head's (GPT-2 124M at 4 x 256
    tokens: ~45 ms of a ~0.85 s bfloat16 step). For one process only: DDP all-reduces gradients as
    dense buckets. Only while the head is tied to the embedding, so the sum autograd stores is
    dense (the optimizers take dense gradients)."""
    wte = model.transformer.wte
    if type(wte) is nn.Embedding and model.lm_head.weight is wte.weight:
        wte.sparse = True


def _is_tanh_gelu(act: nn.Module) -> bool:
    return type(act) is nn.GELU and act.approximate == "tanh"


def lean_path(x: torch.Tensor) -> bool:
    """Training in float32 on CPU: where these were measured and where they copy the plain ops
    bit for bit (CUDA's dropout draws bool masks and its attention kernels keep no (T, T) tensor)."""
    return torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32 and \
        not torch.is_autocast_enabled("cpu")


def fast_path(x: torch.Tensor) -> bool:
    """Training under autocast on CPU (bfloat16): no bitwise reference to keep, and bernoulli_,
    bool masks and the tanh GELU are slow there (kernels/bf16_training.py)."""
    return torch.is_grad_enabled() and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, half=None) -> torch.Tensor:
    """F.linear, with its products cut as kernels/bf16_products.py cuts them when training under
    bfloat16 autocast on CPU, there on w's bfloat16 copy `half` (kernels/half_copies.py's
    HalfCopy, which then takes w's gradient) where it has one."""
    if fast_path(x) and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return bf16_products.Linear.apply(x, w if half is None else half.current(), b)
    return F.linear(x, w, b)


# ---- attention ------------------------------------------------------------------------------

class LeanScaledDotProduct(ScaledDotProduct):
    """ScaledDotProduct that, training with dropout over a whole sequence (no cache, causal),
    runs DropoutAttention (float32: the same bits as SDPA's math path, saving less) or under
    autocast bf16_training.CausalDropoutAttention."""

    def forward(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:  # (B, nh, T, hs)
        p = self.p if self.training else 0.0
        if p == 0.0 or mask is not None:
            return super().forward(q, k, v, mask)
        if lean_path(q):
            return DropoutAttention.apply(q, k, v, p)
        if fast_path(q):
            return bf16_training.CausalDropoutAttention.apply(q, k, v, p)
        return super().forward(q, k, v, mask)


class DropoutAttention(torch.autograd.Function):
    """Causal softmax(q k^T / sqrt(hs)) v with dropout on the probabilities, as the math path of
    scaled_dot_product_attention computes it (the same operations and random draws, so the same
    bits), saving the probabilities and a bool mask instead of three float (B, nh, T, T) tensors.
    The backward runs the batched products autograd would run for the math path."""

    @staticmethod
    def forward(ctx, q, k, v, p: float):
        # The math path scales q and k by sqrt(1 / sqrt(hs)) each (as float32: this Python
        # float rounds to the same float32 as the path's own double for every head size).
        s = (1.0 / q.shape[-1] ** 0.5) ** 0.5
        T = q.shape[-2]
        causal = torch.zeros(T, T, dtype=q.dtype, device=q.device).masked_fill_(
            torch.ones(T, T, dtype=torch.bool, device=q.device).tril().logical_not(), float("-inf"))
        probs = torch.matmul(q * s, k.transpose(-2, -1) * s).add_(causal).softmax(-1)  # (B, nh, T, T)
        noise = torch.empty_like(probs).bernoulli_(1 - p).div_(1 - p)  # as torch.dropout on CPU
        keep = noise.bool()
        ctx.p, ctx.s = p, s
        ctx.save_for_backward(q, k, v, probs, keep)
        return torch.matmul(probs * noise, v)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, probs, keep = ctx.saved_tensors
        B, nh, T, hs = q.shape
        noise = keep.to(probs.dtype).div_(1 - ctx.p)  # the forward's noise, bit for bit
        dropped = (probs * noise).view(B * nh, T, T)
        grad = grad.reshape(B * nh, T, hs)
        grad_v = dropped.transpose(1, 2).bmm(grad).view(B, nh, T, hs)
        del dropped
        grad_p = grad.bmm(v.reshape(B * nh, T, hs).transpose(1, 2)).view(B, nh, T, T).mul_(noise)
        del noise
        grad_a = torch._softmax_backward_data(grad_p, probs, -1, probs.dtype).view(B * nh, T, T)
        del grad_p
        qs, kts = (q * ctx.s).reshape(B * nh, T, hs), (k.transpose(-2, -1) * ctx.s).reshape(B * nh, hs, T)
        grad_q = grad_a.bmm(kts.transpose(1, 2)).view(B, nh, T, hs) * ctx.s
        grad_k = (qs.transpose(1, 2).bmm(grad_a).view(B, nh, hs, T) * ctx.s).transpose(-2, -1)
        return grad_q, grad_k, grad_v, None


# ---- dropout --------------------------------------------------------------------------------

class LeanDropout(nn.Dropout):
    """nn.Dropout that, training on CPU, keeps its noise as a bool mask (MaskDropout: the same
    draws as nn.Dropout) in float32, or under autocast runs bf16_training.BitsDropout."""

    def __init__(self, plain: nn.Dropout):
        super().__init__(plain.p, plain.inplace)
        self.train(plain.training)  # a new module starts in train mode, whatever it replaces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and 0.0 < self.p < 1.0 and not self.inplace:
            if lean_path(x):
                return MaskDropout.apply(x, self.p)
            if fast_path(x):
                return bf16_training.BitsDropout.apply(x, self.p)
        return super().forward(x)


class LeanResidualDropout(LeanDropout):
    """LeanDropout on a block's branch output (`attn.resid_dropout`, `mlp.dropout`), which the
    block adds to its float32 residual stream: under bfloat16 autocast on CPU the bfloat16 branch
    comes out float32 (bf16_training.WideningDropout: dropout and the add's conversion in one pass)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and 0.0 < self.p < 1.0 and not self.inplace and fast_path(x) and bf16_training.widens(x):
            return bf16_training.WideningDropout.apply(x, self.p)
        return super().forward(x)


class MaskDropout(torch.autograd.Function):
    """F.dropout as it runs on CPU (float noise from bernoulli_, scaled, multiplied: the same
    draws and bits), saving the noise as a bool mask: 1 instead of 4 bytes per element."""

    @staticmethod
    def forward(ctx, x, p: float):
        noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
        ctx.p = p
        ctx.save_for_backward(noise.bool())
        return x * noise

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        keep, = ctx.saved_tensors
        return grad * keep.to(grad.dtype).div_(1 - ctx.p), None


# ---- LayerNorm ------------------------------------------------------------------------------

class LeanLayerNorm(nn.LayerNorm):
    """nn.LayerNorm holding the replaced one's Parameters (a block's `ln_1`, `ln_2`, whose outputs
    go to bfloat16 products): training under bfloat16 autocast on CPU, its float32 input comes
    out bfloat16 (bf16_training.NarrowingLayerNorm: the LayerNorm and autocast's cast in one pass
    each way); otherwise nn.LayerNorm's float32."""

    def __init__(self, plain: nn.LayerNorm):
        nn.Module.__init__(self)
        self.normalized_shape, self.eps, self.elementwise_affine = plain.normalized_shape, plain.eps, True
        self.weight, self.bias = plain.weight, plain.bias
        self.train(plain.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (fast_path(x) and torch.get_autocast_dtype("cpu") == torch.bfloat16 and self.bias is not None
                and self.weight is not None and bf16_training.narrows(x)):
            return bf16_training.NarrowingLayerNorm.apply(x, self.weight, self.bias, self.eps)
        return super().forward(x)


# ---- MLP ------------------------------------------------------------------------------------

class LeanGeluLinear(nn.Module):
    """linear(gelu_tanh(h)), MLP.c_proj with MLP.act moved into it (act becomes nn.Identity),
    holding c_proj's own weight (C, 4C) and bias: training in float32 on CPU it runs GeluLinear,
    keeping h but not gelu(h); under autocast on CPU, bf16_training's GELU."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters: the same keys
        self.half = None  # the weight's bfloat16 copy (kernels/half_copies.py), where it has one
        self.train(linear.training)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, 4C) -> (B, T, C)
        if lean_path(h):
            return GeluLinear.apply(h, self.weight, self.bias)
        return linear(bf16_training.gelu(h) if fast_path(h) else gelu(h), self.weight, self.bias, self.half)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, gelu='tanh' on its input")


class LeanLinear(nn.Linear):
    """nn.Linear holding the replaced one's Parameters (the same state-dict keys) whose products,
    training under bfloat16 autocast on CPU, run as kernels/bf16_products.py cuts them."""

    def __init__(self, plain: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = plain.in_features, plain.out_features
        self.weight, self.bias = plain.weight, plain.bias
        self.half = None  # the weight's bfloat16 copy (kernels/half_copies.py), where it has one
        self.train(plain.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.half)


class GeluLinear(torch.autograd.Function):
    """linear(gelu_tanh(h), w, b) for h (B, T, 4C), keeping h but not gelu(h), which the backward
    recomputes. The gradients are the products autograd runs for F.linear's addmm."""

    @staticmethod
    def forward(ctx, h, w, b):
        ctx.save_for_backward(h, w)
        return F.linear(gelu(h), w, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h, w = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])  # (N, C)
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = grad.t().mm(gelu(h).view(grad.shape[0], -1))
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        if ctx.needs_input_grad[0]:
            grad_h = torch.ops.aten.gelu_backward(grad.mm(w).view(h.shape), h, approximate="tanh")
        return grad_h, grad_w, grad_b


def gelu(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h, approximate="tanh")  # GPT-2's, as model.MLP's act
