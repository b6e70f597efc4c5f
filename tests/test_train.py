"""Fine-tuning: the recipe end to end on a tiny random GPT-2 and the onelinefun jokes, resume
bit for bit, interruption by signals, NaN, disk full, memory check, LoRA, the fast paths.

Each run is a few steps of a 2-layer, 32-wide model (conftest's tiny_folder) on 64-token blocks.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2kit.config import ModelConfig
from gpt2kit.data.prepare import DataConfig
from gpt2kit.errors import OptionError
from gpt2kit.kernels.checkpointing import checkpoint_blocks
from gpt2kit.model import GPT
from gpt2kit.training import runs
from gpt2kit.training.config import TrainConfig
from gpt2kit.training.loop import TrainingDiverged, TrainingInterrupted, finetune, get_lr
from gpt2kit.training.memory import NotEnoughMemory
from gpt2kit.training.plan import ResumeMismatch, identity_mismatches
from gpt2kit.training.runs import RunFolderError
from gpt2kit.training.samples import COPY_SPAN, CopyDetector
from gpt2kit.training.setup import make_optimizer


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture
def jokes(data_cache, jokes_csv) -> DataConfig:
    return DataConfig(path=str(jokes_csv), column="Joke", cache_dir=data_cache)


def quick(data, model, out, **options):
    """A few cheap steps: batch 4, 2 validation batches, no samples, CPU, silent."""
    settings = dict(out=str(out), batch_size=4, eval_batches=2, sample_every=0, device="cpu",
                    progress=False)
    settings.update(options)
    return finetune(data, str(model), **settings)


def train_losses(out: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in runs.Run(out).records() if "loss" in r]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    name = "model.safetensors" if (folder / "model.safetensors").is_file() else "adapter_model.safetensors"
    return load_file(folder / name)


def interrupt_at(step: int):
    """A log callback that sends this process SIGINT once training step `step` is logged."""
    def log(record):
        if record["event"] == "train" and record["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)
    return log


# ---- options -------------------------------------------------------------------------------

def test_options_are_checked_and_named_as_flags(jokes_csv):
    for bad, flag in [(dict(learning_rate=0), "--learning-rate must be greater than 0"),
                      (dict(learning_rate=float("nan")), "--learning-rate must be a finite number"),
                      (dict(batch_size=0), "--batch-size must be at least 1"),
                      (dict(schedule="step"), "--schedule must be one of cosine, linear"),
                      (dict(size="huge"), "--size must be one of"),
                      (dict(lora=True, from_scratch=True), "--lora cannot be combined"),
                      (dict(merge_lora=True), "--merge-lora needs --lora")]:
        with pytest.raises(OptionError) as e:
            TrainConfig(out="x", **bad)
        assert e.value.as_flag().startswith(flag), e.value.as_flag()
    with pytest.raises(OptionError, match="out is required"):
        finetune(str(jokes_csv), "gpt2")


def test_bad_data_fails_before_any_model_is_loaded(tmp_path, jokes_csv):
    from gpt2kit.errors import InputFileError
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    for data, message in [(str(tmp_path / "missing.txt"), "missing.txt does not exist"),
                          (str(blank), "no training text found in"),
                          (DataConfig(path=str(jokes_csv)), "Joke")]:  # two columns and no --column
        with pytest.raises(InputFileError, match=message):  # not a CheckpointError for the model
            finetune(data, str(tmp_path / "no-such-model"), out=str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_every_field_has_help_with_its_default():
    from dataclasses import fields
    for f in fields(TrainConfig):
        assert f.metadata["help"], f.name
        assert "default" in f.metadata["help"] or f.name == "out", f.name


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    assert get_lr(0, 1.0, 10, 100, "cosine") == pytest.approx(0.1)
    assert get_lr(9, 1.0, 10, 100, "cosine") == pytest.approx(1.0)
    assert get_lr(10, 1.0, 10, 100, "cosine") == pytest.approx(1.0)
    assert get_lr(55, 1.0, 10, 100, "cosine") == pytest.approx(0.55)
    assert get_lr(55, 1.0, 10, 100, "linear") == pytest.approx(0.55)
    assert get_lr(100, 1.0, 10, 100, "cosine") == pytest.approx(0.1)
    assert get_lr(100, 1.0, 10, 100, "linear") == pytest.approx(0.1)


def test_weight_decay_only_on_matrices_and_embeddings():
    model = GPT(ModelConfig(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    decay, no_decay = make_optimizer(model, TrainConfig(out="x"), torch.device("cpu")).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any(p is model.transformer.wte.weight for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ---- the canonical story --------------------------------------------------------------------

def test_finetune_jokes_end_to_end(jokes, tiny_folder, tmp_path):
    out = tmp_path / "jokes"
    events = []
    result = quick(jokes, tiny_folder, out, max_steps=40, learning_rate=3e-3, eval_every=20,
                   sample_every=20, save_every=20, log=events.append)
    assert result.status == "completed" and result.steps == 40
    metrics = runs.Run(out).records()
    evals = [r for r in metrics if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0  # random init: ln(50257) = 10.8
    assert result.val_loss == evals[-1]["val_loss"]
    steps = [r for r in metrics if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert {"step", "loss", "lr", "tokens_per_s", "epoch", "grad_norm"} <= set(steps[0])
    summary = next(e for e in events if e["event"] == "summary")
    assert summary["documents"] > 2500 and summary["block_size"] == 64 and summary["total_steps"] == 40
    assert summary["trainable_parameters"] == summary["parameters"] > 0
    assert summary["memory_estimate"] > 0
    samples = runs.Run(out).records(runs.SAMPLES)
    assert len(samples) == 6 and all(isinstance(s["memorized"], bool) for s in samples)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for _, p in runs.Run(out).step_dirs()] == ["step-0000020", "step-0000040"]
    first, last = (out / "checkpoints" / name for name in ("step-0000020", "step-0000040"))
    changed = {p.name for p in last.iterdir() if p.name not in runs.TRAINER_FILES
               and p.read_bytes() != (first / p.name).read_bytes()}
    assert changed == {"model.safetensors"}  # so publishing it last never shows a mix of models
    assert json.loads((out / "run.json").read_text())["train"]["max_steps"] == 40

    import transformers

    import gpt2kit
    model = gpt2kit.load(out, device="cpu")
    assert isinstance(model.generate("Why did", max_new_tokens=8, seed=1)[0], str)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[50256, 464, 3290, 318]])
    assert torch.allclose(model.logits(ids), hf(ids).logits, atol=1e-4)


def test_from_scratch_builds_the_preset(jokes, tmp_path):
    out = tmp_path / "scratch"
    result = finetune(jokes, out=str(out), from_scratch=True, size="tiny", block_size=32,
                      batch_size=2, max_steps=2, eval_batches=1, sample_every=0, device="cpu", progress=False)
    assert result.steps == 2 and result.summary["model"] == "new tiny GPT-2"
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["n_layer"], cfg["n_embd"], cfg["n_positions"]) == (4, 256, 256)


# ---- resume ---------------------------------------------------------------------------------

def test_resume_is_bitwise_identical_with_dropout_and_shuffling(jokes, tiny_folder, tmp_path):
    common = dict(max_steps=8, grad_accum=2, dropout=0.1, eval_every=3, sample_every=3, save_every=100,
                  learning_rate=1e-3)
    quick(jokes, tiny_folder, tmp_path / "straight", **common)
    with pytest.raises(TrainingInterrupted) as e:
        quick(jokes, tiny_folder, tmp_path / "stopped", log=interrupt_at(4), **common)
    assert e.value.exit_code == 130 and e.value.result.steps == 4
    assert "step-0000004" in str(e.value) and "resume with --resume" in str(e.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    result = finetune(out=str(tmp_path / "stopped"), resume=True, progress=False)
    assert result.steps == 8
    assert train_losses(tmp_path / "straight") == train_losses(tmp_path / "stopped")
    for name in (runs.METRICS, runs.SAMPLES):  # evaluations and samples too; speeds differ
        a, b = ([{k: v for k, v in r.items() if k != "tokens_per_s"} for r in runs.Run(tmp_path / d).records(name)]
                for d in ("straight", "stopped"))
        assert a == b
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "stopped")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_run_resumes_bitwise_and_merges(jokes, tiny_folder, tmp_path):
    common = dict(max_steps=6, lora=True, merge_lora=True, eval_every=0, save_every=100, learning_rate=1e-2)
    straight = quick(jokes, tiny_folder, tmp_path / "straight", **common)
    summary = straight.summary
    assert summary["trainable_parameters"] == summary["adapter_parameters"] < 0.05 * summary["parameters"]
    with pytest.raises(TrainingInterrupted):
        quick(jokes, tiny_folder, tmp_path / "stopped", log=interrupt_at(3), **common)
    step3 = tmp_path / "stopped" / "checkpoints" / "step-0000003"
    assert (step3 / "adapter_model.safetensors").is_file() and not (step3 / "model.safetensors").exists()
    finetune(out=str(tmp_path / "stopped"), resume=True, progress=False)
    assert train_losses(tmp_path / "straight") == train_losses(tmp_path / "stopped")
    out = tmp_path / "stopped"
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors"):
        assert (out / name).is_file(), name
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    import transformers

    import gpt2kit
    ids = torch.tensor([[50256, 464, 3290]])
    merged = gpt2kit.load(out, device="cpu").logits(ids)
    assert torch.allclose(merged, transformers.AutoModelForCausalLM.from_pretrained(out)(ids).logits, atol=1e-4)
    base = gpt2kit.load(tiny_folder, device="cpu").logits(ids)
    assert not torch.allclose(merged, base, atol=1e-4)  # the adapters learned something


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_folder, data_cache, jokes_csv):
    out = tmp_path_factory.mktemp("finished") / "run"
    jokes = DataConfig(path=str(jokes_csv), column="Joke", cache_dir=data_cache)
    quick(jokes, tiny_folder, out, max_steps=2, eval_every=0)
    return out


def test_resume_refuses_other_settings_listing_them(finished_run, tiny_folder, tmp_path, data_cache):
    with pytest.raises(ResumeMismatch) as e:
        finetune(out=str(finished_run), resume=True, block_size=32, learning_rate=1.0, progress=False)
    assert "block_size" in str(e.value) and "learning_rate" in str(e.value)

    import transformers
    wider = tmp_path / "wider"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=3, n_head=2, n_embd=32, n_positions=64)).save_pretrained(wider)
    with pytest.raises(ResumeMismatch, match="model shape"):
        finetune(model=str(wider), out=str(finished_run), resume=True, progress=False)

    other = tmp_path / "other.txt"
    other.write_text("A different corpus entirely. " * 400)
    with pytest.raises(ResumeMismatch, match="data fingerprint"):
        finetune(DataConfig(path=str(other), cache_dir=data_cache), out=str(finished_run), resume=True,
                 progress=False, device="cpu")
    # Safe changes are allowed: more steps continue the same run.
    result = finetune(out=str(finished_run), resume=True, max_steps=3, progress=False)
    assert result.steps == 3


def test_resume_with_new_step_count_extends_the_schedule_explicitly(jokes, tiny_folder, tmp_path):
    """A new --max-steps on --resume keeps the run's warm-up, moves the end of the decay, says so,
    and records it in run.json, so a later plain --resume keeps the extended schedule."""
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):  # warm-up: 5% of 40 steps = 2
        quick(jokes, tiny_folder, out, max_steps=40, eval_every=0, log=interrupt_at(4))
    notes = []
    with pytest.raises(TrainingInterrupted):
        quick(None, tiny_folder, out, resume=True, max_steps=20, eval_every=0,
              log=lambda r: (notes.append(r.get("message", "")), interrupt_at(6)(r)))
    assert any("extending the run's schedule from 40 to 20 steps: warm-up stays 2 steps" in n for n in notes), notes
    assert runs.Run(out).settings()["train"]["max_steps"] == 20
    lrs = {r["step"]: r["lr"] for r in runs.Run(out).records() if "lr" in r}
    peak = TrainConfig(out="x").peak_lr
    assert lrs[5] == pytest.approx(get_lr(4, peak, 2, 20, "cosine"))  # not 1 warm-up step of 20
    result = finetune(out=str(out), resume=True, progress=False)
    assert result.steps == 20
    with pytest.raises(OptionError, match="already at step 20"):
        finetune(out=str(out), resume=True, max_steps=10, progress=False)


def test_identity_mismatches_name_each_field():
    saved = {"identity": {"model_shape": {"n_layer": 2}, "block_size": 64, "tokenizer": "a" * 64,
                          "data_fingerprint": "b" * 64, "lora": None}}
    now = {"model_shape": {"n_layer": 2}, "block_size": 64, "tokenizer": "c" * 64,
           "data_fingerprint": "b" * 64, "lora": {"rank": 8}}
    problems = identity_mismatches(saved, now)
    assert [p.split(" (")[0] for p in problems] == ["tokenizer", "lora"]


def test_resume_needs_a_run_and_a_complete_checkpoint(tmp_path, jokes, tiny_folder, jokes_csv):
    with pytest.raises(RunFolderError, match="nothing to resume"):
        finetune(out=str(tmp_path / "none"), resume=True, progress=False)
    crashed = tmp_path / "crashed"
    runs.Run(crashed).start({"train": {"out": str(crashed)}, "data": {"path": str(jokes_csv)}, "model": None, "lora": None})
    with pytest.raises(RunFolderError, match="no complete checkpoint"):
        finetune(out=str(crashed), resume=True, progress=False)


def test_existing_out_is_never_overwritten(finished_run, jokes, tiny_folder, tmp_path):
    with pytest.raises(RunFolderError, match="pass --resume"):
        quick(jokes, tiny_folder, finished_run, max_steps=1)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(RunFolderError, match="not an empty folder"):
        quick(jokes, tiny_folder, other, max_steps=1)
    assert os.listdir(other) == ["cat.jpg"]


# ---- faults ---------------------------------------------------------------------------------

def test_nan_loss_stops_before_touching_the_weights(jokes, tiny_folder, tmp_path, monkeypatch):
    from gpt2kit.training.objective import NextTokenLoss
    real = NextTokenLoss.forward
    calls = iter(range(10**6))

    def poisoned(self, x):
        loss = real(self, x)
        return loss * float("nan") if next(calls) == 2 else loss  # the third step
    monkeypatch.setattr(NextTokenLoss, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged) as e:
        quick(jokes, tiny_folder, out, max_steps=10, save_every=2)
    assert str(e.value).startswith(f"loss is NaN at step 3; last good checkpoint: {out / 'checkpoints' / 'step-0000002'}")
    assert e.value.exit_code == 1
    assert [p.name for _, p in runs.Run(out).step_dirs()] == ["step-0000002"]
    good = weights(out / "checkpoints" / "step-0000002")
    assert all(torch.equal(good[k], v) for k, v in weights(out).items())


def test_huge_learning_rate_diverges_within_bounded_steps(jokes, tiny_folder, tmp_path):
    with pytest.raises(TrainingDiverged, match=r"is (NaN|infinite) at step \d+; last good checkpoint"):
        quick(jokes, tiny_folder, tmp_path / "boom", max_steps=40, learning_rate=1e3, grad_clip=0.0,
              eval_every=0, save_every=0)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(jokes, tiny_folder, tmp_path, monkeypatch):
    real = runs.write_tensors

    def full_disk(obj, path):
        if "step-0000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, path)
    monkeypatch.setattr(runs, "write_tensors", full_disk)
    out = tmp_path / "full"
    with pytest.raises(RunFolderError) as e:
        quick(jokes, tiny_folder, out, max_steps=6, save_every=2, eval_every=0)
    message = str(e.value)
    assert "\n" not in message and "step-0000004" in message and "no space left on device" in message
    assert "GB free" in message and str(out / "checkpoints" / "step-0000002") in message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]  # no partial left

    import gpt2kit
    gpt2kit.load(out / "checkpoints" / "step-0000002", device="cpu")
    gpt2kit.load(out, device="cpu")


def test_not_enough_memory_is_refused_before_training(jokes, tiny_folder, tmp_path, monkeypatch):
    import gpt2kit.training.setup as setup
    monkeypatch.setattr(setup, "available_memory", lambda device: 10_000)
    out = tmp_path / "oom"
    with pytest.raises(NotEnoughMemory) as e:
        quick(jokes, tiny_folder, out, max_steps=2)
    message = str(e.value)
    assert "\n" not in message and "available" in message
    for hint in ("--lora", "--grad-checkpointing", "--batch-size", "--block-size"):
        assert hint in message
    assert not (out / "metrics.jsonl").exists()


SIGNAL_SCRIPT = """
import sys
from gpt2kit.data.prepare import DataConfig
from gpt2kit.errors import Gpt2kitError
from gpt2kit.training.loop import finetune
try:
    finetune(DataConfig(path={data!r}, column="Joke", cache_dir={cache!r}), {model!r}, out={out!r},
             max_steps=100000, batch_size=2, eval_every=0, sample_every=0, save_every=0,
             eval_batches=1, device="cpu", progress=False)
except Gpt2kitError as e:
    print("error:", e, file=sys.stderr)
    sys.exit(e.exit_code)
"""


def stepped(out: Path) -> bool:
    """Has the training process logged a step? (Reads only complete lines of a growing file.)"""
    try:
        text = (out / runs.METRICS).read_text()
    except FileNotFoundError:
        return False
    return any('"loss"' in line for line in text.splitlines(keepends=True) if line.endswith("\n"))


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_exits(signum, code, tiny_folder, data_cache, tmp_path, jokes_csv):
    out = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SIGNAL_SCRIPT.format(data=str(jokes_csv), cache=data_cache,
                                                           model=str(tiny_folder), out=str(out))))
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not stepped(out) and proc.poll() is None:
        assert time.monotonic() < deadline, "no training step logged"
        time.sleep(0.05)
    os.kill(proc.pid, signum)
    if signum == signal.SIGINT:
        time.sleep(0.01)
        os.kill(proc.pid, signum)  # a second Ctrl-C while stopping is ignored
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    last = runs.Run(out).latest()
    assert last is not None and not runs.missing_files(last)
    assert f"saved checkpoint to {last}; resume with --resume" in stderr
    state = json.loads((last / runs.STATE).read_text())
    assert state["step"] >= 1 and state["step"] == max(s for s, _, _ in train_losses(out))
    if signum == signal.SIGTERM:  # and the run continues from there
        result = finetune(out=str(out), resume=True, max_steps=state["step"] + 1, progress=False)
        assert result.steps == state["step"] + 1


# ---- fast paths -------------------------------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = ModelConfig(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2, dropout=0.1)
    x = torch.randint(0, 128, (3, 32))
    grads = []
    for wrapped in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg).train()
        if wrapped:
            checkpoint_blocks(model)
        torch.manual_seed(1)  # same dropout masks: checkpoint replays the RNG in the recompute
        logits = model(x[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert list(model.state_dict()) == list(GPT(cfg).state_dict())  # names unchanged
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_fused_head_loss_matches_the_plain_path(monkeypatch):
    """HeadCrossEntropy (chunks of rows, gradients made in the forward) against cross_entropy
    over the whole logits: the loss, both gradients scaled by the caller, a frozen head (LoRA)."""
    import gpt2kit.kernels.fused_loss as fused_loss
    from gpt2kit.training.objective import NextTokenLoss
    monkeypatch.setattr(fused_loss, "LOSS_CHUNK", 7)  # 3 chunks, the last one short
    cfg = ModelConfig(vocab_size=96, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = GPT(cfg).train()
    x = torch.randint(0, 96, (2, 11))
    grads = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        loss = NextTokenLoss(model)(x) if fused else \
            torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        (loss / 4).backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fused_loss, fused), (plain_loss, plain) = grads
    assert fused_loss == pytest.approx(plain_loss, abs=1e-6)
    for name in plain:
        assert torch.allclose(fused[name], plain[name], atol=1e-7), name
    model.zero_grad(set_to_none=True)
    model.transformer.wte.weight.requires_grad_(False)
    NextTokenLoss(model)(x).backward()
    assert model.transformer.wte.weight.grad is None and model.transformer.ln_f.weight.grad is not None


def test_grad_checkpointing_run_matches_plain(jokes, tiny_folder, tmp_path):
    common = dict(max_steps=2, eval_every=0, dropout=0.0)
    quick(jokes, tiny_folder, tmp_path / "plain", **common)
    quick(jokes, tiny_folder, tmp_path / "ckpt", grad_checkpointing=True, **common)
    for (_, a, _), (_, b, _) in zip(train_losses(tmp_path / "plain"), train_losses(tmp_path / "ckpt")):
        assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.slow
def test_compiled_step_matches_eager(jokes, tiny_folder, tmp_path):
    common = dict(max_steps=1, eval_every=0, dropout=0.0, eval_batches=1)
    quick(jokes, tiny_folder, tmp_path / "eager", **common)
    quick(jokes, tiny_folder, tmp_path / "compiled", compile=True, **common)
    (_, eager, _), = train_losses(tmp_path / "eager")
    (_, compiled, _), = train_losses(tmp_path / "compiled")
    assert math.isfinite(compiled) and compiled == pytest.approx(eager, abs=1e-4)


# ---- samples ------------------------------------------------------------------------------------

def test_copy_detector_flags_long_spans_and_whole_short_documents():
    import numpy as np
    eos = 99
    long_doc = list(range(40))
    short_doc = [50, 51, 52]
    tokens = np.array(long_doc + [eos] + short_doc + [eos], dtype=np.uint16)
    d = CopyDetector(tokens, eos)
    assert d.copies(long_doc[5:5 + COPY_SPAN], ended=False)
    assert d.copies([7, 7] + long_doc[10:10 + COPY_SPAN] + [8], ended=True)
    assert not d.copies(long_doc[5:5 + COPY_SPAN - 1] + [98], ended=False)
    assert d.copies(short_doc, ended=True)
    assert not d.copies(short_doc, ended=False)  # cut off by the length limit: not a whole document
    assert not d.copies(short_doc[:2], ended=True)


def test_lora_run_folder_loads_as_merged_model(tmp_path, jokes_csv):
    """gpt2kit.load on a LoRA run without --merge-lora: base + adapter, merged on load."""
    from conftest import tiny_hf_model

    import gpt2kit
    base = tmp_path / "base"
    tiny_hf_model().save_pretrained(base)
    out = tmp_path / "lora-run"
    gpt2kit.finetune(gpt2kit.DataConfig(str(jokes_csv), column="Joke", cache_dir=str(tmp_path / "c")),
                     str(base), out=str(out), lora=True, max_steps=2, batch_size=2, block_size=32,
                     sample_every=0, eval_every=2, progress=False)
    model = gpt2kit.load(out, device="cpu")
    assert "LoRA adapter" in model.source
    assert len(model.generate("Why", max_new_tokens=3, seed=0)) == 1
