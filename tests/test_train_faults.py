"""Fine-tuning faults end to end, through the CLI (issue 19, items 1-3): weights that went NaN or
infinite are never saved or named as good, a full disk ends in one line with the earlier
checkpoints intact, and --resume drops a torn last log line and clears stale temporaries."""

from __future__ import annotations

import collections
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import gpt2kit
from gpt2kit.cli import main
from gpt2kit.training import loop, runs
from gpt2kit.training.runs import Run


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("data-cache"))


def finetune(jokes_csv: Path, tiny_folder: Path, out: Path, cache: str, *flags: str) -> int:
    """`gpt2kit finetune` on the jokes with the tiny model: batch 4, blocks of 32, 2 validation
    batches, no samples, CPU."""
    return main(["finetune", str(jokes_csv), "--column", "Joke", "-m", str(tiny_folder), "--out", str(out),
                 "--cache-dir", cache, "--batch-size", "4", "--block-size", "32", "--eval-batches", "2",
                 "--sample-every", "0", "--device", "cpu", "--seed", "1", *flags])


def resume(out: Path, *flags: str) -> int:
    return main(["finetune", "--out", str(out), "--resume", *flags])


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def finite(folder: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values())


def hidden(folder: Path) -> list[str]:
    """Temporaries of atomic.py's naming left in `folder` and its checkpoints."""
    found = [p for p in [*folder.iterdir(), *(folder / "checkpoints").iterdir()] if p.name.startswith(".")]
    return sorted(p.name for p in found)


# ---- 1. NaN and infinite weights ------------------------------------------------------------

def test_a_huge_learning_rate_saves_no_nan_checkpoint(jokes_csv, tiny_folder, data_cache, tmp_path, capsys):
    """The issue's command: the first step's loss is finite, the step takes the weights to
    inf/NaN. Before, step-0000001 was saved (all non-finite) and named as the last good one."""
    out = tmp_path / "boom"
    code = finetune(jokes_csv, tiny_folder, out, data_cache, "--max-steps", "10", "--save-every", "1",
                    "--learning-rate", "1e39")
    assert code == 1
    assert error_line(capsys).startswith("error: the weights are NaN at step 1; last good checkpoint: "
                                         "none saved yet")
    assert not (out / "model.safetensors").exists() and Run(out).step_dirs() == []


def test_weights_that_go_infinite_after_a_good_checkpoint(jokes_csv, tiny_folder, data_cache, tmp_path,
                                                         capsys, monkeypatch):
    """Step 3 leaves one weight infinite with a finite loss: its checkpoint is refused, step 2 is
    named and stays the run's model."""
    real = loop.optimizer_step

    def poisoned(plan, parts, state):
        result = real(plan, parts, state)
        if state.step == 2:  # the third step (state.step counts the steps done before it)
            with torch.no_grad():
                parts.model.transformer.h[0].mlp.c_fc.weight[0, 0] = math.inf
        return result
    monkeypatch.setattr(loop, "optimizer_step", poisoned)
    out = tmp_path / "inf"
    assert finetune(jokes_csv, tiny_folder, out, data_cache, "--max-steps", "6", "--save-every", "1") == 1
    step2 = out / "checkpoints" / "step-0000002"
    assert error_line(capsys) == (f"error: the weights are infinite at step 3; last good checkpoint: {step2} "
                                  "(try a lower --learning-rate)")
    assert [p.name for _, p in Run(out).step_dirs()] == ["step-0000001", "step-0000002"]
    assert load_file(out / "model.safetensors").keys() == load_file(step2 / "model.safetensors").keys()
    assert all(torch.equal(load_file(out / "model.safetensors")[k], v)
               for k, v in load_file(step2 / "model.safetensors").items())
    assert finite(out) and finite(step2)


def test_a_nan_checkpoint_on_disk_is_never_named_as_good(jokes_csv, tiny_folder, data_cache, tmp_path, capsys):
    """A checkpoint saved with NaN weights (by an older gpt2kit) resumes into a NaN loss: the
    message names the newest checkpoint whose weights are finite instead."""
    out = tmp_path / "old"
    assert finetune(jokes_csv, tiny_folder, out, data_cache, "--max-steps", "2", "--save-every", "1") == 0
    step1, step2 = out / "checkpoints" / "step-0000001", out / "checkpoints" / "step-0000002"
    poisoned = {k: torch.full_like(v, math.nan) for k, v in load_file(step2 / "model.safetensors").items()}
    save_file(poisoned, step2 / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert resume(out, "--max-steps", "4") == 1
    assert error_line(capsys).startswith(f"error: loss is NaN at step 3; last good checkpoint: {step1} ")
    assert finite(step1)


# ---- 2. a full disk -----------------------------------------------------------------------------

Usage = collections.namedtuple("Usage", "total used free")


def full_disk(monkeypatch, fail_at: str, error: Exception) -> None:
    """Writers raise `error` inside checkpoint `fail_at`'s folder, and the disk shows 1 MB free
    (a checkpoint of the tiny model takes ~20 MB)."""
    import gpt2kit.checkpoints.weights as weights
    real_safetensors, real_torch_save = weights.save_file, torch.save

    def safetensors_writer(tensors, path, **kwargs):
        if fail_at in str(path) and isinstance(error, SafetensorError):
            raise error
        return real_safetensors(tensors, path, **kwargs)

    def torch_writer(obj, path, *args, **kwargs):
        if fail_at in str(path) and not isinstance(error, SafetensorError):
            raise error
        return real_torch_save(obj, path, *args, **kwargs)
    monkeypatch.setattr(weights, "save_file", safetensors_writer)
    monkeypatch.setattr(torch, "save", torch_writer)
    real_usage = shutil.disk_usage
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda path: Usage(*real_usage(path)[:2], 2**20))


ERRORS = {
    "safetensors": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    "torch.save": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
    "ENOSPC": OSError(28, "No space left on device"),
}


@pytest.mark.parametrize("kind,fail_at", [("safetensors", "step-0000001"), ("safetensors", "step-0000003"),
                                          ("torch.save", "step-0000003"), ("ENOSPC", "step-0000001")])
def test_a_full_disk_ends_in_one_line_and_keeps_what_was_saved(jokes_csv, tiny_folder, data_cache, tmp_path,
                                                               capsys, monkeypatch, kind, fail_at):
    full_disk(monkeypatch, fail_at, ERRORS[kind])
    out = tmp_path / "full"
    assert finetune(jokes_csv, tiny_folder, out, data_cache, "--max-steps", "4", "--eval-every", "0",
                    "--save-every", "1") == 1
    line = error_line(capsys)
    first = fail_at == "step-0000001"
    assert line.startswith(f"error: could not save checkpoint {out / 'checkpoints' / fail_at}: no space left "
                           f"on device (0.00 GB free on the disk holding {out}, the checkpoint needs about 0.0")
    assert line.endswith("no checkpoint was saved before" if first else
                         f"the last good checkpoint is {out / 'checkpoints' / 'step-0000002'}")
    assert hidden(out) == []  # nothing half-written
    saved = [p.name for _, p in Run(out).step_dirs()]
    assert saved == ([] if first else ["step-0000001", "step-0000002"])
    if not first:  # the earlier checkpoint and the run's model load, and the run resumes once there is room
        gpt2kit.load(out / "checkpoints" / "step-0000002", device="cpu")
        gpt2kit.load(out, device="cpu")
        monkeypatch.undo()  # space freed
        assert resume(out, "--max-steps", "4") == 0
        assert [p.name for _, p in Run(out).step_dirs()] == ["step-0000003", "step-0000004"]


def test_the_space_a_checkpoint_needs_is_its_size(jokes_csv, tiny_folder, data_cache, tmp_path, capsys,
                                                  monkeypatch):
    """'needs about' is the size of a checkpoint written with room to spare (weights and
    optimizer state dominate), within 10%."""
    out = tmp_path / "size"
    assert finetune(jokes_csv, tiny_folder, out, data_cache, "--max-steps", "1", "--eval-every", "0",
                    "--save-every", "1") == 0
    folder = out / "checkpoints" / "step-0000001"
    written = sum(p.stat().st_size for p in folder.iterdir() if p.name in (*runs.WEIGHTS, runs.OPTIMIZER, runs.RNG))
    full_disk(monkeypatch, "step-0000002", ERRORS["torch.save"])
    capsys.readouterr()
    assert resume(out, "--max-steps", "2") == 1
    needed = float(error_line(capsys).split("needs about ")[1].split(" GB")[0])
    assert abs(needed - written / 1024**3) < max(0.1 * written / 1024**3, 0.006)


# ---- 3. torn logs and stale temporaries ---------------------------------------------------------

def test_resume_drops_a_torn_last_log_line_and_clears_stale_temporaries(jokes_csv, tiny_folder, data_cache,
                                                                        tmp_path, capsys):
    out = tmp_path / "torn"
    assert finetune(jokes_csv, tiny_folder, out, data_cache, "--max-steps", "2", "--save-every", "1",
                    "--sample-every", "1") == 0
    with open(out / runs.METRICS, "a") as f:
        f.write('{"step": 3, "epoch": 0.01, "lo')  # a kill in the middle of an append
    with open(out / runs.SAMPLES, "ab") as f:
        f.write('{"step": 3, "text": "caf\u00e9'.encode()[:-1])  # ... even inside a UTF-8 character
    stale = [out / ".metrics.jsonl.partial-0a1b2c3d", out / ".loss.png.partial-deadbeef",
             out / "checkpoints" / ".step-0000003.partial-12345678"]
    stale[0].write_text('{"step": 1}\n')
    stale[1].write_bytes(b"\x89PNG")
    stale[2].mkdir()
    capsys.readouterr()
    assert resume(out, "--max-steps", "3") == 0
    err = capsys.readouterr().err
    for name in (runs.METRICS, runs.SAMPLES):
        assert f"warning: dropped the torn last line of {out / name} (line " in err
    assert "Traceback" not in err and not any(p.exists() for p in stale) and hidden(out) == []
    records = [json.loads(line) for line in (out / runs.METRICS).read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
