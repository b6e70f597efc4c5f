"""The native bfloat16 kernel on AMX tiles (kernels/native/bf16_tiles.c): against a float64 product
of the same bfloat16 operands, for decode-sized and prompt-sized inputs, through PackedLinear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2kit.kernels.packed_linear import PackedLinear, bf16_tiles

needs_tiles = pytest.mark.skipif(bf16_tiles() is None,
                                 reason="no native bfloat16 kernel here (no AMX or AVX512-BF16, or no C compiler)")
SHAPES = [(96, 80), (2304, 768), (37, 130), (5, 64), (50257, 48), (8, 1)]  # partial tiles too


def operands(rows: int, n: int, k: int):
    g = torch.Generator().manual_seed(rows * n + k)
    return [t.bfloat16() for t in (torch.randn(n, k, generator=g), torch.randn(n, generator=g),
                                   torch.randn(rows, k, generator=g))]


def expected(x, w, b, gelu):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    return F.gelu(y, approximate="tanh") if gelu else y


def within_rounding(out: torch.Tensor, want: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> bool:
    """bfloat16 output: half a unit in the last place (2^-9 relative), plus float32 sums' error."""
    sums = (x.double().abs() @ w.double().abs().t()).max()
    return bool(((out.double() - want).abs() <= want.abs() * 2**-8 + 1e-5 * (1 + sums)).all())


@needs_tiles
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 15, 16, 17, 33])  # one or two blocks of 16 rows a pass, then again
def test_tiles_match_a_float64_product(rows, n, k):
    w, b, x = operands(rows, n, k)
    linear = PackedLinear(w, b)
    assert linear.tiles is not None and not linear.packed
    for bias, gelu in ((None, False), (b, False), (b, True)):
        linear = PackedLinear(w, bias, gelu=gelu)
        with torch.no_grad():
            out = linear(x)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
        assert within_rounding(out, expected(x, w, bias, gelu), x, w)


@needs_tiles
def test_leading_dimensions_and_strided_inputs():
    w, b, x = operands(24, 40, 72)
    linear = PackedLinear(w, b, gelu=True)
    batched = x.view(2, 3, 4, 72)
    strided = torch.cat([x, x], dim=1)[:, :72]  # rows 144 elements apart
    with torch.no_grad():
        assert torch.equal(linear(batched), linear(x).view(2, 3, 4, 40))
        assert torch.equal(linear(strided), linear(x))


@needs_tiles
def test_tiles_agree_with_oneDNN(monkeypatch):
    """The oneDNN path (packed, where the native kernel cannot run) and the tiles differ only in the
    order of float32 sums: within a unit in bfloat16's last place."""
    from gpt2kit.kernels import packed_linear

    w, b, x = operands(9, 768, 768)
    tiled = PackedLinear(w, b, gelu=True)
    monkeypatch.setattr(packed_linear, "bf16_tiles", lambda: None)
    packed = PackedLinear(w, b, gelu=True)
    assert packed.packed and packed.tiles is None
    with torch.no_grad():
        a, c = tiled(x).double(), packed(x).double()
    assert ((a - c).abs() <= c.abs() * 2**-7 + 1e-3).all()
