"""bfloat16 weights for CPU inference (issue 15, item 3): the AMX tile layout (or oneDNN's packed
one where the native kernel cannot run) in bfloat16,
logits close to float32's and returned as float32, every API path working, and the compiled
decode step agreeing with the eager one."""

import logging
import math
import subprocess
import sys

import pytest
import torch

import gpt2kit
from gpt2kit import runtime
from gpt2kit.checkpoints import load_model
from gpt2kit.kernels import packed_linear
from gpt2kit.kernels.compiled_decode import CompiledDecoder
from gpt2kit.kernels.packed_linear import PackedLinear

GREEDY = {"temperature": 0, "stop_at_eos": False}
PROMPTS = ["Hello there, general", "The cat sat on the"]


@pytest.fixture(scope="module")
def bf16_model(tiny_folder):
    return gpt2kit.load(tiny_folder, device="cpu", dtype="bfloat16")


def native() -> bool:
    return runtime.cpu_has_bf16()


def test_bfloat16_load_runs_the_tiled_or_packed_layout(bf16_model):
    if runtime.cpu_bfloat16() is None:  # oneDNN without bfloat16 kernels: plain nn.Linear
        pytest.skip("oneDNN has no bfloat16 kernels on this CPU")
    module = bf16_model.module
    block = module.transformer.h[0]
    tiles = packed_linear.bf16_tiles() is not None  # AMX: gpt2kit's kernel and layout, else oneDNN's
    for linear in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj, module.lm_head):
        assert isinstance(linear, PackedLinear) and linear.weight.dtype == torch.bfloat16
        assert (linear.tiles is not None, linear.packed) == (tiles, not tiles)
    assert block.mlp.c_fc.gelu and isinstance(block.mlp.act, torch.nn.Identity)
    # The head (in the loop above) is a copy: the embedding lookup reads wte as it is.
    assert module.lm_head.weight.data_ptr() != module.transformer.wte.weight.data_ptr()
    assert module.transformer.wte.weight.dtype == torch.bfloat16
    assert bf16_model.dtype == torch.bfloat16


def test_float32_head_still_reads_the_embedding_in_place(tiny_model):
    if not PackedLinear.available():
        pytest.skip("no oneDNN linear here")
    head = tiny_model.module.lm_head
    assert isinstance(head, PackedLinear) and not head.packed
    assert head.weight.data_ptr() == tiny_model.module.transformer.wte.weight.data_ptr()


def test_logits_are_float32_and_close_to_the_float32_model(bf16_model, tiny_model, tiny_folder):
    """bfloat16 keeps 8 significant bits (relative error up to 2^-8 = 0.4%); through 2 layers the
    rounding of weights, activations and residual sums measured at most 0.6% of the largest
    logit. 2% leaves room for other kernels' rounding, while a wrong GELU, a missing bias or a
    transposed weight moves the logits by tens of percent."""
    ids = bf16_model.tokenizer.encode(PROMPTS[0])
    got, want = bf16_model.logits(ids), tiny_model.logits(ids)
    assert got.dtype == torch.float32
    scale = want.abs().max().item()
    assert 0 < (got - want).abs().max().item() < 0.02 * scale  # > 0: bfloat16 really ran
    plain = load_model(str(tiny_folder), torch.device("cpu"), torch.bfloat16).model  # nn.Linear, bfloat16
    with torch.inference_mode():
        plain_logits = plain(torch.tensor([ids])).float()
    assert (got - plain_logits).abs().max().item() < 0.02 * scale


def test_oneDNN_layout_where_the_tiles_cannot_run(tiny_folder, bf16_model, monkeypatch):
    """No AMX (or no compiler): the oneDNN packed layout, the same text greedily on this tiny model."""
    if packed_linear.bf16_tiles() is None or runtime.cpu_bfloat16() is None:
        pytest.skip("the native bfloat16 kernel does not run here: the oneDNN layout is the only one")
    monkeypatch.setattr(packed_linear, "bf16_tiles", lambda: None)
    model = gpt2kit.load(tiny_folder, device="cpu", dtype="bfloat16")
    head = model.module.lm_head
    assert head.packed and head.tiles is None
    ids = model.tokenizer.encode(PROMPTS[0])
    got, want = bf16_model.logits(ids), model.logits(ids)
    assert (got - want).abs().max().item() < 0.02 * want.abs().max().item()


def test_generate_stream_complete_and_score_in_bfloat16(bf16_model, tiny_model):
    texts = bf16_model.generate(PROMPTS, max_new_tokens=8, **GREEDY)
    pieces = list(bf16_model.stream(PROMPTS[0], max_new_tokens=8, **GREEDY))
    assert "".join(pieces) == texts[0] and pieces[-1].finish_reason == "length"
    [c] = bf16_model.complete(PROMPTS[1], max_new_tokens=6, logprobs=2, **GREEDY)
    assert len(c.token_ids) == 6 and len(c.logprobs) == 6
    # Greedy takes a most likely token. Not always top[0]: the head's output is rounded to
    # bfloat16 (8 significant bits), and this random model's logits tie at that resolution.
    for chosen in c.logprobs:
        assert math.isfinite(chosen.logprob) and chosen.logprob == chosen.top[0][2] <= 0
    got, want = bf16_model.score(PROMPTS[1]), tiny_model.score(PROMPTS[1])
    assert got.token_ids == want.token_ids
    assert abs(got.nll - want.nll) < 0.01 * want.nll  # the loss of a ~uniform model, ~10.8 nats


def test_sampled_generation_is_seeded_in_bfloat16(bf16_model):
    first = bf16_model.generate(PROMPTS[0], max_new_tokens=8, seed=3, temperature=1.0)
    assert first == bf16_model.generate(PROMPTS[0], max_new_tokens=8, seed=3, temperature=1.0)


def test_cli_generate_with_dtype_bfloat16(tiny_folder):
    run = [sys.executable, "-m", "gpt2kit", "generate", "Hello", "-m", str(tiny_folder), "--device", "cpu",
           "--dtype", "bfloat16", "--max-new-tokens", "5", "--temperature", "0"]
    done = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Hello") and len(done.stdout.strip()) > len("Hello")


def test_cpu_without_native_bfloat16_warns_once_and_still_works(tiny_folder, monkeypatch, caplog):
    monkeypatch.setattr(packed_linear, "cpu_bfloat16", lambda: "emulated")
    packed_linear.warn_emulated_bfloat16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="gpt2kit"):
        first = gpt2kit.load(tiny_folder, device="cpu", dtype="bfloat16")
        gpt2kit.load(tiny_folder, device="cpu", dtype="bfloat16")
    said = [r for r in caplog.records if "without native bfloat16" in r.getMessage()]
    assert len(said) == 1 and "--dtype float32" in said[0].getMessage()
    assert isinstance(first.module.lm_head, PackedLinear)  # oneDNN emulates: same layout
    monkeypatch.setattr(packed_linear, "cpu_bfloat16", lambda: None)  # no oneDNN bfloat16 at all
    plain = gpt2kit.load(tiny_folder, device="cpu", dtype="bfloat16")
    assert type(plain.module.transformer.h[0].mlp.c_fc) is torch.nn.Linear
    assert plain.generate(PROMPTS[0], max_new_tokens=8, **GREEDY) == first.generate(
        PROMPTS[0], max_new_tokens=8, **GREEDY)
    packed_linear.warn_emulated_bfloat16.cache_clear()


def test_native_bfloat16_says_nothing(tiny_folder, caplog):
    if not native():
        pytest.skip("this CPU has no native bfloat16")
    packed_linear.warn_emulated_bfloat16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="gpt2kit"):
        gpt2kit.load(tiny_folder, device="cpu", dtype="bfloat16")
    assert not [r for r in caplog.records if "bfloat16" in r.getMessage()]


@pytest.mark.slow
def test_compiled_bfloat16_decode_equals_eager_bfloat16(tiny_folder, bf16_model):
    """load(dtype="bfloat16", compile=True): plain bfloat16 matrices, batch 1 through Inductor's
    one-row products (float32 sums) and OneQueryAttention, batch 2 through oneDNN."""
    model = gpt2kit.load(tiny_folder, device="cpu", dtype="bfloat16", compile=True)
    assert isinstance(model.decoder, CompiledDecoder)
    linears = [m for m in model.module.modules() if isinstance(m, PackedLinear)]
    assert linears and not any(m.packed for m in linears)
    assert all(m.weight.dtype == torch.bfloat16 for m in linears)
    for prompts in (PROMPTS[:1], PROMPTS):
        got = model.generate(prompts, max_new_tokens=20, **GREEDY)
        assert got == bf16_model.generate(prompts, max_new_tokens=20, **GREEDY)
    assert {rows for rows, _ in model.decoder.shapes} == {1, 2}  # both batches ran compiled
