"""CPU inference layout (float32 and bfloat16): linears whose weights oneDNN has prepacked once,
called with plain tensors (`prepare_for_inference`, applied by the API to a model that will only
run forward).
"""

from __future__ import annotations

import functools
import logging

import torch

from ..runtime import NATIVE_BFLOAT16, cpu_bfloat16
from .native import library
from .norm_in_product import norm_arguments

log = logging.getLogger(__name__)


def prepare_for_inference(model: torch.nn.Module, pack: bool = True) -> torch.nn.Module:
    """Inference-only layout choices for CPU float32 and bfloat16, applied from outside the model
    (which stays plain and trainable; these swaps are for a model that will only be run forward).

    Every block matrix becomes a `PackedLinear`, and the MLP's tanh-GELU runs inside its first
    matrix multiply. float32 on a CPU with AVX512 (and a C compiler): the matrices stay plain,
    products of up to NATIVE_MAX_ROWS rows (decode) run in gpt2kit's native kernel
    (kernels/native/f32_rows.c), more rows (a prefill) in oneDNN's, which is as fast on the plain
    layout there. bfloat16 on a CPU with AMX: each matrix is laid out once in AMX tiles for
    gpt2kit's native kernel (kernels/native/bf16_tiles.c), which streams a decode step's weights
    ~1.9x as fast as oneDNN's packed kernels and runs prompts ~10% slower. Elsewhere each matrix
    is prepacked once for oneDNN's matrix multiply: measured on this project's 2-core AVX-512
    machines, GPT-2 124M shapes, against nn.Linear: 19-30 instead of 10-13 GB/s of weights
    streamed at batch 1. The tied LM head: see `lm_head`.

    bfloat16 without AMX runs the packed layout on oneDNN's bfloat16 kernels (half the bytes per
    decoded token); accumulation inside a product is float32 on every path.
    Where the CPU has no native bfloat16 (`runtime.cpu_bfloat16`), that is said once on the log: the
    weights still work, emulated, slower than float32; without oneDNN bfloat16 kernels at all the
    linears stay nn.Linear.

    `pack=False` keeps every matrix in its plain layout, for a compiled decode step
    (compiled_decode.py): there, a single row's product is a kernel Inductor generates from the
    plain weight (see `PackedLinear.forward`), which streams it faster than oneDNN does.
    """
    p = next(model.parameters())
    if p.device.type != "cpu" or not packs(p.dtype):
        return model
    for block in model.transformer.h:
        block.attn.c_attn = PackedLinear(block.attn.c_attn.weight, block.attn.c_attn.bias, pack=pack)
        block.attn.c_proj = PackedLinear(block.attn.c_proj.weight, block.attn.c_proj.bias, pack=pack)
        mlp = block.mlp  # the tanh-GELU moves into c_fc's kernel
        mlp.c_fc = PackedLinear(mlp.c_fc.weight, mlp.c_fc.bias, gelu=True, pack=pack)
        mlp.act = torch.nn.Identity()
        mlp.c_proj = PackedLinear(mlp.c_proj.weight, mlp.c_proj.bias, pack=pack)
    model.lm_head = lm_head(model.transformer.wte.weight, pack)
    return model


def lm_head(wte: torch.Tensor, pack: bool) -> "PackedLinear":
    """The tied LM head. float32: the same oneDNN op on the embedding matrix as it is; packing it
    would need a second copy of its 154 MB, since the embedding lookup reads the same rows (7 ms
    at batch 1 and 11 ms at batch 8 against 15 and 28 ms for nn.Linear; a packed copy: 7 and 8).
    bfloat16: a copy in the tiled or packed layout (77 MB more for GPT-2's vocabulary), since
    gpt2kit's kernel reads tiles only, and oneDNN handles an unpacked bfloat16 matrix of more
    than one row far slower (GPT-2 124M, one thread, shared machine, interleaved: batch-8 decode
    138 against 104 tokens/s; batch 1 the same, 18 tokens/s). Either way the logits come out
    rounded to bfloat16 (8 significant bits, relative error up to 2^-8: oneDNN on CPU writes a
    bfloat16 product in bfloat16 only, and the tiles kernel does the same); the decoders, scoring
    and Model.logits widen them to float32 before sampling and log-softmax."""
    copy = pack and wte.dtype == torch.bfloat16
    return PackedLinear(wte, pack=copy)


def packs(dtype: torch.dtype) -> bool:
    """Whether prepare_for_inference gives a CPU model of `dtype` the packed (or tiled) layout."""
    if not PackedLinear.available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    if dtype == torch.float32:
        return True
    kind = cpu_bfloat16()
    if kind not in NATIVE_BFLOAT16:
        warn_emulated_bfloat16(kind)
    return kind is not None


@functools.cache  # once per process and kind
def warn_emulated_bfloat16(kind: str | None) -> None:
    how = "emulated by oneDNN" if kind else "in plain PyTorch kernels"
    log.warning("bfloat16 weights on a CPU without native bfloat16 products (no avx512_bf16): they "
                "run %s, correct but slower than float32; --dtype float32 is faster here", how)


class PackedLinear(torch.nn.Module):
    """A CPU inference stand-in for nn.Linear (float32 or bfloat16) whose weight oneDNN has
    prepacked, taking and returning ordinary tensors (the op Inductor's CPU backend uses for
    frozen linears); bfloat16 where the native AMX kernel runs (`bf16_tiles`) is laid out in
    tiles instead (`tiles`), and every row count runs there.
    `gelu=True` applies the tanh-GELU inside the same kernel; `pack=False` uses the weight as it
    is, shared with its owner (slower at batch > 1, no copy). float32 where the native kernel
    exists (`f32_rows`) is never packed: up to NATIVE_MAX_ROWS rows run there (one-thread A/B,
    GPT-2 124M's products: 0.93x oneDNN's packed time at 1 row, 0.95x at 8), more in oneDNN on
    the plain matrix (1.02x the packed time for a 512-token prefill).

    Traced into a compiled graph with a plain weight, a single row's product is written as a
    broadcast and a reduction instead, which Inductor turns into one kernel streaming the weight:
    ~25 GB/s against oneDNN's 21-22 for GPT-2 124M's matrices on this project's CPUs. It sums in
    float32 whatever the weight's dtype (a bfloat16 sum of 768-3072 terms would lose digits)."""

    PACK_ROWS = 8  # the row count the packing is tuned for; 1 and 512 rows run as fast with it

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False,
                 pack: bool = True):
        super().__init__()
        weight = weight.detach()
        self.out_features, self.in_features = weight.shape
        self.rows = f32_rows() if weight.dtype == torch.float32 else None  # the native kernel
        self.tiles = bf16_tiles() if pack and weight.dtype == torch.bfloat16 else None  # the AMX kernel
        pack = pack and self.rows is None and self.tiles is None  # they read their own layouts
        if self.tiles is not None:
            weight, bias = tiled(weight), None if bias is None else bias.detach().float()  # the kernel adds in float32
        elif pack:
            weight = torch.ops.mkldnn._reorder_linear_weight(weight, self.PACK_ROWS)
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.gelu, self.packed = gelu, pack
        self.takes_norm = self.rows is not None  # see norm_in_product.py
        self.norm: torch.nn.LayerNorm | None = None

    @staticmethod
    def available() -> bool:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiles is not None:
            if x.dtype != torch.bfloat16:  # the kernel reads raw bfloat16
                raise TypeError(f"a bfloat16 layer got {x.dtype} inputs; convert them with .bfloat16() first")
            if torch.compiler.is_compiling():  # an op the graph can hold (the eager call skips its ~7 us)
                return torch.ops.gpt2kit.bf16_tiles_linear(x, self.weight, self.bias, self.out_features, self.gelu)
            return native_product(self.tiles.gpt2kit_bf16_tiles_linear, x.contiguous(), self.weight, self.bias,
                                  self.out_features, self.gelu)
        if self.rows is not None and x.numel() <= NATIVE_MAX_ROWS * x.shape[-1] and not torch.compiler.is_compiling():
            return native_product(self.rows, x.contiguous(), self.weight, self.bias, self.out_features, self.gelu,
                                  norm_arguments(self.norm))
        if self.norm is not None:
            x = self.norm(x)
        if torch.compiler.is_compiling() and not self.packed and x.numel() == x.shape[-1]:
            return self._one_row(x)
        post_op = ("gelu", [], "tanh") if self.gelu else ("none", [], "")
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, *post_op)

    def extra_repr(self) -> str:
        layout = ("plain" if not self.packed and self.tiles is None else "AMX tiles" if self.tiles is not None
                  else "packed")
        kernel = (f"native up to {NATIVE_MAX_ROWS} rows, oneDNN above" if self.rows else
                  "native" if self.tiles is not None else "oneDNN")
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.weight.dtype}, {layout}: {kernel}"
                f"{', gelu' if self.gelu else ''}")

    def _one_row(self, x: torch.Tensor) -> torch.Tensor:
        # .float() on bfloat16 operands becomes a conversion inside the kernel's loads (the
        # weight is still read as bfloat16); a no-op for float32.
        y = (materialized(x).reshape(1, -1).float() * self.weight.float()).sum(-1)
        if self.bias is not None:
            y = y + self.bias.float()
        if self.gelu:
            y = torch.nn.functional.gelu(y, approximate="tanh")
        return y.to(x.dtype).view(*x.shape[:-1], -1)


def native_product(kernel, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int, gelu: bool,
                   norm: tuple = ()) -> torch.Tensor:
    """x (..., K) contiguous -> (..., n) through a native product kernel (f32_rows, or bf16_tiles'
    gpt2kit_bf16_tiles_linear) and `weight` in its layout; `norm`: a fused LayerNorm's arguments
    (f32_rows only)."""
    k = x.shape[-1]
    out = x.new_empty(*x.shape[:-1], n)
    failed = kernel(x.data_ptr(), *norm, weight.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
                    x.numel() // k, n, k, gelu, torch.get_num_threads())
    if failed:
        raise MemoryError(f"no memory for a copy of {x.numel()} activations")
    return out


def _tiles_op(x: torch.Tensor, tiles: torch.Tensor, bias: torch.Tensor | None, n: int, gelu: bool) -> torch.Tensor:
    return native_product(bf16_tiles().gpt2kit_bf16_tiles_linear, x.contiguous(), tiles, bias, n, gelu)


# A compiled step calls the tiles kernel through this op (as int8.py's int8_linear).
_OPS = torch.library.Library("gpt2kit", "FRAGMENT")
_OPS.define("bf16_tiles_linear(Tensor x, Tensor tiles, Tensor? bias, int n, bool gelu) -> Tensor")
_OPS.impl("bf16_tiles_linear", _tiles_op, "CPU")


@torch.library.register_fake("gpt2kit::bf16_tiles_linear")
def _(x: torch.Tensor, tiles: torch.Tensor, bias: torch.Tensor | None, n: int, gelu: bool) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], n)


NATIVE_MAX_ROWS = 8  # up to this many rows the native kernel is as fast as oneDNN's or faster


def f32_rows():
    """The native few-rows float32 kernel (kernels/native/f32_rows.c), or None where there is none
    (no AVX512, no C compiler: native.library)."""
    kernels = library("f32_rows")
    return None if kernels is None else kernels.gpt2kit_f32_rows


@functools.cache
def bf16_tiles():
    """The native bfloat16 kernels on AMX tiles (kernels/native/bf16_tiles.c), or None where they
    cannot run: no AMX or AVX512-BF16, no C compiler (native.library), or Linux refuses the tiles."""
    kernels = library("bf16_tiles")
    return kernels if kernels is not None and kernels.gpt2kit_bf16_tiles_ready() else None


def tiled(weight: torch.Tensor) -> torch.Tensor:
    """weight (N, K) bfloat16 laid out in AMX tiles (bf16_tiles.c: gpt2kit_pack_bf16_tiles), flat."""
    n, k = weight.shape
    tiles = torch.empty((n + 15) // 16 * ((k + 31) // 32) * 512, dtype=torch.bfloat16)
    bf16_tiles().gpt2kit_pack_bf16_tiles(weight.contiguous().data_ptr(), tiles.data_ptr(), n, k,
                                         torch.get_num_threads())
    return tiles


def materialized(x: torch.Tensor) -> torch.Tensor:
    """x computed into a buffer of its own before a compiled one-row product reads it
    (PackedLinear._one_row, int8.Int8Products). Otherwise Inductor inlines the elementwise
    work producing x (a LayerNorm's normalisation, a GELU) into the product's inner loop and
    redoes it for every output row: GPT-2 124M's compiled int8 step took 10-11 ms with that,
    6.6-8.4 ms without (A/B, fresh processes)."""
    return torch.ops.prims.inductor_force_stride_order.default(x, x.stride())
