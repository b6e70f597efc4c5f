"""A decode step from token ids through the stack in one native call (kernels/native_decode.py),
float32 and int8 x int8: the same logits and cache, bit for bit, as the plain model's forward, for
1 up to the rows the kernels take, with and without left padding; the model's forward (EagerDecoder)
wherever the call does not fit (more rows, a hook on a module it skips, replaced modules, training,
a token outside the vocabulary); and the API's choice of decoder."""

from __future__ import annotations

import pytest
import torch
from test_decode_blocks import KINDS, model_of

from gpt2kit.inference.running_batch import EagerDecoder
from gpt2kit.kernels import native_decode
from gpt2kit.kernels.argmax import fast_argmax
from gpt2kit.kernels.compiled_decode import CompiledDecoder
from gpt2kit.kernels.native_decode import NativeDecoder
from gpt2kit.kernels.norm_in_product import keep_layer_norms_apart
from gpt2kit.model import Positions
from gpt2kit.quantize import int8_products_available


def decode(decoder, rows: int, padded: bool, steps: int = 4, cache=None) -> tuple[list[torch.Tensor], object]:
    """Each step's logits after a 6-token prefill, greedy, and the cache."""
    g = torch.Generator().manual_seed(rows)
    prompt = torch.randint(0, 64, (rows, 6), generator=g)
    pads = [r % 3 if padded else 0 for r in range(rows)]
    cache = cache or decoder.new_cache(rows, 16)
    out = []
    with torch.inference_mode():
        logits = decoder.model(prompt, cache, Positions.at(0, 6, torch.tensor(pads) if padded else None))[:, -1]
        for start in range(6, 6 + steps):
            logits = decoder(cache, logits.argmax(-1).tolist(), start, pads)
            out.append(logits)
    return out, cache


def count_steps(kind, monkeypatch) -> list:
    """The rows of each native step call native_decode makes from now on."""
    calls, real = [], native_decode.library(kind.library)

    class Counting:
        def __getattr__(self, name):
            function = getattr(real, name)
            return (lambda *args: calls.append(args[-2]) or function(*args)) if name == kind.step else function

    monkeypatch.setattr(native_decode, "library", lambda name: Counting())
    return calls


def assert_same_bits(a: tuple, b: tuple) -> None:
    (logits_a, cache_a), (logits_b, cache_b) = a, b
    assert len(logits_a) == len(logits_b) and all(torch.equal(x, y) for x, y in zip(logits_a, logits_b))
    assert all(torch.equal(x, y) for x, y in zip(cache_a.tensors(), cache_b.tensors()))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("padded", [False, True])
def test_native_step_keeps_the_bits(kind, padded, monkeypatch):
    plain, native = EagerDecoder(model_of(kind, False)), NativeDecoder(model_of(kind, True))
    calls = count_steps(kind, monkeypatch)
    for rows in range(1, kind.max_rows + 1):
        assert_same_bits(decode(native, rows, padded), decode(plain, rows, padded))
    assert calls == [rows for rows in range(1, kind.max_rows + 1) for _ in range(4)]


@pytest.mark.parametrize("kind", KINDS)
def test_one_decoder_over_caches_in_turn(kind, monkeypatch):
    """The cache's pointers are kept between steps: a step over another cache must not use them."""
    plain, native = EagerDecoder(model_of(kind, False)), NativeDecoder(model_of(kind, True))
    calls = count_steps(kind, monkeypatch)
    first, second = decode(native, 1, False, steps=2), decode(native, 2, True, steps=2)
    again = decode(native, 1, False, steps=2, cache=native.new_cache(1, 16))
    assert_same_bits(first, decode(plain, 1, False, steps=2))
    assert_same_bits(second, decode(plain, 2, True, steps=2))
    assert_same_bits(again, first)
    assert len(calls) == 6


@pytest.mark.parametrize("kind", KINDS)
def test_what_does_not_fit_runs_the_models_forward(kind, monkeypatch):
    plain, native = EagerDecoder(model_of(kind, False)), NativeDecoder(model_of(kind, True))
    calls = count_steps(kind, monkeypatch)
    rows = kind.max_rows + 1
    assert_same_bits(decode(native, rows, True), decode(plain, rows, True))  # more rows than the kernels take

    seen = []
    hook = native.model.transformer.wte.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert_same_bits(decode(native, 1, False), decode(plain, 1, False))
    assert len(seen) == 5  # the prefill's and each step's: the hook is not skipped
    hook.remove()

    native.model.train(), plain.model.train()
    assert_same_bits(decode(native, 1, False), decode(plain, 1, False))
    native.model.eval(), plain.model.eval()
    native.model.transformer.drop = torch.nn.Dropout(0.5).train()  # only the embeddings' dropout on
    torch.manual_seed(0)
    dropped, _ = decode(native, 1, False)
    assert not torch.equal(dropped[0], decode(plain, 1, False)[0][0])
    native.model.transformer.drop = torch.nn.Identity()
    assert calls == []

    with pytest.raises(IndexError):  # a token outside the vocabulary: the embedding's own error
        native(native.new_cache(1, 16), [64], 0, [0])
    assert calls == []

    keep_layer_norms_apart(native.model)  # as LoRA adapters do: the blocks' modules no longer fit
    logits, _ = decode(native, 1, False)
    expected, _ = decode(plain, 1, False)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)  # torch's LayerNorm now
    assert calls == []


def test_load_picks_the_native_decoder_for_eager_float32_and_int8(tiny_folder):
    import gpt2kit

    def decoder(**options):
        return gpt2kit.load(tiny_folder, device="cpu", **options).decoder

    if native_decode.library("f32_rows") is None:
        pytest.skip("no native float32 kernel (AVX512, a C compiler)")
    eager = [decoder()] + ([decoder(quantize="int8")] if int8_products_available() else [])
    assert all(type(d) is NativeDecoder and d.argmax is fast_argmax for d in eager)
    assert type(decoder(compile=True)) is CompiledDecoder
    assert type(decoder(dtype="bfloat16")) is EagerDecoder


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_generation_is_the_same_as_the_models_forwards(tiny_folder, quantize):
    import gpt2kit

    if quantize and not int8_products_available():
        pytest.skip("no int8 x int8 products here")
    model = gpt2kit.load(tiny_folder, device="cpu", quantize=quantize)
    options = dict(max_new_tokens=12, temperature=0, stop_at_eos=False)
    native = model.complete(["Hello there", "A longer prompt than the first one"], **options)
    model.decoder = EagerDecoder(model.module, fast_argmax)
    assert model.complete(["Hello there", "A longer prompt than the first one"], **options) == native
