"""A decode step's whole stack of blocks in one native call, for int8 x int8 models
(native/int8_rows.c: gpt2kit_int8_blocks, looping over gpt2kit_int8_block): each block's attention
block, residual sum, MLP and second residual sum, the same bits as the blocks' modules, which stay
as they are (same modules, same state-dict keys). `Int8DecodeBlocks` takes the stack in one call;
where it cannot (one block's modules do not fit, block inputs kept for scoring), each
`Int8DecodeBlock` takes its own block in one call where it can.

Why: with the products at the speed the weights stream, a batch-1 int8 step of GPT-2 124M was
~30% Python around them (~95 us a block: module calls, the argument lists of two ctypes calls, a
dozen data_ptr() and attribute lookups, two residual adds): one call a block took the step from
3.5 to 2.9 ms, one call a stack to ~2.7. The call's unchanging arguments (the
weights, LayerNorms and sizes) are gathered once into a C struct (`_Block`) and rebuilt only when a
module in the block is replaced (LoRA adapters, a LayerNorm moved back out, the GELU taken out of
c_fc; then the block may run its modules instead): each call compares the block's modules with
the ones the struct was made from. Anything
the call does not take (prompts, more rows, bfloat16, training, compiling, adapters) runs the
plain Block.forward. Swapped in by `use_int8_blocks`, applied by the API to eager int8 models.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from ..model import Block, Blocks
from .int8 import NATIVE_MAX_ROWS, NATIVE_ROWS, Int8Linear, Int8MLP, fuses_attention
from .native import library
from .norm_in_product import norm_arguments
from .one_query_attention import CachedDecodeAttention, decode_step

_P, _F, _N = ctypes.c_void_p, ctypes.c_float, ctypes.c_int64


class _Weights(ctypes.Structure):  # struct int8_weights
    _fields_ = [("w", _P), ("wsum", _P), ("wscale", _P), ("bias", _P)]


class _Block(ctypes.Structure):  # struct int8_block
    _fields_ = [("ln1_w", _P), ("ln1_b", _P), ("ln2_w", _P), ("ln2_b", _P), ("ln1_eps", _F), ("ln2_eps", _F),
                ("scale", _F), ("c_attn", _Weights), ("attn_proj", _Weights), ("c_fc", _Weights),
                ("mlp_proj", _Weights), ("C", _N), ("H", _N), ("hidden", _N)]


def use_int8_blocks(model: nn.Module) -> None:
    """Swap Int8DecodeBlock in for every block of an eager CPU int8 model with native products, and
    Int8DecodeBlocks for their stack."""
    if library("int8_rows") is None:
        return
    blocks = model.transformer.h
    for i, block in enumerate(blocks):
        if type(block) is Block:
            blocks[i] = Int8DecodeBlock(block)
    if type(blocks) is Blocks:
        model.transformer.h = Int8DecodeBlocks(blocks)


class Int8DecodeBlocks(Blocks):
    """The stack, the same blocks, with a decode step of up to NATIVE_MAX_ROWS float32 rows through
    all of them in one native call where every block is an Int8DecodeBlock whose modules fit."""

    def __init__(self, blocks: Blocks):
        super().__init__(blocks)
        self.train(blocks.training)
        self._array: tuple = ((), None)  # (the blocks' structs, a C array of copies of them)

    def forward(self, x, cache, at, mask, inputs: list | None = None):
        if (inputs is not None or x.dtype != torch.float32 or x.shape[0] > NATIVE_MAX_ROWS or self.training
                or (step := decode_step(x, 0, cache, at, mask)) is None or (array := self._structs()) is None
                or not _alike(cache, step[0], len(array))):
            return super().forward(x, cache, at, mask, inputs)
        k, v, slot, mask, S = step
        x = x.contiguous()
        out = torch.empty_like(x)
        pointers = ctypes.c_void_p * len(array)
        self[0].attn.c_attn.products.last = NATIVE_ROWS
        failed = library("int8_rows").gpt2kit_int8_blocks(
            array, len(array), x.data_ptr(), out.data_ptr(), pointers(*[t.data_ptr() for t in cache.k]),
            pointers(*[t.data_ptr() for t in cache.v]), k.stride(0), k.stride(1), k.stride(2), slot.data_ptr(),
            mask.data_ptr(), S if mask.shape[0] > 1 else 0, x.shape[0], S, torch.get_num_threads())
        if failed:
            raise MemoryError(f"int8 blocks: no memory for {x.shape[0] * array[0].hidden} hidden values")
        return out

    def _structs(self):
        """Every block's struct in a C array, or None where a block does not fit the call."""
        structs = tuple(b._current() if type(b) is Int8DecodeBlock else None for b in self._modules.values())
        if any(struct is None for struct in structs):
            return None
        made_from, array = self._array
        if structs != made_from:
            array = (_Block * len(structs))(*structs)
            self._array = (structs, array)
        return array


def _alike(cache, k: torch.Tensor, layers: int) -> bool:
    """Whether the cache has a key and a value tensor for every layer, all laid out as k."""
    tensors = cache.k + cache.v
    return len(tensors) == 2 * layers and all(t.stride() == k.stride() and t.dtype == k.dtype for t in tensors)


class Int8DecodeBlock(Block):
    """The block, the same modules, with a decode step of up to NATIVE_MAX_ROWS float32 rows in one
    native call (module docstring)."""

    def __init__(self, block: Block):
        nn.Module.__init__(self)  # not Block's: no new weights to initialise
        for name, module in block.named_children():
            self.add_module(name, module)
        self.train(block.training)
        self._made_from: tuple | None = None  # the modules `_struct` was gathered from
        self._struct: _Block | None = None  # None: this block's modules do not fit the call

    def forward(self, x, layer, cache, at, mask):
        if (x.dtype != torch.float32 or x.shape[0] > NATIVE_MAX_ROWS or self.training
                or (step := decode_step(x, layer, cache, at, mask)) is None or (struct := self._current()) is None):
            return super().forward(x, layer, cache, at, mask)
        k, v, slot, mask, S = step
        x = x.contiguous()
        out = torch.empty_like(x)
        self._modules["attn"]._modules["c_attn"].products.last = NATIVE_ROWS
        failed = library("int8_rows").gpt2kit_int8_block(
            ctypes.byref(struct), x.data_ptr(), out.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
            k.stride(2), slot.data_ptr(), mask.data_ptr(), S if mask.shape[0] > 1 else 0, x.shape[0], S,
            torch.get_num_threads())
        if failed:
            raise MemoryError(f"int8 block: no memory for {x.shape[0] * self._struct.hidden} hidden values")
        return out

    def _current(self) -> _Block | None:
        # Plain dict lookups: nn.Module.__getattr__ costs ~0.3 us a lookup, and this runs every step.
        m = self._modules
        attn, mlp = m["attn"], m["mlp"]
        a, p = attn._modules, mlp._modules
        made_from = (attn, mlp, m["ln_1"], m["ln_2"], a["c_attn"], a["c_proj"], a["resid_dropout"], p["c_fc"],
                     p["c_proj"], p["act"], p["dropout"], a["c_attn"]._modules.get("norm"),
                     p["c_fc"]._modules.get("norm"), p["c_fc"].__dict__.get("gelu"))
        if made_from != self._made_from:
            self._made_from, self._struct = made_from, _gathered(self)
        return self._struct


def _gathered(block: Block) -> _Block | None:
    """The call's unchanging arguments for this block's modules, or None where they do not fit it."""
    attn, mlp = block.attn, block.mlp
    identities = (attn.resid_dropout, mlp.act, mlp.dropout)
    if not (type(attn) is CachedDecodeAttention and type(mlp) is Int8MLP and fuses_attention(attn.c_attn, attn.c_proj, 1)
            and all(type(m) is Int8Linear and m.native for m in (mlp.c_fc, mlp.c_proj)) and mlp.c_fc.gelu
            and all(type(m) is nn.Identity for m in identities)):
        return None
    norms = [_norm(block.ln_1, attn.c_attn), _norm(block.ln_2, mlp.c_fc)]
    if any(norm is False for norm in norms):
        return None
    (w1, b1, eps1), (w2, b2, eps2) = (norm_arguments(norm) for norm in norms)
    linears = [attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj]
    if any(m.bias is not None and m.bias.dtype != torch.float32 for m in linears):
        return None
    weights = [_Weights(m.packed.plain.data_ptr(), m.packed.shift.data_ptr(), m.packed.scale.data_ptr(),
                        None if m.bias is None else m.bias.data_ptr()) for m in linears]
    C, hidden = attn.c_proj.weight.shape[0], mlp.c_fc.weight.shape[0]
    return _Block(w1, b1, w2, b2, eps1, eps2, (C // attn.n_head) ** -0.5, *weights, C, attn.n_head, hidden)


def _norm(ln: nn.Module, linear: Int8Linear) -> nn.LayerNorm | None | bool:
    """The LayerNorm before `linear` where it is moved into it (ln an Identity: norm_in_product.py),
    or False: the block's own LayerNorm module runs torch's kernel, whose bits the native one does
    not promise (within ~1e-6), so such a block keeps its modules."""
    return linear.norm if type(ln) is nn.Identity else False
