"""Attention of one query per row (kernels/one_query_attention.py): the native kernel
(native/attention.c) against SDPA, on cache-shaped inputs with padding masks; the plain core for
everything else."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import gpt2kit
from gpt2kit.config import ModelConfig
from gpt2kit.inference.kv_cache import KVCache
from gpt2kit.kernels import one_query_attention
from gpt2kit.kernels.int8 import int8_products_available
from gpt2kit.kernels.native import library
from gpt2kit.kernels.norm_in_product import fuse_layer_norms
from gpt2kit.kernels.one_query_attention import (
    CachedDecodeAttention,
    OneQueryAttention,
    native_fits,
    use_one_query_attention,
)
from gpt2kit.model import GPT, Positions
from gpt2kit.quantize import quantize_int8

needs_native = pytest.mark.skipif(library("attention") is None, reason="no native attention kernel here (no AVX512 or no C compiler)")


def decode_inputs(B: int, H: int, S: int, D: int, slots: int = 300, seed: int = 0):
    """q as the model makes it (a view of c_attn's output), keys and values as views of a larger
    cache, and a (B, 1, 1, S) mask hiding each row's left padding."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, 3 * H * D, generator=g)[..., :H * D].view(B, 1, H, D).transpose(1, 2)
    k, v = (torch.randn(B, H, slots, D, generator=g)[:, :, :S] for _ in range(2))
    pad = torch.arange(B) * 3 % max(S - 1, 1)
    mask = (torch.arange(S)[None, :] >= pad[:, None])[:, None, None]
    return q, k, v, mask


@needs_native
@pytest.mark.parametrize("B, H, S, D", [(1, 12, 80, 64), (3, 4, 1, 64), (2, 3, 17, 20), (4, 2, 300, 80), (1, 25, 33, 64)])
def test_native_matches_sdpa(B, H, S, D, monkeypatch):
    q, k, v, mask = decode_inputs(B, H, S, D)
    calls = []
    monkeypatch.setattr(one_query_attention, "_native", lambda *a, _f=one_query_attention._native: calls.append(1) or _f(*a))
    core = OneQueryAttention().eval()
    got = core(q, k, v, mask)
    assert calls and got.shape == (B, H, 1, D)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-5, atol=1e-5)
    assert got.transpose(1, 2).is_contiguous()  # the model's re-assembly of heads copies nothing


@needs_native
def test_one_mask_row_for_every_batch_row():
    q, k, v, _ = decode_inputs(3, 4, 40, 64)
    mask = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    mask[..., :5] = False
    torch.testing.assert_close(OneQueryAttention().eval()(q, k, v, mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-5, atol=1e-5)


def test_everything_else_takes_the_plain_core(monkeypatch):
    monkeypatch.setattr(one_query_attention, "_native", lambda *a: pytest.fail("the native kernel ran"))
    q, k, v, mask = decode_inputs(2, 2, 9, 16)
    core = OneQueryAttention().eval()
    core(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)  # not float32
    assert not native_fits(q, k.transpose(2, 3), v)
    core.train()(q, k, v, mask)  # training
    prompt = torch.randn(2, 2, 9, 16)
    core.eval()(prompt, prompt, prompt, None)  # a prompt, causal


def test_loaded_cpu_models_use_it(tiny_folder):
    model = gpt2kit.load(tiny_folder, device="cpu")
    assert all(isinstance(b.attn, CachedDecodeAttention) and isinstance(b.attn.core, OneQueryAttention)
               for b in model.module.transformer.h)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.module.modules())  # identities at inference


@needs_native
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_decode_attention_matches_the_plain_block(padded, dtype, monkeypatch):
    """A decode step through CachedDecodeAttention (cache write + attention in one native call)
    gives the plain model's logits and leaves the same cache, rows padded or not; a bfloat16 cache
    to bfloat16's precision (the native kernel sums in float32)."""
    torch.manual_seed(0)
    plain = GPT(ModelConfig(vocab_size=64, n_positions=32, n_embd=48, n_layer=2, n_head=3)).eval().to(dtype)
    fused = copy.deepcopy(plain)
    use_one_query_attention(fused)
    assert all(type(b.attn) is CachedDecodeAttention for b in fused.transformer.h)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    calls = []
    kernels = library("attention")
    monkeypatch.setattr(one_query_attention, "library", lambda name: calls.append(name) or kernels)
    pad = torch.tensor([0, 3]) if padded else None
    idx = torch.randint(0, 64, (2, 9))
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    caches = [KVCache.for_model(m, 2, 16) for m in (plain, fused)]
    with torch.inference_mode():
        for m, cache in zip((plain, fused), caches):
            m(idx[:, :6], cache, Positions.at(0, 6, pad))
        for t in range(6, 9):
            want, got = (m(idx[:, t:t + 1], cache, Positions.at(t, 1, pad)) for m, cache in zip((plain, fused), caches))
            torch.testing.assert_close(got, want, **tolerance)
    assert calls  # the native kernel ran
    for a, b in zip(caches[0].tensors(), caches[1].tensors()):
        torch.testing.assert_close(a[:, :, :9], b[:, :, :9], **tolerance)


@needs_native
@pytest.mark.skipif(not int8_products_available(), reason="no VNNI/AMX int8 products on this CPU")
def test_int8_attention_block_in_one_call_keeps_the_bits(monkeypatch):
    """With native int8 x int8 linears, c_attn, the cache write, the attention and c_proj run in one
    native call (int8.int8_attention_block): the same logits and cache, bit for bit, as the three
    calls, with left padding."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, n_positions=32, n_embd=48, n_layer=2, n_head=3)).eval()
    quantize_int8(model)
    use_one_query_attention(model)
    fuse_layer_norms(model)
    pad, idx = torch.tensor([0, 2]), torch.randint(0, 64, (2, 9))
    calls = []
    monkeypatch.setattr(one_query_attention, "int8_attention_block",
                        lambda *a, _f=one_query_attention.int8_attention_block: calls.append(1) or _f(*a))
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(one_query_attention, "fuses_attention", lambda *a, _on=fused: _on)
        cache = KVCache.for_model(model, 2, 16)
        with torch.inference_mode():
            model(idx[:, :6], cache, Positions.at(0, 6, pad))
            logits = [model(idx[:, t:t + 1], cache, Positions.at(t, 1, pad)) for t in range(6, 9)]
        runs.append((logits, cache))
    assert len(calls) == 3 * 2  # three steps of two layers, fused
    (fused_logits, fused_cache), (plain_logits, plain_cache) = runs
    assert all(torch.equal(a, b) for a, b in zip(fused_logits, plain_logits))
    assert all(torch.equal(a, b) for a, b in zip(fused_cache.tensors(), plain_cache.tensors()))
