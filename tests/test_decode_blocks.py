"""A decode step's whole stack of blocks, or each block, in one native call
(kernels/decode_blocks.py), float32 and int8 x int8: the same logits and cache, bit for bit, as the
blocks' modules, with left padding; the plain forward for more rows than the kernels take; and the
structs of unchanging arguments gathered again, or given up, when a module of a block is replaced."""

from __future__ import annotations

import pytest
import torch

from gpt2kit.api import keep_gelu_apart, without_dropout
from gpt2kit.inference.kv_cache import KVCache
from gpt2kit.kernels import decode_blocks
from gpt2kit.kernels.decode_blocks import F32, INT8, DecodeBlock, DecodeBlocks, use_decode_blocks
from gpt2kit.kernels.norm_in_product import fuse_layer_norms, keep_layer_norms_apart
from gpt2kit.kernels.one_query_attention import use_one_query_attention
from gpt2kit.kernels.packed_linear import f32_rows, prepare_for_inference
from gpt2kit.model import GPT, Block, Blocks, ModelConfig, Positions
from gpt2kit.quantize import int8_products_available, quantize_int8

KINDS = [
    pytest.param(INT8, marks=pytest.mark.skipif(not int8_products_available() or decode_blocks.library("int8_rows") is None,
                                                reason="no native int8 x int8 products here (VNNI, a C compiler)")),
    pytest.param(F32, marks=pytest.mark.skipif(f32_rows() is None, reason="no native float32 kernel (AVX512, a C compiler)")),
]


def model_of(kind, blocks: bool) -> GPT:
    """A small random model laid out as gpt2kit.load lays out an eager one of this kind, with or
    without the one-call blocks."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, n_positions=32, n_embd=48, n_layer=2, n_head=3, dropout=0.0)).eval()
    if kind is INT8:
        quantize_int8(model)
    else:
        prepare_for_inference(model)
    use_one_query_attention(model)
    without_dropout(model)
    fuse_layer_norms(model)
    if blocks:
        use_decode_blocks(model)
    return model


def decode(model: GPT, rows: int) -> tuple[list[torch.Tensor], KVCache]:
    g = torch.Generator().manual_seed(rows)
    idx, pad = torch.randint(0, 64, (rows, 9), generator=g), torch.arange(rows) % 3  # left padding
    cache = KVCache.for_model(model, rows, 16)
    with torch.inference_mode():
        model(idx[:, :6], cache, Positions.at(0, 6, pad))
        return [model(idx[:, t:t + 1], cache, Positions.at(t, 1, pad)) for t in range(6, 9)], cache


def count_calls(kind, monkeypatch) -> list:
    """("block" or "stack", rows) of each native call decode_blocks makes from now on."""
    calls, real = [], decode_blocks.library(kind.library)

    def counting(name, function):
        return lambda *args: calls.append((name, args[-3])) or getattr(real, function)(*args)

    class Counting:
        pass

    setattr(Counting, kind.block, staticmethod(counting("block", kind.block)))
    setattr(Counting, kind.stack, staticmethod(counting("stack", kind.stack)))
    monkeypatch.setattr(decode_blocks, "library", lambda name: Counting())
    return calls


def assert_same_bits(a: tuple, b: tuple) -> None:
    (logits_a, cache_a), (logits_b, cache_b) = a, b
    assert all(torch.equal(x, y) for x, y in zip(logits_a, logits_b))
    assert all(torch.equal(x, y) for x, y in zip(cache_a.tensors(), cache_b.tensors()))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("more", [0, 1])  # up to the rows the kernels take, then one row more
def test_one_call_stack_keeps_the_bits(kind, more, monkeypatch):
    plain, fused = model_of(kind, False), model_of(kind, True)
    assert type(plain.transformer.h) is Blocks and all(type(b) is Block for b in plain.transformer.h)
    assert type(fused.transformer.h) is DecodeBlocks and all(type(b) is DecodeBlock for b in fused.transformer.h)
    for rows in ([1, 2, kind.max_rows] if not more else [kind.max_rows + 1]):
        want = decode(plain, rows)
        calls = count_calls(kind, monkeypatch)
        assert_same_bits(decode(fused, rows), want)
        assert calls == ([("stack", rows)] * 3 if not more else [])  # 3 steps; too many rows: the modules


@pytest.mark.parametrize("kind", KINDS)
def test_one_call_blocks_keep_the_bits(kind, monkeypatch):
    """Each block in one call where the stack cannot take them all: here the last block's MLP
    has its GELU apart (as a LoRA adapter on c_fc needs)."""
    plain, fused = model_of(kind, False), model_of(kind, True)
    for model in (plain, fused):
        last = model.transformer.h[-1]
        last.mlp.c_fc.gelu, last.mlp.act = False, torch.nn.GELU(approximate="tanh")
    want = decode(plain, 2)
    calls = count_calls(kind, monkeypatch)
    assert_same_bits(decode(fused, 2), want)
    assert calls == [("block", 2)] * 3  # the first block, in each of 3 steps


@pytest.mark.parametrize("kind", KINDS)
def test_replaced_modules_are_seen(kind, monkeypatch):
    """The LayerNorms moved back out of the products (as LoRA adapters need) or the GELU taken out
    of c_fc make the block run its modules, whose results it then equals."""
    for change in (keep_layer_norms_apart, keep_gelu_apart):
        model = model_of(kind, True)
        calls = count_calls(kind, monkeypatch)
        change(model)
        plain = model_of(kind, False)
        change(plain)
        assert_same_bits(decode(model, 2), decode(plain, 2))
        assert not calls
    model = model_of(kind, True)
    calls = count_calls(kind, monkeypatch)
    decode(model, 2)
    assert len(calls) == 3
    keep_gelu_apart(model)  # after the structs were made
    decode(model, 2)
    assert len(calls) == 3


@pytest.mark.skipif(f32_rows() is None, reason="no native float32 kernel (AVX512, a C compiler)")
def test_load_uses_them_for_eager_float32_and_int8_only(tiny_folder):
    import gpt2kit

    def stack(**options):
        return gpt2kit.load(tiny_folder, device="cpu", **options).module.transformer.h

    for fused in (stack(), stack(quantize="int8")) if int8_products_available() else (stack(),):
        assert type(fused) is DecodeBlocks and all(type(b) is DecodeBlock for b in fused)
    for plain in (stack(compile=True), stack(quantize="int8", compile=True), stack(dtype="bfloat16")):
        assert type(plain) is Blocks and all(type(b) is Block for b in plain)
