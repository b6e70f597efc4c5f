"""A decode step's whole int8 stack of blocks, or each block, in one native call
(kernels/int8_block.py): the same logits and cache, bit for bit, as the blocks' modules, for 1-3
rows with left padding; the plain forward for more rows; and the structs of unchanging arguments
rebuilt, or given up, when a module of a block is replaced."""

from __future__ import annotations

import pytest
import torch

from gpt2kit.api import keep_gelu_apart, without_dropout
from gpt2kit.inference.kv_cache import KVCache
from gpt2kit.kernels import int8_block
from gpt2kit.kernels.int8_block import Int8DecodeBlock, Int8DecodeBlocks, use_int8_blocks
from gpt2kit.kernels.norm_in_product import fuse_layer_norms, keep_layer_norms_apart
from gpt2kit.kernels.one_query_attention import use_one_query_attention
from gpt2kit.model import GPT, Block, Blocks, ModelConfig, Positions
from gpt2kit.quantize import int8_products_available, quantize_int8

pytestmark = pytest.mark.skipif(not int8_products_available() or int8_block.library("int8_rows") is None,
                                reason="no native int8 x int8 products on this CPU (VNNI) or no C compiler")


def int8_model(blocks: bool) -> GPT:
    """A small random int8 model laid out as gpt2kit.load lays out an eager one, with or without
    the one-call blocks."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, n_positions=32, n_embd=48, n_layer=2, n_head=3, dropout=0.0)).eval()
    quantize_int8(model)
    use_one_query_attention(model)
    without_dropout(model)
    fuse_layer_norms(model)
    if blocks:
        use_int8_blocks(model)
    return model


def decode(model: GPT, rows: int) -> tuple[list[torch.Tensor], KVCache]:
    g = torch.Generator().manual_seed(rows)
    idx, pad = torch.randint(0, 64, (rows, 9), generator=g), torch.arange(rows) % 3  # left padding
    cache = KVCache.for_model(model, rows, 16)
    with torch.inference_mode():
        model(idx[:, :6], cache, Positions.at(0, 6, pad))
        return [model(idx[:, t:t + 1], cache, Positions.at(t, 1, pad)) for t in range(6, 9)], cache


def count_calls(monkeypatch) -> list:
    """(function, rows) of each native call int8_block makes from now on."""
    calls, real = [], int8_block.library("int8_rows")

    class Counting:
        def gpt2kit_int8_block(self, *args):
            calls.append(("block", args[-3]))
            return real.gpt2kit_int8_block(*args)

        def gpt2kit_int8_blocks(self, *args):
            calls.append(("stack", args[-3]))
            return real.gpt2kit_int8_blocks(*args)

    monkeypatch.setattr(int8_block, "library", lambda name: Counting())
    return calls


def assert_same_bits(a: tuple, b: tuple) -> None:
    (logits_a, cache_a), (logits_b, cache_b) = a, b
    assert all(torch.equal(x, y) for x, y in zip(logits_a, logits_b))
    assert all(torch.equal(x, y) for x, y in zip(cache_a.tensors(), cache_b.tensors()))


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_one_call_stack_keeps_the_bits(rows, monkeypatch):
    plain, fused = int8_model(False), int8_model(True)
    assert type(plain.transformer.h) is Blocks and all(type(b) is Block for b in plain.transformer.h)
    assert type(fused.transformer.h) is Int8DecodeBlocks
    assert all(type(b) is Int8DecodeBlock for b in fused.transformer.h)
    want = decode(plain, rows)
    calls = count_calls(monkeypatch)
    assert_same_bits(decode(fused, rows), want)
    assert calls == ([("stack", rows)] * 3 if rows <= 3 else [])  # 3 steps; 4 rows: the modules


@pytest.mark.parametrize("rows", [1, 3])
def test_one_call_blocks_keep_the_bits(rows, monkeypatch):
    """Each block in one call where the stack cannot take them all: here the last block's MLP
    has its GELU apart (as a LoRA adapter on c_fc needs)."""
    plain, fused = int8_model(False), int8_model(True)
    for model in (plain, fused):
        last = model.transformer.h[-1]
        last.mlp.c_fc.gelu, last.mlp.act = False, torch.nn.GELU(approximate="tanh")
    want = decode(plain, rows)
    calls = count_calls(monkeypatch)
    assert_same_bits(decode(fused, rows), want)
    assert calls == [("block", rows)] * 3  # the first block, in each of 3 steps


def test_replaced_modules_are_seen(monkeypatch):
    """The LayerNorms moved back out of the products (as LoRA adapters need) or the GELU taken out
    of c_fc make the block run its modules, whose results it then equals."""
    for change in (keep_layer_norms_apart, keep_gelu_apart):
        model = int8_model(True)
        calls = count_calls(monkeypatch)
        change(model)
        plain = int8_model(False)
        change(plain)
        assert_same_bits(decode(model, 2), decode(plain, 2))
        assert not calls
    model = int8_model(True)
    calls = count_calls(monkeypatch)
    decode(model, 2)
    assert len(calls) == 3
    keep_gelu_apart(model)  # after the structs were made
    decode(model, 2)
    assert len(calls) == 3


def test_load_uses_them_for_eager_int8_only(tiny_folder):
    import gpt2kit

    def stack(**options):
        return gpt2kit.load(tiny_folder, device="cpu", **options).module.transformer.h

    assert type(stack(quantize="int8")) is Int8DecodeBlocks
    assert all(type(b) is Int8DecodeBlock for b in stack(quantize="int8"))
    for plain in (stack(), stack(quantize="int8", compile=True)):
        assert type(plain) is Blocks and all(type(b) is Block for b in plain)
