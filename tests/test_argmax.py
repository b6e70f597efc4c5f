"""The native greedy choice (kernels/argmax.py) against torch's max(dim) indices: ties, infinities,
NaN, short and odd-length rows, rows of a strided view; and as the loaded model's decoder's
`argmax`, the same text greedy and sampled."""

from __future__ import annotations

import pytest
import torch

from gpt2kit.inference.running_batch import EagerDecoder
from gpt2kit.inference.sampling import greedy
from gpt2kit.kernels.argmax import argmax_rows, fast_argmax
from gpt2kit.kernels.native import library

pytestmark = pytest.mark.skipif(library("argmax") is None, reason="no native kernels here (no AVX512 or no C compiler)")


def rows(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(6, n, generator=g)
    x[1] = torch.randint(0, 3, (n,), generator=g).float()  # many ties at the top
    x[2] = float("-inf")
    x[3, n // 2:] = float("-inf")
    x[4, n // 3] = float("nan")
    x[4, n - 1] = float("nan")
    x[5] = torch.randn(n, generator=g).abs().neg()
    x[5, -1] = -0.0
    x[5, 0] = 0.0  # -0.0 and 0.0 tie: the first
    return x


@pytest.mark.parametrize("n", [1, 5, 16, 17, 100, 50257])
def test_same_index_as_torch(n):
    x = rows(n)
    assert torch.equal(argmax_rows(x), x.max(dim=-1).indices)
    view = torch.cat([x] * 4, dim=1)[:, 3:3 + n]  # rows 4n apart, not aligned
    assert torch.equal(argmax_rows(view), view.max(dim=-1).indices)
    assert torch.equal(fast_argmax(x), x.max(dim=-1).indices)


def test_other_inputs_are_left_to_torch():
    assert argmax_rows(torch.randn(2, 8, dtype=torch.float64)) is None
    assert argmax_rows(torch.randn(8)) is None  # not (B, V)
    assert argmax_rows(torch.randn(8, 2).t()) is None  # V not contiguous
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert torch.equal(fast_argmax(x), x.max(dim=-1).indices)


def test_the_loaded_decoder_uses_it_to_the_same_text(tiny_folder):
    import gpt2kit

    model = gpt2kit.load(tiny_folder, device="cpu")
    assert model.decoder.argmax is fast_argmax and EagerDecoder(model.module).argmax is greedy
    prompts = ["Hello there", "The cat sat on"]
    runs = []
    for argmax in (fast_argmax, greedy):
        model.decoder = EagerDecoder(model.module, argmax)
        runs.append((model.generate(prompts, max_new_tokens=12, temperature=0, stop_at_eos=False),
                     model.generate(prompts, max_new_tokens=12, seed=5, temperature=1.0, top_k=50)))
    assert runs[0] == runs[1]
