"""The native few-rows float32 kernel (kernels/native/f32_rows.c): against a float64 product, and
in PackedLinear for decode-sized inputs only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2kit.kernels.packed_linear import NATIVE_MAX_ROWS, PackedLinear, f32_rows

needs_native = pytest.mark.skipif(f32_rows() is None, reason="no native float32 kernel here (no AVX512 or no C compiler)")
SHAPES = [(96, 80), (2304, 768), (37, 130), (5, 64), (50257, 48), (8, 1)]  # not whole blocks too


def operands(rows: int, n: int, k: int):
    g = torch.Generator().manual_seed(rows * n + k)
    return torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(rows, k, generator=g)


@needs_native
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, NATIVE_MAX_ROWS])  # 1-3 rows per pass, then again
def test_rows_match_a_float64_product(rows, n, k):
    w, b, x = operands(rows, n, k)
    g = torch.Generator().manual_seed(k)
    ln_w, ln_b = torch.randn(k, generator=g), torch.randn(k, generator=g)
    for bias, gelu, norm in ((None, False, False), (b, False, False), (b, True, False), (b, True, True)):
        out = torch.empty(rows, n)
        norm_args = (ln_w.data_ptr(), ln_b.data_ptr(), 1e-5) if norm else (None, None, 0.0)
        assert f32_rows()(x.data_ptr(), *norm_args, w.data_ptr(), None if bias is None else bias.data_ptr(),
                          out.data_ptr(), rows, n, k, gelu, torch.get_num_threads()) == 0
        x64 = F.layer_norm(x.double(), (k,), ln_w.double(), ln_b.double(), 1e-5) if norm else x.double()
        expected = F.linear(x64, w.double(), None if bias is None else bias.double())
        if gelu:
            expected = F.gelu(expected, approximate="tanh")
        assert (out.double() - expected).abs().max() <= 1e-6 * (1 + expected.abs().max())  # float32 sums


@needs_native
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("norm", [False, True])
def test_packed_linear_takes_the_native_kernel_for_few_rows_only(gelu, norm, monkeypatch):
    """Up to NATIVE_MAX_ROWS rows in the native kernel, more in oneDNN: the same results, with the
    GELU and with a LayerNorm moved in (norm_in_product.py) or not."""
    w, b, x = operands(NATIVE_MAX_ROWS + 1, 64, 48)
    linear = PackedLinear(w, b, gelu=gelu)
    assert not linear.packed and linear.takes_norm  # the native kernel reads the plain matrix
    expected = x
    if norm:
        linear.norm = torch.nn.LayerNorm(48)
        torch.nn.init.normal_(linear.norm.weight), torch.nn.init.normal_(linear.norm.bias)
        expected = linear.norm(x)
    calls, kernel = [], linear.rows
    monkeypatch.setattr(linear, "rows", lambda *args: calls.append(args[7]) or kernel(*args))
    expected = F.linear(expected, w, b)
    if gelu:
        expected = F.gelu(expected, approximate="tanh")
    with torch.no_grad():
        for rows in (1, NATIVE_MAX_ROWS, NATIVE_MAX_ROWS + 1):
            got = linear(x[:rows].unsqueeze(0))
            assert got.shape == (1, rows, 64)
            torch.testing.assert_close(got[0], expected[:rows], rtol=1e-5, atol=1e-5)
    assert calls == [1, NATIVE_MAX_ROWS]  # the native kernel ran for those, oneDNN for the last


def test_without_the_native_kernel_float32_is_packed(monkeypatch):
    from gpt2kit.kernels import packed_linear
    monkeypatch.setattr(packed_linear, "f32_rows", lambda: None)
    w, b, x = operands(2, 64, 48)
    linear = PackedLinear(w, b)
    assert linear.packed and linear.rows is None
    torch.testing.assert_close(linear(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
