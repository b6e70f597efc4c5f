"""The run folder: atomic checkpoints, disk full, partial checkpoints,
no pickled objects on resume (F9), keep-last-K, the top-level model, logs and the plot."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from gpt2kit.errors import CheckpointError
from gpt2kit.training import runs
from gpt2kit.training.runs import Run, RunFolderError

GB = 1024**3


def fake_model(value: float):
    """A write_model that saves one tensor (and a config) as a model folder would."""
    def write(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.full((4,), value)}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"value": value}))
    return write


def save(run: Run, step: int, value: float | None = None, write=None) -> Path:
    rng, rng_json = runs.capture_rng()
    return run.save(step, write or fake_model(float(step if value is None else value)),
                    {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
                    rng, {"step": step, "rng": rng_json})


def test_a_new_run_needs_a_new_or_empty_folder(tmp_path):
    Run(tmp_path / "new").check_usable(resume=False)
    (tmp_path / "empty").mkdir()
    Run(tmp_path / "empty").check_usable(resume=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not an empty folder"):
        Run(tmp_path / "other").check_usable(resume=False)
    run = Run(tmp_path / "run")
    run.start({"train": {}})
    with pytest.raises(RunFolderError, match="pass --resume to continue it, or choose another --out"):
        run.check_usable(resume=False)
    run.check_usable(resume=True)
    with pytest.raises(RunFolderError, match="nothing to resume"):
        Run(tmp_path / "other").check_usable(resume=True)


def test_checkpoints_are_complete_kept_and_published(tmp_path):
    run = Run(tmp_path / "run")
    run.start({})
    for step in (1, 2, 3):
        folder = save(run, step)
        run.publish(folder)
        run.prune(keep=2)
    assert [s for s, _ in run.step_dirs()] == [2, 3]
    latest = run.latest()
    assert latest.name == "step-0000003" and runs.missing_files(latest) == []
    assert (latest / runs.COMPLETE).is_file()
    assert json.loads((run.path / "config.json").read_text()) == {"value": 3.0}
    assert os.path.samefile(run.path / "model.safetensors", latest / "model.safetensors")  # a hard link
    assert not (run.path / runs.OPTIMIZER).exists()
    assert not [p for p in run.path.rglob("*") if ".partial-" in p.name]
    state = runs.load_tensors(latest / runs.OPTIMIZER)
    assert torch.equal(state["state"][0]["exp_avg"], torch.ones(2))


def test_an_exception_mid_save_leaves_the_previous_checkpoint_alone(tmp_path):
    run = Run(tmp_path / "run")
    good = save(run, 1)

    def half_written(folder: Path) -> None:
        fake_model(2.0)(folder)
        raise RuntimeError("serializer crashed")
    with pytest.raises(RuntimeError, match="serializer crashed"):
        save(run, 2, write=half_written)
    assert run.latest() == good and [s for s, _ in run.step_dirs()] == [1]
    assert list(run.checkpoints.iterdir()) == [good]  # the partial folder was removed


def test_disk_full_names_the_path_and_keeps_the_last_good_one(tmp_path, monkeypatch):
    run = Run(tmp_path / "run")
    good = save(run, 1)

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(runs, "write_tensors", full)
    with pytest.raises(RunFolderError) as e:
        save(run, 2)
    message = str(e.value)
    assert message.startswith(f"could not save checkpoint {run.checkpoints / 'step-0000002'}: no space left on device (")
    assert "GB free" in message and f"the last good checkpoint is {good}" in message
    assert list(run.checkpoints.iterdir()) == [good]


def test_kill_9_during_a_save_leaves_no_partial_checkpoint(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "saver.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_runs import save, fake_model
        from gpt2kit.training.runs import Run
        run = Run({str(out)!r})
        save(run, 1)
        def slow(folder):
            fake_model(2.0)(folder)
            print("writing", flush=True)
            time.sleep(60)
        save(run, 2, write=slow)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    run = Run(out)
    assert [s for s, _ in run.step_dirs()] == [1]  # nothing under a final name but step 1
    assert run.latest().name == "step-0000001" and runs.missing_files(run.latest()) == []
    run.remove_partials()  # the next run cleans the temporary folder up
    assert [p.name for p in run.checkpoints.iterdir()] == ["step-0000001"]


def test_resume_skips_incomplete_checkpoints_with_a_warning(tmp_path):
    run = Run(tmp_path / "run")
    save(run, 1)
    (save(run, 2) / runs.COMPLETE).unlink()
    (save(run, 3) / runs.OPTIMIZER).unlink()
    warnings = []
    assert run.latest(warn=warnings.append).name == "step-0000001"
    assert len(warnings) == 2
    assert "step-0000003" in warnings[0] and "optimizer.pt" in warnings[0]
    assert "step-0000002" in warnings[1] and "COMPLETE" in warnings[1]


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp") / f"gpt2kit-pwned-{os.getpid()}"


def test_crafted_pickles_are_refused_not_run(tmp_path):
    path = tmp_path / "rng.pt"
    with open(path, "wb") as f:
        pickle.dump({"torch_cpu": Payload()}, f)
    with pytest.raises(CheckpointError, match="unsafe or unsupported pickle content in .*rng.pt; convert it to safetensors"):
        runs.load_tensors(path)
    torch.save({"torch_cpu": Payload()}, tmp_path / "optimizer.pt")
    with pytest.raises(CheckpointError, match="unsafe or unsupported pickle content"):
        runs.load_tensors(tmp_path / "optimizer.pt")
    assert not MARKER.exists()


def test_resume_from_a_crafted_rng_file_is_refused(tmp_path, tiny_folder, jokes_csv):
    from gpt2kit.data.prepare import DataConfig
    from gpt2kit.training.loop import finetune
    out = tmp_path / "run"
    finetune(DataConfig(path=str(jokes_csv), column="Joke", cache_dir=str(tmp_path / "cache")), str(tiny_folder),
             out=str(out), max_steps=1, batch_size=2, eval_batches=1, sample_every=0, device="cpu", progress=False)
    latest = Run(out).latest()
    with open(latest / runs.RNG, "wb") as f:
        pickle.dump({"torch_cpu": Payload()}, f)
    with pytest.raises(CheckpointError, match="unsafe or unsupported pickle content"):
        finetune(out=str(out), resume=True, max_steps=2, progress=False)
    assert not MARKER.exists()


def test_corrupt_state_files_give_one_line_errors(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        runs.read_state_json(tmp_path / "trainer_state.json")
    (tmp_path / "optimizer.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        runs.load_tensors(tmp_path / "optimizer.pt")


def test_random_states_round_trip_through_tensors_and_json(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    tensors, saved = runs.capture_rng()
    torch.save(tensors, tmp_path / "rng.pt")
    saved = json.loads(json.dumps(saved))
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    runs.restore_rng(runs.load_tensors(tmp_path / "rng.pt"), saved)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_logs_truncate_on_resume_and_plot_atomically(tmp_path):
    run = Run(tmp_path / "run")
    run.start({})
    for step in range(1, 6):
        run.append(runs.METRICS, {"step": step, "loss": 5.0 - step / 2})
    run.append(runs.METRICS, {"step": 5, "val_loss": 3.0, "val_ppl": 20.1})
    run.append(runs.SAMPLES, {"step": 5, "text": "x", "memorized": False})
    run.truncate_logs(3)
    assert [r["step"] for r in run.records()] == [1, 2, 3]
    assert run.records(runs.SAMPLES) == []
    run.plot()
    assert (run.path / runs.PLOT).read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in run.path.iterdir() if ".partial-" in p.name]



def test_last_good_skips_checkpoints_whose_weights_are_not_finite(tmp_path):
    run = Run(tmp_path / "run")
    one, two, three = save(run, 1), save(run, 2, value=float("nan")), save(run, 3, value=float("inf"))
    assert run.last_good(three) == one and run.last_good(two) == one and run.last_good(one) == one
    assert run.last_good(None) is None
    (one / "model.safetensors").write_bytes(b"\x00" * 7)  # unreadable is not good either
    assert run.last_good(three) is None
    assert runs.nonfinite([torch.ones(2), torch.tensor([1.0, float("inf")])]) == float("inf")
    assert str(runs.nonfinite([torch.tensor([float("inf")]), torch.tensor([float("nan")])])) == "nan"
    assert runs.nonfinite([torch.ones(2), torch.arange(3)]) is None


@pytest.mark.parametrize("error", [
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    OSError(errno.EIO, "Input/output error")])
def test_a_write_failure_with_less_room_than_needed_is_a_full_disk(tmp_path, monkeypatch, error):
    """Only open() says ENOSPC: a failed write with less free space than the checkpoint needs is
    reported as a full disk, with the space needed (its tensors' size, the model's included)."""
    run = Run(tmp_path / "run")
    good = save(run, 1)

    def failing(folder: Path) -> None:
        raise error
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * GB, 9 * GB, GB))
    rng, _ = runs.capture_rng()
    with pytest.raises(RunFolderError) as e:
        run.save(2, failing, {}, rng, {}, model_bytes=2 * GB)
    assert str(e.value) == (f"could not save checkpoint {run.checkpoints / 'step-0000002'}: no space left on "
                            f"device (1.00 GB free on the disk holding {run.path}, the checkpoint needs about "
                            f"2.00 GB); the last good checkpoint is {good}")
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * GB, GB, 9 * GB))
    with pytest.raises(RunFolderError, match="step-0000002: (Error while serializing|Input/output error)"):
        run.save(2, failing, {}, rng, {}, model_bytes=2 * GB)
    assert list(run.checkpoints.iterdir()) == [good]


def test_torch_saves_failed_write_is_an_os_error(tmp_path, monkeypatch):
    def unexpected_pos(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534\nframe #0: ...")
    monkeypatch.setattr(runs.torch, "save", unexpected_pos)
    with pytest.raises(OSError, match=r"could not write optimizer.pt \(\[enforce fail .* 576 vs 534\)$"):
        runs.write_tensors({}, tmp_path / "optimizer.pt")
    assert runs.tensor_bytes({"a": torch.ones(3), "b": [torch.ones(2, dtype=torch.float16), 7], "c": "x"}) == 16


def test_a_torn_last_log_line_is_dropped_with_a_notice(tmp_path):
    run = Run(tmp_path / "run")
    run.start({})
    run.append(runs.METRICS, {"step": 1, "loss": 2.0})
    with open(run.path / runs.METRICS, "ab") as f:
        f.write(b'{"step": 2, "lo')
    notes = []
    assert run.records(warn=notes.append) == [{"step": 1, "loss": 2.0}]
    assert notes == [f"dropped the torn last line of {run.path / runs.METRICS} (line 2: the run stopped while "
                     "writing it)"]
    (run.path / ".metrics.jsonl.partial-0123abcd").write_text("{}")
    run.truncate_logs(5, warn=notes.append)
    assert [p.name for p in run.path.iterdir() if p.name.startswith(".")] == []
    assert (run.path / runs.METRICS).read_text() == '{"step": 1, "loss": 2.0}\n'
    for bad in (b"[1, 2]", b"not json"):  # anywhere but at the end: not a torn write, so not dropped
        (run.path / runs.METRICS).write_bytes(bad + b'\n{"step": 1}\n')
        with pytest.raises(RunFolderError, match=r"metrics.jsonl line 1 is not a JSON object; delete that line"):
            run.records()
