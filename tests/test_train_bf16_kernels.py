"""kernels/bf16_training.py, fused_loss's softmax_ and kernels/heap.py: the pieces of bfloat16
training on CPU, each against the plain computation, and lean_backward's modules running them
(and only them) under autocast. tests/test_bf16_training.py has the fused head and finetune."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gpt2kit.config import ModelConfig
from gpt2kit.kernels import bf16_training, fused_loss, lean_backward
from gpt2kit.kernels.bf16_training import CausalDropoutAttention, apply_mask, gelu, keep_bits
from gpt2kit.kernels.fused_loss import softmax_
from gpt2kit.kernels.lean_backward import save_less_for_backward
from gpt2kit.model import GPT
from gpt2kit.training import setup

BF16 = torch.bfloat16
CPU = torch.device("cpu")


def bf16_step(x: torch.Tensor) -> torch.Tensor:
    """The distance from x to the next bfloat16 away from zero (x bfloat16, as float64)."""
    bits = x.view(torch.int16).to(torch.int32) + 1
    return (bits.to(torch.int16).view(BF16).double() - x.double()).abs()


def test_gelu_is_gpt2s_tanh_gelu_to_bfloat16s_precision():
    x = torch.arange(-2**14, 2**14, dtype=torch.int32).to(torch.int16).view(BF16)  # every bfloat16 ...
    x = x[x.isfinite() & (x.abs() < 12)]  # ... where GELU is not yet x or 0
    exact = F.gelu(x.double(), approximate="tanh")
    got = gelu(x)
    assert got.dtype == BF16
    # Within a rounding (half a step) and the two forms' largest difference (4.7e-4, below a
    # bfloat16 step wherever |GELU| >= 1/16): in the far negative tail they differ relatively.
    assert ((got.double() - exact).abs() <= bf16_step(got) / 2 + 4.8e-4).all()
    xd = x.double().requires_grad_()
    F.gelu(xd, approximate="tanh").sum().backward()
    x16 = x.clone().requires_grad_()
    gelu(x16).float().sum().backward()
    assert (x16.grad.double() - xd.grad).abs().max() < 2**-7  # the slope, to bfloat16's precision


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_masks_keep_bits_exactly_and_zero_the_rest(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 50, 7, dtype=dtype)
    keep, _ = keep_bits(x.shape, 0.3, CPU)
    want = torch.where(keep == -1, x, torch.zeros((), dtype=dtype))
    assert torch.equal(apply_mask(x, keep), want) and not torch.equal(want, x)
    assert apply_mask(x, keep, inplace=True) is x and torch.equal(x, want)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_keep_bits_drops_its_share_and_follows_the_global_seed(native, p, monkeypatch):
    """Both ways of making masks (native/dropout.c's counter-based words, or torch's own): only
    -1 and 0, the share dropped within 4 standard deviations of p', the same mask for the same
    global seed (a resumed run's RNG state gives the same masks), another for another seed, and
    no pattern between neighbouring elements or words."""
    if native and bf16_training.library("dropout") is None:
        pytest.skip("no native dropout kernel here (no AVX512 or no C compiler)")
    if not native:
        monkeypatch.setattr(bf16_training, "library", lambda name: None)
    shape = torch.Size([3, 1000, 997])  # not whole vectors or words
    torch.manual_seed(5)
    keep, p_drawn = keep_bits(shape, p, CPU)
    assert keep.dtype == torch.int16 and keep.shape == shape and abs(p_drawn - p) <= 2**-16
    assert set(keep.unique().tolist()) <= {0, -1}
    dropped = (keep == 0).double().flatten()
    sd = (p_drawn * (1 - p_drawn) / dropped.numel()) ** 0.5
    assert abs(dropped.mean().item() - p_drawn) <= 4 * sd + 1e-12
    for lag in (1, 4, 32):  # within a word, the next word, the next vector
        both = (dropped[lag:] * dropped[:-lag]).mean().item()
        assert abs(both - dropped.mean().item() ** 2) <= 8 * sd + 1e-12
    torch.manual_seed(5)
    assert torch.equal(keep_bits(shape, p, CPU)[0], keep)
    if 0 < p < 1:
        assert not torch.equal(keep_bits(shape, p, CPU)[0], keep)  # the generator moved on


def test_a_probability_rounded_to_one_drops_everything():
    x = torch.randn(5, 8, dtype=BF16, requires_grad=True)
    out = bf16_training.BitsDropout.apply(x, 1 - 2**-17)
    out.float().sum().backward()
    assert not out.any() and not x.grad.any()


@pytest.mark.parametrize("native", [True, False])
def test_attention_without_dropout_is_causal_sdpa(native, monkeypatch):
    """Both causal softmaxes (native/causal_softmax.c over rows up to the diagonal, or torch's
    over the masked scores), forward and backward, against float32 SDPA."""
    if native and bf16_training.library("causal_softmax") is None:
        pytest.skip("no native causal softmax here (no AVX512-BF16 or no C compiler)")
    if not native:
        monkeypatch.setattr(bf16_training, "_causal_softmax", lambda x: None)
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, 40, 16) for _ in range(3))
    q16, k16, v16 = (t.to(BF16).requires_grad_() for t in (q, k, v))
    out = CausalDropoutAttention.apply(q16, k16, v16, 0.0)
    out.float().square().sum().backward()
    q32, k32, v32 = (t.clone().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(q32, k32, v32, is_causal=True)
    want.square().sum().backward()
    for got, ref in ((out, want), (q16.grad, q32.grad), (k16.grad, k32.grad), (v16.grad, v32.grad)):
        assert got.dtype == BF16
        assert (got.float() - ref).abs().max() <= 0.03 * ref.abs().max()


def test_native_causal_softmax_keeps_the_dropout_and_gradients_of_torchs(monkeypatch):
    """With dropout, the same global seed gives the same masks on both paths, so the outputs and
    gradients agree to bfloat16's rounding."""
    if bf16_training.library("causal_softmax") is None:
        pytest.skip("no native causal softmax here (no AVX512-BF16 or no C compiler)")
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 3, 70, 64, dtype=BF16) for _ in range(3))
    runs = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(bf16_training, "_causal_softmax", lambda x: None)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(9)
        out = CausalDropoutAttention.apply(*leaves, 0.25)
        out.float().square().sum().backward()
        runs.append([out] + [t.grad for t in leaves])
    for got, ref in zip(*runs):
        assert (got.float() - ref.float()).abs().max() <= 0.02 * ref.float().abs().max()


@pytest.mark.parametrize("T", [64, 37])  # rows of whole mask words, and rows starting mid-word
def test_native_softmax_draws_keep_bits_mask_inline(T):
    """The kept probabilities the native softmax writes are exactly the probabilities under the
    mask keep_bits draws for the same seed; the probabilities themselves are those of a call
    without dropout."""
    kernels, dropout = bf16_training.library("causal_softmax"), bf16_training.library("dropout")
    if kernels is None or dropout is None:
        pytest.skip("no native causal softmax here (no AVX512-BF16 or no C compiler)")
    torch.manual_seed(6)
    scores = torch.randn(5 * T, T).to(BF16)
    probs, plain, kept = scores.clone(), scores.clone(), torch.empty_like(scores)
    threshold, p = bf16_training.mask_threshold(0.3)
    kernels.gpt2kit_causal_softmax(probs.data_ptr(), kept.data_ptr(), 5 * T, T, 0.125, 1234, threshold, 1.0, 2)
    kernels.gpt2kit_causal_softmax(plain.data_ptr(), None, 5 * T, T, 0.125, 0, 0, 1.0, 2)
    keep = torch.empty(scores.shape, dtype=torch.int16)
    dropout.gpt2kit_keep_bits(keep.data_ptr(), keep.numel(), 1234, threshold, 2)
    assert torch.equal(probs, plain) and torch.equal(kept, apply_mask(probs, keep))
    scaled, scaled_kept = scores.clone(), torch.empty_like(scores)  # kept times dropout's 1 / (1 - p)
    kernels.gpt2kit_causal_softmax(scaled.data_ptr(), scaled_kept.data_ptr(), 5 * T, T, 0.125, 1234, threshold, 1 / 0.7, 2)
    assert torch.equal(scaled, probs) and torch.equal(scaled_kept != 0, kept != 0)
    # scaled before its one rounding to bfloat16: within two roundings of the rounded probability scaled
    torch.testing.assert_close(scaled_kept.float(), kept.float() / 0.7, rtol=2 ** -7, atol=0)
    causal = torch.ones(T, T, dtype=torch.bool).tril().repeat(5, 1)
    assert 0.25 < 1 - (kept != 0)[causal].float().mean() < 0.35


@pytest.mark.parametrize("native", [True, False])
def test_softmax_in_place_and_its_logsumexp_in_float32(native, monkeypatch):
    """torch's float32 steps (row blocks of 8, the last one short) round exactly as torch's
    softmax does; the native kernel's (one pass a row, its own exp) to within one bfloat16 step,
    and on most elements alike."""
    if native and fused_loss.library("causal_softmax") is None:
        pytest.skip("no native softmax here (no AVX512-BF16 or no C compiler)")
    if not native:
        monkeypatch.setattr(fused_loss, "library", lambda name: None)
    torch.manual_seed(4)
    z = (torch.randn(21, 333) * 4).to(BF16)
    wide = z.float()
    lse = softmax_(z, rows=8)
    assert lse.dtype == torch.float32 and lse.shape == (21, 1)
    assert torch.allclose(lse, torch.logsumexp(wide, 1, keepdim=True), rtol=0, atol=1e-5)
    want = torch.softmax(wide, 1).to(BF16)  # rounded once, from float32
    if not native:
        assert torch.equal(z, want)
    else:
        assert torch.allclose(z.float(), want.float(), rtol=2**-8, atol=0)
        assert (z == want).float().mean() > 0.99


def spy(monkeypatch, owner, name: str, calls: list, label: str) -> None:
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(label) or real(*a, **k))


@pytest.mark.parametrize("n", [4096, 1000, 7])  # whole vectors of 32 mask lanes, and tails
def test_widening_dropout_is_keep_bits_mask_in_float32(n):
    """A branch output's dropout widened to float32: float(x) * scale where keep_bits' mask for
    the same seed keeps, exactly, 0 elsewhere; its gradient the stream's, masked, scaled and
    rounded to bfloat16 once."""
    if not bf16_training.widens(torch.empty(1, dtype=BF16)):
        pytest.skip("no native dropout here (AVX512, a C compiler)")
    torch.manual_seed(7)
    x = torch.randn(n).to(BF16).requires_grad_()
    state = torch.get_rng_state()
    out = bf16_training.WideningDropout.apply(x, 0.3)
    torch.set_rng_state(state)
    keep, p = keep_bits(x.shape, 0.3, CPU)  # the same seed, drawn from the same state
    scale = bf16_training.kept_scale(p)
    kept = keep.bool()
    assert out.dtype == torch.float32 and (n < 1000 or 0.25 < 1 - kept.float().mean() < 0.35)
    assert torch.equal(out, torch.where(kept, x.detach().float() * scale, 0.0))
    grad = torch.randn(n)
    out.backward(grad)
    assert x.grad.dtype == BF16 and torch.equal(x.grad, torch.where(kept, grad * scale, 0.0).to(BF16))


@pytest.mark.parametrize("shape", [(4, 64, 768), (3, 5, 40)])  # whole vectors, and a row's tail
def test_narrowing_layer_norm_is_layer_norm_then_cast(shape):
    """A block's LayerNorm into bfloat16: torch's float32 LayerNorm rounded to bfloat16 (to a
    rounding of its float32 value where the two sit on either side of a boundary), gradients
    those of the float32 LayerNorm for the same bfloat16 output gradient, to float32 rounding."""
    if not bf16_training.narrows(torch.empty(1)):
        pytest.skip("no native LayerNorm here (AVX512, a C compiler)")
    torch.manual_seed(8)
    C = shape[-1]
    ours = [(torch.randn(shape) * 3 + 1), torch.randn(C), torch.randn(C)]
    ours = [t.requires_grad_() for t in ours]
    plain = [t.detach().clone().requires_grad_() for t in ours]
    y = bf16_training.NarrowingLayerNorm.apply(*ours, 1e-5)
    want = F.layer_norm(plain[0], (C,), plain[1], plain[2], 1e-5)
    assert y.dtype == BF16
    torch.testing.assert_close(y.float(), want.to(BF16).float(), rtol=2 ** -7, atol=1e-6)
    assert (y != want.to(BF16)).float().mean() < 1e-3
    grad = torch.randn(shape).to(BF16)
    y.backward(grad)
    want.backward(grad.float())
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("autocast", [True, False])
def test_lean_modules_run_the_bfloat16_kernels_under_autocast_only(monkeypatch, autocast):
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=97, dropout=0.1))
    save_less_for_backward(model)
    calls = []
    spy(monkeypatch, bf16_training.CausalDropoutAttention, "apply", calls, "bf16 attention")
    spy(monkeypatch, bf16_training.BitsDropout, "apply", calls, "bf16 dropout")
    spy(monkeypatch, bf16_training.WideningDropout, "apply", calls, "bf16 dropout")
    spy(monkeypatch, bf16_training.NarrowingLayerNorm, "apply", calls, "bf16 layer norm")
    spy(monkeypatch, bf16_training, "gelu", calls, "bf16 gelu")
    spy(monkeypatch, lean_backward.DropoutAttention, "apply", calls, "attention")
    spy(monkeypatch, lean_backward.MaskDropout, "apply", calls, "dropout")
    x = torch.randint(0, 97, (2, 17))
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        model(x).float().sum().backward()
    kind = "bf16 " if autocast else ""
    # three dropouts: the embeddings', attention's and the MLP's residual branches
    assert sorted(calls) == sorted([f"{kind}attention"] + [f"{kind}dropout"] * 3 + ["bf16 gelu"] * autocast
                                   + ["bf16 layer norm"] * 2 * autocast)  # the block's two
    assert all(p.grad is not None for p in model.parameters())


def test_bfloat16_training_on_cpu_holds_freed_memory_and_float32_does_not(monkeypatch):
    held = []
    monkeypatch.setattr(setup, "freed_memory_held", held.append)
    setup.heap_for_training(SimpleNamespace(device=CPU, autocast_dtype=None))
    setup.heap_for_training(SimpleNamespace(device=CPU, autocast_dtype=BF16))
    setup.heap_for_training(SimpleNamespace(device=torch.device("cuda"), autocast_dtype=BF16))
    assert held == [False, True, False]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_held_memory_is_reused_without_page_faults():
    """In a fresh process (it changes the process's malloc): a 64 MB tensor made and freed five
    times faults its pages in each time, no more once freed memory is held, and again after."""
    script = textwrap.dedent("""
        import resource, torch
        from gpt2kit.kernels.heap import freed_memory_held
        def faults():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(5):
                torch.ones(2**24)  # 64 MB, written
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        plain = faults()
        with freed_memory_held() as held:
            for _ in range(3):  # the heap grows, in one to three rounds (fragmentation varies)
                faults()
            kept = faults()
        print(held, plain, kept, faults())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    held, plain, kept, after = done.stdout.split()
    if held != "True":
        pytest.skip("malloc here is not glibc's")
    assert int(plain) > 5 * 2**24 * 4 // 4096 * 0.9  # every page of every copy
    assert int(kept) < 0.05 * int(plain)
    assert int(after) > 0.3 * int(plain)  # glibc's defaults are back (its trim may keep some)
