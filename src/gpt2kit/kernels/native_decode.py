"""A decode step of a float32 or int8 x int8 CPU model from the rows' token ids to their hidden
states in one native call (native/decode_stack.h: DECODE_STEP, for either kind of block): the
token and position embeddings, the attention mask, and the stack of blocks of
decode_blocks.DecodeBlocks; then the model's own final LayerNorm and LM head modules.

Why: with the stack in one call, what was left of a batch-1 step outside the products was mostly
Python (GPT-2 124M int8: ~0.3 ms of a ~2.7 ms step, run cache-cold after the weights streamed
through): the model's forward and its modules' calls, Positions and the mask, the embeddings'
operators, slicing the cache to the live rows, the stack's checks. `NativeDecoder` is the API's
`running_batch.Decoder` for eager CPU models whose stack is a DecodeBlocks: a step that fits (few
rows, every module as the call expects, no hooks on the modules it skips) takes the call, the same
bits as the model's forward; any other runs EagerDecoder's (the model's forward), so adapters, a
model in training, a cache of another dtype or a hook keep working as before.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
from torch import nn

from ..inference.kv_cache import KVCache
from ..inference.running_batch import EagerDecoder
from ..model import GPT
from .decode_blocks import DecodeBlocks, cache_arguments, note_path
from .int8 import Int8Embedding
from .native import library


class NativeDecoder(EagerDecoder):
    """EagerDecoder, with a step that fits taken from token ids through the stack in one call."""

    def __init__(self, model: GPT, argmax: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__(model, argmax)
        self._cache: tuple = (None, (), None)  # (the cache, its tensors, their cache_arguments)

    def __call__(self, cache: KVCache, tokens: list[int], start: int, pads: list[int]) -> torch.Tensor:
        model, B = self.model, len(tokens)
        arguments = self._embedding(model, tokens, start)
        stack = model.transformer.h
        kind_array = stack._structs() if arguments is not None else None
        cached = self._cache_arguments(cache, len(kind_array[1])) if kind_array is not None else None
        if cached is None or not 0 < B <= kind_array[0].max_rows:
            return super().__call__(cache, tokens, start, pads)
        (kind, array), (k, v, strides) = kind_array, cached
        ids = torch.tensor(tokens)
        pad = torch.tensor(pads) if any(pads) else None
        x = torch.empty(B, 1, array[0].C)
        note_path(kind, stack[0])
        failed = getattr(library(kind.library), kind.step)(
            array, len(array), ids.data_ptr(), None if pad is None else pad.data_ptr(), *arguments, x.data_ptr(), k, v,
            *strides, start, B, torch.get_num_threads())
        if failed:
            raise MemoryError(f"native decode: no memory for {B * array[0].hidden} hidden values")
        return model.lm_head(model.transformer.ln_f(x))[:, -1].float()

    def _cache_arguments(self, cache: KVCache, layers: int) -> tuple | None:
        """decode_blocks.cache_arguments, kept while the cache holds the same tensors (a batch's
        cache lives for all its steps; ~10 us a step to gather again)."""
        made_for, tensors, arguments = self._cache
        if made_for is not cache or len(tensors) != 2 * layers or not all(map(operator.is_, tensors, cache.k + cache.v)):
            arguments = cache_arguments(cache, layers)
            self._cache = (cache, tuple(cache.k + cache.v), arguments)
        return arguments

    @staticmethod
    def _embedding(model: GPT, tokens: list[int], start: int) -> tuple | None:
        """(wte, wte's scales or None, wpe) pointers where the step fits the call as far as the
        modules it skips go (the stack checks its own), else None."""
        t = model.transformer
        wte, wpe, stack = t.wte, t.wpe, t.h
        if (type(model) is not GPT or model.training or type(stack) is not DecodeBlocks or start >= wpe.num_embeddings
                or not _identity(t.drop) or _hooked(model, t, wte, wpe, t.drop, stack)
                or type(wpe) is not nn.Embedding or wpe.weight.dtype != torch.float32 or not wpe.weight.is_contiguous()
                or not wte.weight.is_contiguous()
                or not all(0 <= token < wte.weight.shape[0] for token in tokens)):
            return None
        if type(wte) is Int8Embedding and wte.weight.dtype == torch.int8 and wte.scale.dtype == torch.float32:
            return wte.weight.data_ptr(), wte.scale.data_ptr(), wpe.weight.data_ptr()
        if type(wte) is nn.Embedding and wte.weight.dtype == torch.float32:
            return wte.weight.data_ptr(), None, wpe.weight.data_ptr()
        return None


def _identity(drop: nn.Module) -> bool:
    """Whether the embeddings' dropout leaves them as they are: an identity, or a dropout that is
    off (eval mode, or p = 0)."""
    return type(drop) is nn.Identity or (type(drop) is nn.Dropout and (not drop.training or drop.p == 0))


def _hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook is registered on any of `modules`: the call would skip it."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)
