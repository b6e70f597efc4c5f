"""CPU float32 inference layout: linears whose weights oneDNN has prepacked once, called with
plain tensors (`prepare_for_inference`, applied by the API to a model that will only run forward).
"""

from __future__ import annotations

import torch


def prepare_for_inference(model: torch.nn.Module, pack: bool = True) -> torch.nn.Module:
    """Inference-only layout choices for CPU float32, applied from outside the model (which stays
    plain and trainable; these swaps are for a model that will only be run forward).

    Every block matrix is prepacked once for oneDNN's matrix multiply (`PackedLinear`), and the
    MLP's tanh-GELU runs inside its first matrix multiply. Measured on this project's 2-core
    AVX-512 machines, GPT-2 124M shapes, against nn.Linear: 19-30 instead of 10-13 GB/s of
    weights streamed at batch 1. The tied LM head runs through the same oneDNN op on the
    embedding matrix as it is (packing it would need a second copy of its 154 MB, since the
    embedding lookup reads the same rows): 7 ms at batch 1 and 11 ms at batch 8 against 15 and
    28 ms for nn.Linear (a packed copy: 7 and 8 ms). Same math in float32.

    `pack=False` keeps every matrix in its plain layout, for a compiled decode step
    (compiled_decode.py): there, a single row's product is a kernel Inductor generates from the
    plain weight (see `PackedLinear.forward`), which streams it faster than oneDNN does.
    """
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32 or not PackedLinear.available():
        return model
    for block in model.transformer.h:
        block.attn.c_attn = PackedLinear(block.attn.c_attn.weight, block.attn.c_attn.bias, pack=pack)
        block.attn.c_proj = PackedLinear(block.attn.c_proj.weight, block.attn.c_proj.bias, pack=pack)
        mlp = block.mlp  # the tanh-GELU moves into c_fc's kernel
        mlp.c_fc = PackedLinear(mlp.c_fc.weight, mlp.c_fc.bias, gelu=True, pack=pack)
        mlp.act = torch.nn.Identity()
        mlp.c_proj = PackedLinear(mlp.c_proj.weight, mlp.c_proj.bias, pack=pack)
    model.lm_head = PackedLinear(model.transformer.wte.weight, pack=False)
    return model


class PackedLinear(torch.nn.Module):
    """A float32 CPU inference stand-in for nn.Linear whose weight oneDNN has prepacked, taking
    and returning ordinary tensors (the op Inductor's CPU backend uses for frozen linears).
    `gelu=True` applies the tanh-GELU inside the same kernel; `pack=False` uses the weight as it
    is, shared with its owner (slower at batch > 1, no copy).

    Traced into a compiled graph with a plain weight, a single row's product is written as a
    broadcast and a reduction instead, which Inductor turns into one kernel streaming the weight:
    ~25 GB/s against oneDNN's 21-22 for GPT-2 124M's matrices on this project's CPUs."""

    PACK_ROWS = 8  # the row count the packing is tuned for; 1 and 512 rows run as fast with it

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False,
                 pack: bool = True):
        super().__init__()
        weight = weight.detach()
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight, self.PACK_ROWS)
                             if pack else weight)
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.post_op = ("gelu", [], "tanh") if gelu else ("none", [], "")
        self.gelu, self.packed = gelu, pack

    @staticmethod
    def available() -> bool:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed and x.numel() == x.shape[-1] and torch.compiler.is_compiling():
            return self._one_row(x)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, *self.post_op)

    def _one_row(self, x: torch.Tensor) -> torch.Tensor:
        y = (materialized(x).reshape(1, -1) * self.weight).sum(-1)
        if self.bias is not None:
            y = y + self.bias
        if self.gelu:
            y = torch.nn.functional.gelu(y, approximate="tanh")
        return y.view(*x.shape[:-1], -1)


def materialized(x: torch.Tensor) -> torch.Tensor:
    """x computed into a buffer of its own before a compiled one-row product reads it
    (PackedLinear._one_row, int8.Int8Products). Otherwise Inductor inlines the elementwise
    work producing x (a LayerNorm's normalisation, a GELU) into the product's inner loop and
    redoes it for every output row: GPT-2 124M's compiled int8 step took 10-11 ms with that,
    6.6-8.4 ms without (A/B, fresh processes)."""
    return torch.ops.prims.inductor_force_stride_order.default(x, x.stride())
