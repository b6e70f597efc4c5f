"""int8 x int8 products (issue 15): activations quantized per token, oneDNN's int8 GEMM, against
exact integer sums and the float product; a row's result independent of its batch; the path
taken; the weight-only fallback where the CPU lacks VNNI/AMX."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import gpt2kit
import gpt2kit.quantize
from gpt2kit.config import ModelConfig
from gpt2kit.kernels import int8, native
from gpt2kit.kernels.int8 import (
    NATIVE_MAX_ROWS,
    Int8Linear,
    Int8MLP,
    Int8Products,
    PackedInt8,
    int8_products_available,
    native_rows,
    quantize_rows,
    quantize_tokens,
    tiles_available,
)
from gpt2kit.model import MLP

needs_int8_products = pytest.mark.skipif(not int8_products_available(), reason="no VNNI/AMX int8 products on this CPU")


def weights(n: int = 96, k: int = 80, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize_rows(torch.randn(n, k, generator=g))
    return q, scale, torch.randn(n, generator=g)


def int8_linear(q, scale, bias) -> Int8Linear:
    return Int8Linear(q, scale, bias, Int8Products(int8_activations=True))


@needs_int8_products
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_product_is_the_exact_integer_sum_scaled(rows):
    """Each row quantized with its own scale, the int32 sums exact: within float32 rounding of
    (x_q . w_q) * w_scale * x_scale + bias computed in float64."""
    q, scale, bias = weights()
    x = torch.randn(rows, 80, generator=torch.Generator().manual_seed(rows)) * 3
    linear = int8_linear(q, scale, bias)
    got = linear(x)
    assert linear.products.last == ("int8 x int8: native rows" if native_rows(x) else "int8 x int8: oneDNN")
    qx, s = quantize_tokens(x)
    assert qx.abs().amax(1).eq(127).all() and qx.eq(torch.round(qx)).all()  # whole, spanning int8
    sums = qx.long() @ q.long().T  # exact
    expected = sums.double() * scale.double() * s.double() + bias.double()
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-6)


@needs_int8_products
def test_product_is_close_to_the_float_product():
    """The activations' rounding error is at most half a step (scale / 2) per element, so each
    output is within scale/2 * sum |w| of the weight-only product x @ w_dequantized.T."""
    q, scale, bias = weights()
    x = torch.randn(7, 80, generator=torch.Generator().manual_seed(1))
    w = q.float() * scale[:, None]
    reference = F.linear(x, w, bias)
    bound = quantize_tokens(x)[1] / 2 * w.abs().sum(1) + 1e-5  # (7, 96)
    error = (int8_linear(q, scale, bias)(x) - reference).abs()
    assert (error <= bound).all()
    assert error.max() > 1e-4  # the activations really were quantized (not a float product)


@needs_int8_products
def test_a_rows_result_does_not_depend_on_its_batch():
    q, scale, bias = weights()
    x = torch.randn(600, 80, generator=torch.Generator().manual_seed(2))
    x[3] *= 100  # an outlier row changes no other row's scale
    linear = int8_linear(q, scale, bias)
    alone = torch.cat([linear(row) for row in x[:8].split(1)])
    for rows in (2, 3, 8, 17, 600):  # native rows kernel, decode-sized, prefill-sized
        assert torch.equal(linear(x[:rows])[:8], alone[:rows])


needs_native = pytest.mark.skipif(native.library("int8_rows") is None, reason="no native int8 kernel here (no AVX512-VNNI or no C compiler)")


@needs_native
@pytest.mark.parametrize("n, k", [(96, 80), (2304, 768), (37, 130), (5, 64), (50257, 48)])
@pytest.mark.parametrize("rows", range(1, NATIVE_MAX_ROWS + 1))
def test_native_rows_equal_onednn_bit_for_bit(rows, n, k):
    """The native row kernel (kernels/native/int8_rows.c) against oneDNN's GEMM on the same
    quantized rows: equal bits, with and without a bias, the GELU and a LayerNorm, for sizes that are not whole blocks
    (rows of 16 or 8, columns of 64)."""
    g = torch.Generator().manual_seed(rows * n + k)
    q, scale = quantize_rows(torch.randn(n, k, generator=g))
    packed, x = PackedInt8.of(q, scale), torch.randn(rows, k, generator=g) * 5
    qx, s = quantize_tokens(x)
    onednn = int8._onednn_product(qx.to(torch.int8), packed, torch.float32)
    for bias in (None, torch.randn(n, generator=g)):
        assert native_rows(x)
        expected = onednn * s if bias is None else torch.addcmul(bias, onednn, s)
        assert torch.equal(int8._int8_int8(x, packed, bias, False), expected)
        # with c_fc's GELU: the oneDNN path applies the native kernel's own GELU, so still equal
        with_gelu = int8._int8_int8(x, packed, bias, True)
        assert torch.equal(with_gelu, int8._onednn_int8(x, packed, bias, True))
        torch.testing.assert_close(with_gelu, F.gelu(expected, approximate="tanh"), rtol=1e-5, atol=2e-6)
        # with a LayerNorm moved in (norm_in_product.py): both paths normalize in the same native code
        norm = torch.nn.LayerNorm(k)
        torch.nn.init.normal_(norm.weight, generator=g), torch.nn.init.normal_(norm.bias, generator=g)
        normed = int8._int8_int8(x, packed, bias, True, norm)
        assert torch.equal(normed, int8._onednn_int8(x, packed, bias, True, norm))
        torch_normed = int8._int8_int8(norm(x).detach(), packed, bias, True)  # may differ by a rounding of an int8 step
        assert (normed - torch_normed).abs().mean() <= 1e-3 * torch_normed.abs().mean()


@pytest.mark.skipif(not (int8_products_available() and tiles_available()), reason="no AMX tiles (or no native kernels) here")
@pytest.mark.parametrize("n, k", [(96, 80), (2304, 768), (37, 130), (5, 64), (50257, 48)])
@pytest.mark.parametrize("rows", [NATIVE_MAX_ROWS + 1, 8, 16, 17, 40])
def test_amx_tiles_equal_onednn_bit_for_bit(rows, n, k):
    """The native AMX tile kernel (many rows: batches, prompts) against oneDNN's GEMM on the same
    rows: equal bits with a bias, the GELU and a LayerNorm, for sizes that are not whole tiles
    (16 columns, 64 of K, 16 rows)."""
    g = torch.Generator().manual_seed(rows * n + k)
    q, scale = quantize_rows(torch.randn(n, k, generator=g))
    tiled, onednn = PackedInt8.of(q, scale, tiles=True), PackedInt8.of(q, scale)
    assert tiled.weight is None and tiled.tiles is not None  # the tiles replace oneDNN's copy
    x, bias = torch.randn(rows, k, generator=g) * 5, torch.randn(n, generator=g)
    norm = torch.nn.LayerNorm(k)
    torch.nn.init.normal_(norm.weight, generator=g), torch.nn.init.normal_(norm.bias, generator=g)
    for b, gelu, ln in ((None, False, None), (bias, False, None), (bias, True, norm)):
        assert torch.equal(int8._int8_int8(x, tiled, b, gelu, ln), int8._onednn_int8(x, onednn, b, gelu, ln))
    products = Int8Products(int8_activations=True, tiles=True)
    linear = Int8Linear(q, scale, bias, products)
    linear(x[None])
    assert products.last == "int8 x int8: AMX tiles" and "AMX tiles above" in repr(linear)


@needs_native
@needs_int8_products
@pytest.mark.parametrize("norm", [False, True])
def test_int8_mlp_in_one_call_equals_its_two_products(norm, monkeypatch):
    """Int8MLP's one native call for a decode step's rows: the same bits as the plain MLP forward
    over the same Int8Linears (c_fc with its GELU and, moved in, its LayerNorm)."""
    g = torch.Generator().manual_seed(7)
    products = Int8Products(int8_activations=True)
    plain = MLP(ModelConfig(n_embd=48, n_head=4)).eval()
    plain.c_fc = Int8Linear(*quantize_rows(torch.randn(192, 48, generator=g)), torch.randn(192, generator=g), products,
                            gelu=True)
    plain.c_proj = Int8Linear(*quantize_rows(torch.randn(48, 192, generator=g)), torch.randn(48, generator=g), products)
    plain.act = torch.nn.Identity()  # in c_fc
    if norm:
        plain.c_fc.norm = torch.nn.LayerNorm(48)
        torch.nn.init.normal_(plain.c_fc.norm.weight, generator=g), torch.nn.init.normal_(plain.c_fc.norm.bias, generator=g)
    fused = Int8MLP(plain).eval()
    calls = []
    monkeypatch.setattr(int8, "_native_mlp", lambda *a, _f=int8._native_mlp: calls.append(a[0].shape) or _f(*a))
    with torch.no_grad():
        for rows in range(1, NATIVE_MAX_ROWS + 2):
            x = torch.randn(1, rows, 48, generator=g)
            assert torch.equal(fused(x), plain(x))
    assert calls == [(1, rows, 48) for rows in range(1, NATIVE_MAX_ROWS + 1)]  # more rows: the plain forward


def test_native_kernels_are_built_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2KIT_KERNEL_CACHE", str(tmp_path))
    build = functools.partial(native._built, "int8_rows", native.LIBRARIES["int8_rows"])
    if native.library("int8_rows") is None:
        pytest.skip("no native int8 kernel here (no AVX512-VNNI or no C compiler)")
    first = build()
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert build() == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporaries left


def test_without_a_compiler_int8_keeps_onednn(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2KIT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.setattr(native, "cpu_has", lambda probe: True)
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(native.platform, "system", lambda: "Linux")
    said = []  # the module's own logger: caplog misses it once the CLI has set gpt2kit's handlers
    monkeypatch.setattr(native.log, "info", lambda message, *args: said.append(message % args))
    assert native.library.__wrapped__("int8_rows") is None
    assert any("no C compiler found" in line for line in said) and not list(tmp_path.iterdir())


@needs_int8_products
def test_bfloat16_activations():
    """Quantized from bfloat16 activations (scales in float32: none past int8's range) and
    returned in bfloat16: float32's result to bfloat16's precision (a few roundings of 2^-8 of the
    largest values: the product before its row scale and bias, the scale, the sum)."""
    q, scale, bias = weights()
    x = torch.randn(64, 80, generator=torch.Generator().manual_seed(3))
    y = int8_linear(q, scale.bfloat16(), bias.bfloat16())(x.bfloat16())
    assert y.dtype == torch.bfloat16
    expected = int8_linear(q, scale, bias)(x)
    assert (y.float() - expected).abs().max() < 0.015 * expected.abs().max()  # measured 0.009


@needs_int8_products
@pytest.mark.parametrize("rows", [3, 20])
def test_the_traced_product_has_the_eager_numerics(rows):
    """What a compiled decode step runs (Int8Products.traced), here run eagerly: the same
    quantized activations and the same oneDNN GEMM, through the custom op; under torch.compile
    too (Inductor's fused quantization may round the last bit differently)."""
    q, scale, bias = weights()
    x = torch.randn(rows, 80, generator=torch.Generator().manual_seed(4))
    linear = int8_linear(q, scale, bias)
    assert torch.equal(linear.products.traced(x, q, scale, bias, linear.packed), linear(x))
    compiled = torch.compile(linear, fullgraph=True)
    assert torch.allclose(compiled(x), linear(x), rtol=1e-5, atol=1e-5)


@needs_int8_products
def test_loaded_model_multiplies_int8_by_int8(tiny_folder, tiny_model):
    model = gpt2kit.load(tiny_folder, device="cpu", quantize="int8")
    products = model.module.lm_head.products
    assert products.int8_activations and "int8 x int8" in str(model.module)  # print(model) says so
    prompts = ["Hello there", "A longer prompt than the other one", "Hi"]
    together = model.complete(prompts, max_new_tokens=6, temperature=0, stop_at_eos=False)
    assert products.last.startswith("int8 x int8")
    alone = [model.complete(p, max_new_tokens=6, temperature=0, stop_at_eos=False)[0] for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    ids = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(0))
    expected = tiny_model.logits(ids)
    assert (model.logits(ids) - expected).abs().max() < 0.1 * expected.std()  # measured 0.053


def test_without_vnni_the_products_stay_weight_only(tiny_folder, monkeypatch):
    monkeypatch.setattr(gpt2kit.quantize, "int8_products_available", lambda device_type="cpu": False)
    model = gpt2kit.load(tiny_folder, device="cpu", quantize="int8")
    linear = model.module.transformer.h[0].mlp.c_fc
    assert not linear.products.int8_activations and linear.packed is None
    assert "weight-only" in str(model.module)
    model.complete("Hello", max_new_tokens=2, temperature=0)
    assert linear.products.last in ("fused", "dequantized")


def test_the_cpu_feature_check(monkeypatch):
    check = int8_products_available.__wrapped__  # past the per-process cache
    assert not check("cuda")
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not check("cpu")


@needs_int8_products
def test_a_failing_onednn_int8_kernel_means_weight_only(monkeypatch):
    check = int8_products_available.__wrapped__
    assert check("cpu")

    def broken(weight, scale):
        raise RuntimeError("could not create a primitive descriptor")
    monkeypatch.setattr(int8.PackedInt8, "of", broken)
    assert not check("cpu")
