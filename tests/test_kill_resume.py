"""`kill -9` during fine-tuning (issue 17): `gpt2kit finetune --save-every 1` runs in a subprocess
and is killed outright at several moments: in the middle of writing a checkpoint, in the middle of
making one the run folder's model, just after one is published, at random points between. After
each kill the run folder loads, holds the weights of a complete checkpoint, and `--resume` continues
from the newest complete checkpoint; the last resume ends with the weights and losses of a run
that was never interrupted, bit for bit.

The child widens the moments it is killed in by sleeping inside the run folder's writers (a
seam patched in the child only: the files written are the same), so each kill lands where it is
meant to, not by luck of timing.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gpt2kit
from gpt2kit.training import runs

STEPS = 30  # enough steps that the random kills below land before the end, even on a fast machine
# Runs gpt2kit's CLI after slowing one writer of the run folder down: "write" sleeps after each
# tensor file of a checkpoint (optimizer.pt, rng.pt), "publish" after each top-level file is linked.
CHILD = """
import sys, time
from gpt2kit.cli import main
from gpt2kit.training import runs
where, pause = sys.argv[1], float(sys.argv[2])
name = {"write": "write_tensors", "publish": "_link_or_copy", "none": None}[where]
if name:
    original = getattr(runs, name)
    def slowed(*args):
        original(*args)
        time.sleep(pause)
    setattr(runs, name, slowed)
sys.exit(main(sys.argv[3:]))
"""


class Finetune:
    """One run folder, trained by successive child processes."""

    def __init__(self, tmp: Path, model: Path, data: Path, dtype: str = "float32"):
        self.out, self.logs = tmp / "run", tmp / "logs"
        self.logs.mkdir()
        self.options = ["--out", str(self.out), "--max-steps", str(STEPS), "--save-every", "1",
                        "--keep-checkpoints", "2", "--batch-size", "2", "--block-size", "32",
                        "--eval-every", "0", "--eval-batches", "1", "--sample-every", "0",
                        "--device", "cpu", "--dtype", dtype, "--learning-rate", "1e-3",
                        "--log-every", "1"]
        self.first = ["finetune", str(data), "--column", "Joke", "-m", str(model),
                      "--cache-dir", str(tmp / "cache")]
        self.count = 0
        self.env = {**os.environ, "PYTHONPATH": str(Path(gpt2kit.__file__).parents[1])}

    def start(self, where: str = "none", pause: float = 0.0) -> subprocess.Popen:
        resume = ["finetune", "--resume"] if (self.out / runs.RUN_FILE).exists() else self.first
        self.count += 1
        log = open(self.logs / f"{self.count}.txt", "w")
        proc = subprocess.Popen([sys.executable, "-c", CHILD, where, str(pause), *resume, *self.options],
                                stdout=subprocess.DEVNULL, stderr=log, env=self.env)
        proc.log = self.logs / f"{self.count}.txt"
        return proc

    def kill_when(self, proc: subprocess.Popen, ready, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, f"the run ended before the moment to kill it: {proc.log.read_text()}"
            assert time.monotonic() < deadline, "the moment to kill never came"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL

    # ---- moments -----------------------------------------------------------------------------

    def complete_step(self) -> int:
        latest = runs.Run(self.out).latest()
        return int(runs.STEP_DIR.fullmatch(latest.name)[1]) if latest else 0

    def hidden(self, folder: Path, prefix: str) -> list[Path]:
        try:
            return [p for p in folder.iterdir() if p.name.startswith(prefix) and ".partial-" in p.name]
        except FileNotFoundError:
            return []

    def writing_checkpoint(self, after: int, with_file: str | None = None):
        """A checkpoint past step `after` is being written (holding `with_file` already)."""
        return lambda: self.complete_step() > 0 and any(
            with_file is None or (p / with_file).is_file()
            for p in self.hidden(self.out / "checkpoints", ".step-") if int(p.name[6:13]) > after)

    def publishing_weights(self, after: int):
        """The run folder's model.safetensors is being replaced by a checkpoint's past step `after`."""
        return lambda: self.complete_step() > after and bool(self.hidden(self.out, ".model.safetensors."))

    def published(self, after: int):
        return lambda: self.complete_step() > after


def weights_bytes(folder: Path) -> str:
    """The weights file's digest (compared, not the bytes: pytest's diff of two MB-long byte
    strings runs for minutes)."""
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def check_after_kill(run: Finetune) -> int:
    """The run folder loads and its model is one complete checkpoint's; the newest complete step."""
    folder = runs.Run(run.out)
    latest = folder.latest()
    assert latest is not None
    model = gpt2kit.load(str(run.out), device="cpu")
    assert model.info()["layers"] == 2
    complete = [p for _, p in folder.step_dirs() if not runs.missing_files(p)]
    assert weights_bytes(run.out) in {weights_bytes(p) for p in complete}
    return run.complete_step()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: autocast, 16-bit dropout masks
def test_kill_9_at_many_moments_then_resume_to_the_same_end(tiny_folder, jokes_csv, tmp_path, dtype):
    (tmp_path / "ref").mkdir()
    (tmp_path / "killed").mkdir()
    reference = Finetune(tmp_path / "ref", tiny_folder, jokes_csv, dtype)
    straight = reference.start()
    run = Finetune(tmp_path / "killed", tiny_folder, jokes_csv, dtype)
    rng = random.Random(17)
    checkpoints = run.out / "checkpoints"
    moments = [  # (what is slowed, for how long, when to kill given the newest complete step, a
        # file left half-written that shows the kill came at that moment)
        ("write", 0.5, lambda s: run.writing_checkpoint(s, with_file=runs.OPTIMIZER), (checkpoints, ".step-")),
        ("publish", 0.3, lambda s: run.publishing_weights(s), (run.out, ".model.safetensors.")),
        ("none", 0.0, lambda s: run.published(s + 1), None),  # just after a checkpoint appears
        ("write", 0.5, lambda s: run.writing_checkpoint(s), (checkpoints, ".step-")),  # folder just made
        ("none", 0.0, lambda s: random_delay(run.published(s), rng.uniform(0.0, 0.5)), None),
        ("none", 0.0, lambda s: random_delay(run.published(s), rng.uniform(0.0, 0.5)), None),
    ]
    step = 0
    for i, (where, pause, moment, left) in enumerate(moments):
        proc = run.start(where, pause)
        run.kill_when(proc, moment(step))
        if i:  # each resume said where it continued from: the newest complete checkpoint then
            assert f"resuming from {checkpoints / f'step-{step:07d}'} at step {step}" in proc.log.read_text()
        assert left is None or run.hidden(*left), f"kill {i} came after the write it was meant to interrupt"
        step = check_after_kill(run)
    assert ("bfloat16 autocast" in (run.logs / "1.txt").read_text()) == (dtype == "bfloat16")  # the path asked for
    last = run.start()
    assert last.wait(timeout=600) == 0, last.log.read_text()
    assert f"at step {step}" in last.log.read_text()
    assert not run.hidden(checkpoints, ".step-") and not run.hidden(run.out, ".model.safetensors.")
    assert straight.wait(timeout=600) == 0, straight.log.read_text()
    assert run.complete_step() == STEPS
    assert weights_bytes(run.out) == weights_bytes(reference.out)
    losses = [[(r["step"], r["loss"]) for r in runs.Run(f.out).records() if "loss" in r] for f in (run, reference)]
    assert losses[0] == losses[1] and len(losses[0]) == STEPS


@pytest.mark.slow
def test_kill_9_during_the_first_publish_then_resume(tiny_folder, jokes_csv, tmp_path):
    """Killed after the first checkpoint's config.json reached the top level, before its weights:
    the run folder is refused in one line naming the files looked for, and --resume makes the top
    level whole again before its first step (the checkpoint it continues from, published again)."""
    run = Finetune(tmp_path, tiny_folder, jokes_csv)
    proc = run.start("publish", 5.0)
    run.kill_when(proc, lambda: (run.out / "config.json").is_file())
    assert not (run.out / "model.safetensors").exists() and run.complete_step() == 1
    refused = subprocess.run([sys.executable, "-m", "gpt2kit", "generate", "-m", str(run.out), "Hi"],
                             capture_output=True, text=True, env=run.env, timeout=120)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "no weights found" in refused.stderr and "model.safetensors" in refused.stderr
    first = weights_bytes(run.out / "checkpoints" / "step-0000001")
    resumed = run.start("none")
    run.kill_when(resumed, lambda: (run.out / "model.safetensors").is_file())
    assert "resuming from" in resumed.log.read_text()
    assert weights_bytes(run.out) == first  # not the next checkpoint's: published before any step
    check_after_kill(run)


def random_delay(ready, seconds: float):
    """`ready`, then `seconds` more: a kill at a random point of the steps that follow."""
    since: list[float] = []

    def check() -> bool:
        if not since and ready():
            since.append(time.monotonic())
        return bool(since) and time.monotonic() - since[0] >= seconds
    return check
