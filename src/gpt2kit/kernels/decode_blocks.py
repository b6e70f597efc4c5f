"""A decode step's whole stack of blocks in one native call, for float32 and int8 x int8 models
(native/f32_rows.c: gpt2kit_f32_blocks, native/int8_rows.c: gpt2kit_int8_blocks, each looping over
its one-block call): each block's attention block, residual sum, MLP and second residual sum, the
same bits as the blocks' modules, which stay as they are (same modules, same state-dict keys).
`DecodeBlocks` takes the stack in one call; where it cannot (one block's modules do not fit, block
inputs kept for scoring), each `DecodeBlock` takes its own block in one call where it can.

Why: with the products at the speed the weights stream, the Python around them was a large part
of a decode step (GPT-2 124M, batch 1: ~95 us a block of a 3.5 ms int8 step, ~2 ms of a 17 ms
float32 one: module calls, the argument lists of several ctypes calls, data_ptr() and attribute
lookups, residual adds), and it runs cache-cold after each block's weights streamed through. One
call a block took the int8 step to 2.9 ms, one call a stack to 2.6. A block's unchanging arguments
(weights, LayerNorms, sizes) are gathered once into a C struct and gathered again only when a
module of the block is replaced (LoRA adapters, a LayerNorm moved back out, the GELU taken out of
c_fc; then the block may run its modules instead): each call compares the block's modules with
the ones its struct was made from. Anything the call does not take (prompts, more rows, bfloat16,
training, compiling, adapters) runs the plain forward. Swapped in by `use_decode_blocks`, applied
by the API to eager CPU models.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import nn

from ..model import MLP, Block, Blocks
from . import int8, packed_linear
from .int8 import Int8Linear, Int8MLP
from .native import library
from .norm_in_product import norm_arguments
from .one_query_attention import CachedDecodeAttention, decode_step
from .packed_linear import PackedLinear

_P, _F, _N = ctypes.c_void_p, ctypes.c_float, ctypes.c_int64
_NORMS_AND_SIZES = [("ln1_w", _P), ("ln1_b", _P), ("ln2_w", _P), ("ln2_b", _P), ("ln1_eps", _F), ("ln2_eps", _F),
                    ("scale", _F)]


class _Int8Weights(ctypes.Structure):  # struct int8_weights
    _fields_ = [("w", _P), ("wsum", _P), ("wscale", _P), ("bias", _P)]


class _F32Weights(ctypes.Structure):  # struct f32_weights
    _fields_ = [("w", _P), ("bias", _P)]


def _block_struct(name: str, weights: type) -> type:
    """struct int8_block / f32_block: norms, attention scale, four products' weights, sizes."""
    products = [(product, weights) for product in ("c_attn", "attn_proj", "c_fc", "mlp_proj")]
    return type(name, (ctypes.Structure,),
                {"_fields_": _NORMS_AND_SIZES + products + [("C", _N), ("H", _N), ("hidden", _N)]})


@dataclass(frozen=True)
class Kind:
    """A kind of native block: its C library and functions, the rows it takes, its structs."""

    library: str
    block: str  # one block's call
    stack: str  # the stack's
    step: str  # the stack's from token ids (native_decode.py)
    max_rows: int
    weights: type
    struct: type

    def product(self, linear: nn.Module) -> ctypes.Structure:
        if self.weights is _Int8Weights:
            p = linear.packed
            return _Int8Weights(p.plain.data_ptr(), p.shift.data_ptr(), p.scale.data_ptr(), _pointer(linear.bias))
        return _F32Weights(linear.weight.data_ptr(), _pointer(linear.bias))


INT8 = Kind("int8_rows", "gpt2kit_int8_block", "gpt2kit_int8_blocks", "gpt2kit_int8_step", int8.NATIVE_MAX_ROWS,
            _Int8Weights,
            _block_struct("_Int8Block", _Int8Weights))
F32 = Kind("f32_rows", "gpt2kit_f32_block", "gpt2kit_f32_blocks", "gpt2kit_f32_step", packed_linear.NATIVE_MAX_ROWS,
           _F32Weights,
           _block_struct("_F32Block", _F32Weights))


def use_decode_blocks(model: nn.Module) -> None:
    """Swap DecodeBlock in for every block of an eager CPU model whose first block fits a native
    call (float32 or int8 x int8 products in gpt2kit's kernels), and DecodeBlocks for the stack."""
    blocks = model.transformer.h
    if not len(blocks) or type(blocks[0]) is not Block or _gathered(blocks[0]) is None:
        return
    for i, block in enumerate(blocks):
        if type(block) is Block:
            blocks[i] = DecodeBlock(block)
    if type(blocks) is Blocks:
        model.transformer.h = DecodeBlocks(blocks)


class DecodeBlocks(Blocks):
    """The stack, the same blocks, with a decode step of a few float32 rows through all of them in
    one native call where every block is a DecodeBlock whose modules fit, all of one kind."""

    def __init__(self, blocks: Blocks):
        super().__init__(blocks)
        self.train(blocks.training)
        self._array: tuple = ((), None)  # (the blocks' structs, a C array of copies of them)

    def forward(self, x, cache, at, mask, inputs: list | None = None):
        if (inputs is not None or x.dtype != torch.float32 or self.training
                or (step := decode_step(x, 0, cache, at, mask)) is None or (kind_array := self._structs()) is None
                or x.shape[0] > kind_array[0].max_rows or (cached := cache_arguments(cache, len(kind_array[1]))) is None):
            return super().forward(x, cache, at, mask, inputs)
        (_, _, slot, mask, S), (kind, array), (k, v, strides) = step, kind_array, cached
        x = x.contiguous()
        out = torch.empty_like(x)
        note_path(kind, self[0])
        failed = getattr(library(kind.library), kind.stack)(
            array, len(array), x.data_ptr(), out.data_ptr(), k, v, *strides, slot.data_ptr(), mask.data_ptr(),
            S if mask.shape[0] > 1 else 0, x.shape[0], S, torch.get_num_threads())
        if failed:
            raise MemoryError(f"decode blocks: no memory for {x.shape[0] * array[0].hidden} hidden values")
        return out

    def _structs(self) -> tuple[Kind, ctypes.Array] | None:
        """Every block's struct in a C array, or None where a block does not fit the call."""
        gathered = [b._current() if type(b) is DecodeBlock else None for b in self._modules.values()]
        if any(g is None for g in gathered) or len({kind for kind, _ in gathered}) != 1:
            return None
        kind, structs = gathered[0][0], tuple(struct for _, struct in gathered)
        made_from, array = self._array
        if structs != made_from:
            array = (kind.struct * len(structs))(*structs)
            self._array = (structs, array)
        return kind, array


class DecodeBlock(Block):
    """The block, the same modules, with a decode step of a few float32 rows in one native call
    (module docstring)."""

    def __init__(self, block: Block):
        nn.Module.__init__(self)  # not Block's: no new weights to initialise
        for name, module in block.named_children():
            self.add_module(name, module)
        self.train(block.training)
        self._made_from: tuple | None = None  # the modules `_gathered` was made from
        self._gathered: tuple[Kind, ctypes.Structure] | None = None  # None: the modules do not fit a call

    def forward(self, x, layer, cache, at, mask):
        if (x.dtype != torch.float32 or self.training or (step := decode_step(x, layer, cache, at, mask)) is None
                or (gathered := self._current()) is None or x.shape[0] > gathered[0].max_rows):
            return super().forward(x, layer, cache, at, mask)
        (k, v, slot, mask, S), (kind, struct) = step, gathered
        x = x.contiguous()
        out = torch.empty_like(x)
        note_path(kind, self)
        failed = getattr(library(kind.library), kind.block)(
            ctypes.byref(struct), x.data_ptr(), out.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
            k.stride(2), slot.data_ptr(), mask.data_ptr(), S if mask.shape[0] > 1 else 0, x.shape[0], S,
            torch.get_num_threads())
        if failed:
            raise MemoryError(f"decode block: no memory for {x.shape[0] * struct.hidden} hidden values")
        return out

    def _current(self) -> tuple[Kind, ctypes.Structure] | None:
        # Plain dict lookups: nn.Module.__getattr__ costs ~0.3 us a lookup, and this runs every step.
        m = self._modules
        attn, mlp = m["attn"], m["mlp"]
        a, p = attn._modules, mlp._modules
        made_from = (attn, mlp, m["ln_1"], m["ln_2"], a["c_attn"], a["c_proj"], a["resid_dropout"], p["c_fc"],
                     p["c_proj"], p["act"], p["dropout"], a["c_attn"]._modules.get("norm"),
                     p["c_fc"]._modules.get("norm"), p["c_fc"].__dict__.get("gelu"))
        if made_from != self._made_from:
            self._made_from, self._gathered = made_from, _gathered(self)
        return self._gathered


def _gathered(block: Block) -> tuple[Kind, ctypes.Structure] | None:
    """The call's kind and unchanging arguments for this block's modules, or None where they do not
    fit one."""
    attn, mlp = block.attn, block.mlp
    linears = [attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj]
    if type(mlp) is Int8MLP and all(type(m) is Int8Linear and m.native for m in linears):
        kind = INT8
    elif type(mlp) is MLP and all(type(m) is PackedLinear and m.rows is not None for m in linears):
        kind = F32
    else:
        return None
    if not (type(attn) is CachedDecodeAttention and mlp.c_fc.gelu
            and all(type(m) is nn.Identity for m in (attn.resid_dropout, mlp.act, mlp.dropout))
            and all(m.bias is None or m.bias.dtype == torch.float32 for m in linears)):
        return None
    norms = [_norm(block.ln_1, attn.c_attn), _norm(block.ln_2, mlp.c_fc)]
    if any(norm is False for norm in norms):
        return None
    (w1, b1, eps1), (w2, b2, eps2) = (norm_arguments(norm) for norm in norms)
    C, hidden = attn.c_proj.weight.shape[0], mlp.c_fc.weight.shape[0]
    return kind, kind.struct(w1, b1, w2, b2, eps1, eps2, (C // attn.n_head) ** -0.5,
                             *map(kind.product, linears), C, attn.n_head, hidden)


def _norm(ln: nn.Module, linear: nn.Module) -> nn.LayerNorm | None | bool:
    """The LayerNorm before `linear` where it is moved into it (ln an Identity: norm_in_product.py),
    or False: the block's own LayerNorm module runs torch's kernel, whose bits the native one does
    not promise (within ~1e-6), so such a block keeps its modules."""
    return linear.norm if type(ln) is nn.Identity else False


def cache_arguments(cache, layers: int) -> tuple | None:
    """(the keys' and the values' pointers, C arrays of one a layer; their (kv_b, kv_h, kv_s)
    strides) for a float32 cache with a key and a value tensor for each of `layers` layers, all laid
    out alike, each vector contiguous; None for any other."""
    tensors = cache.k + cache.v
    k = tensors[0]
    if (len(tensors) != 2 * layers or k.dtype != torch.float32 or k.stride(3) != 1
            or not all(t.stride() == k.stride() and t.dtype == k.dtype for t in tensors)):
        return None
    pointers = ctypes.c_void_p * layers
    return pointers(*[t.data_ptr() for t in cache.k]), pointers(*[t.data_ptr() for t in cache.v]), k.stride()[:3]


def _pointer(bias: torch.Tensor | None) -> int | None:
    return None if bias is None else bias.data_ptr()


def note_path(kind: Kind, block: Block) -> None:
    """Record the native path for reports (int8 only: Int8Products.last, the latest product's)."""
    if kind is INT8:  # Int8Products.last: the path the latest product took
        block.attn.c_attn.products.last = int8.NATIVE_ROWS
