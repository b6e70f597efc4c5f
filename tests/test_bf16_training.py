"""Training under bfloat16 autocast on CPU: what `--dtype auto` picks, the fused head + loss in
bfloat16 against autocast's plain loss and the exact one, the dropout masks of random bits,
bfloat16 attention with dropout against the same computation written out in float32, and finetune
end to end (the summary says why it chose bfloat16). These run on any CPU: without native bfloat16
the products are emulated. kernels/bf16_training.py's pieces: tests/test_train_bf16_kernels.py."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from gpt2kit import runtime
from gpt2kit.config import ModelConfig
from gpt2kit.data.prepare import DataConfig
from gpt2kit.kernels import fused_loss
from gpt2kit.kernels.bf16_training import BitsDropout, CausalDropoutAttention, keep_bits
from gpt2kit.kernels.fused_loss import HeadCrossEntropy
from gpt2kit.model import GPT
from gpt2kit.training.loop import finetune
from gpt2kit.training.objective import NextTokenLoss

BF16 = torch.bfloat16
CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_trains_in_bfloat16_exactly_where_the_cpu_multiplies_it(monkeypatch, native):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: native)
    assert runtime.precision("auto", CPU) == ((BF16, False) if native else (None, False))
    assert runtime.precision("float32", CPU) == (None, False)  # forcing float32 always works
    assert runtime.precision("bfloat16", CPU) == (BF16, False)


def test_cpu_feature_probe_agrees_with_cpuinfo():
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo here")
    assert runtime.cpu_has_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(flags))


def test_fused_bfloat16_head_and_loss_match_autocasts_plain_loss():
    torch.manual_seed(0)
    N, C, V = 1500, 48, 3001  # two chunks, the second short
    h = torch.randn(N, C, requires_grad=True)
    w = (torch.randn(V, C) * 0.2).requires_grad_()
    y = torch.randint(0, V, (N,))
    with torch.autocast("cpu", dtype=BF16):
        plain = F.cross_entropy(F.linear(h, w).float(), y)
    plain.backward()
    expected = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=BF16):
        fused = HeadCrossEntropy.apply(h, w, y, BF16)
    fused.backward()
    assert fused.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
    exact = [h.detach().double().requires_grad_(), w.detach().double().requires_grad_()]
    F.cross_entropy(exact[0] @ exact[1].t(), y).backward()
    for got, want, best in zip((h.grad, w.grad), expected, (t.grad for t in exact)):
        # Both are bfloat16 GEMM results (8 significant bits) of bfloat16-rounded gradients of
        # the logits, rounded in different places (the fused head scales by 1 / N after its
        # products): each is as far from the exact gradient as the other, not equal to it.
        error, plain_error = ((t.double() - best).norm() / best.norm() for t in (got, want))
        assert error < 2**-7 and error < 1.25 * plain_error
        assert torch.allclose(got, want, rtol=2**-5, atol=2e-3 * want.abs().max())


@pytest.mark.parametrize("shape", [(97, 32), (1000, 33)])  # whole 16-lane vectors, and a tail
def test_the_heads_gradient_is_widened_and_scaled_as_cast_then_multiply(monkeypatch, shape):
    g = torch.randn(shape).bfloat16()
    factor = torch.tensor(0.37) * (1 / 1024)
    want = g.float().mul_(factor)
    assert torch.equal(fused_loss.scaled_float(g, factor), want)  # native/widen.c where it builds
    monkeypatch.setattr(fused_loss, "library", lambda name: None)
    assert torch.equal(fused_loss.scaled_float(g, factor), want)
    f32 = g.float()
    assert fused_loss.scaled_float(f32, factor) is f32 and torch.equal(f32, want)


def test_next_token_loss_runs_the_fused_head_under_bfloat16_autocast(monkeypatch):
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=97))
    calls = []
    real = HeadCrossEntropy.forward
    monkeypatch.setattr(HeadCrossEntropy, "forward", staticmethod(
        lambda ctx, *args: calls.append(args[3]) or real(ctx, *args)))
    x = torch.randint(0, 97, (2, 17))
    with torch.autocast("cpu", dtype=BF16):
        NextTokenLoss(model)(x).backward()
    assert calls == [BF16]


def test_keep_masks_draw_the_rounded_probability_from_every_lane():
    torch.manual_seed(0)
    keep, p = keep_bits(torch.Size([4096, 1024]), 0.1, CPU)
    assert keep.dtype == torch.int16 and p == round(0.1 * 32768) / 32768
    assert set(keep.unique().tolist()) == {-1, 0}  # all bits set (kept) or none (dropped)
    lanes = (keep == -1).view(-1, 4).float().mean(0)  # each 16-bit lane of the 64-bit words
    assert torch.allclose(lanes, torch.full((4,), 1 - p), atol=2e-3)
    torch.manual_seed(0)
    again, _ = keep_bits(torch.Size([4096, 1024]), 0.1, CPU)
    assert torch.equal(keep, again)  # the global generator: seeded, checkpointed, reproducible
    assert (keep_bits(torch.Size([7]), 0.0, CPU)[0] == -1).all()
    assert (keep_bits(torch.Size([7]), 1.0, CPU)[0] == 0).all()


@pytest.mark.parametrize("dtype", [BF16, torch.float32])  # residual branches; the embeddings' and LoRA's inputs
def test_fast_dropout_scales_what_it_keeps_and_its_gradient_matches(dtype):
    torch.manual_seed(1)
    x = torch.randn(64, 96, dtype=dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=BF16):
        out = BitsDropout.apply(x, 0.25)
    out.float().sum().backward()
    keep = out != 0
    p = round(0.25 * 32768) / 32768
    assert out.dtype == dtype and 0.7 < keep.float().mean() < 0.8
    assert torch.equal(out[keep], x.detach()[keep] * (1 / (1 - p)))
    assert torch.equal(x.grad, keep.to(dtype) * (1 / (1 - p)))


def test_bfloat16_attention_with_dropout_matches_float32_with_the_same_mask():
    torch.manual_seed(2)
    B, nh, T, hs = 2, 3, 24, 16
    q, k, v = (torch.randn(B, nh, T, hs) for _ in range(3))
    q16, k16, v16 = (t.to(BF16).requires_grad_() for t in (q, k, v))
    state = torch.get_rng_state()
    with torch.autocast("cpu", dtype=BF16):
        out = CausalDropoutAttention.apply(q16, k16, v16, 0.2)
        out.float().square().sum().backward()  # the backward under autocast, as finetune runs it
    torch.set_rng_state(state)  # the mask either path drew (the native softmax draws keep_bits' mask inline)
    keep, p = keep_bits((B * nh, T, T), 0.2, torch.device("cpu"))
    keep = (keep == -1).view(B, nh, T, T)
    q32, k32, v32 = (t.clone().requires_grad_() for t in (q, k, v))
    probs = (q32 @ k32.transpose(-2, -1) / hs**0.5).masked_fill(
        torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    want = (probs * keep / (1 - p)) @ v32
    want.square().sum().backward()
    assert out.dtype == BF16
    assert (out.float() - want).abs().max() <= 0.05 * want.abs().max()
    for got, ref in ((q16, q32), (k16, k32), (v16, v32)):
        assert got.grad.dtype == BF16
        assert (got.grad.float() - ref.grad).abs().max() <= 0.05 * ref.grad.abs().max()


def test_finetune_auto_trains_in_bfloat16_where_native_and_says_why(tiny_folder, jokes_csv, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    out, records = tmp_path / "run", []
    finetune(DataConfig(path=str(jokes_csv), column="Joke", cache_dir=str(tmp_path / "cache")),
             str(tiny_folder), out=str(out), max_steps=12, batch_size=4, block_size=32, dropout=0.1,
             learning_rate=3e-3, eval_every=0, sample_every=0, device="cpu", progress=False,
             log=records.append)
    summary, = (r for r in records if r["event"] == "summary")
    assert summary["precision"].startswith("float32 weights, bfloat16 autocast (--dtype auto")
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert losses[-1] < losses[0]
    assert json.loads((out / "run.json").read_text())["train"]["dtype"] == "auto"
    with safe_open(out / "model.safetensors", "pt") as saved:  # master weights: float32
        assert {saved.get_slice(name).get_dtype() for name in saved.keys()} == {"F32"}
