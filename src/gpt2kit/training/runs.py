"""The run folder: everything a training run writes, laid out so nothing is ever half-written.

    <out>/
      run.json                  the settings (TrainConfig, data options, model): --resume reads them
      config.json, model.safetensors, generation_config.json, tokenizer files
                                the latest saved weights, a Hugging Face model folder (LoRA runs:
                                adapter_config.json + adapter_model.safetensors instead, plus the
                                merged model's files when --merge-lora)
      metrics.jsonl             one JSON object per line: training steps and evaluations
      samples.jsonl             samples written during training, with a `memorized` flag
      loss.png                  training and validation loss, redrawn at each evaluation
      checkpoints/step-0000500/ the model (or adapter) files, optimizer.pt, rng.pt,
                                trainer_state.json, and COMPLETE, written last

A checkpoint is written into a hidden temporary folder, flushed to disk and renamed into place
so a crash leaves the previous checkpoints untouched; the top-level model files are
hard links to the newest checkpoint's, each swapped in with one rename. That is enough for a
reader of the top level never to see a mix of two models: within a run only the weights file
changes from one checkpoint to the next (config, tokenizer and generation config are fixed by what
--resume checks), and it is swapped in last. Resume reads tensors only through
`torch.load(weights_only=True)` and state as JSON: no pickled objects, so a crafted checkpoint cannot run code.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_folder, remove_folder, remove_stale, write_atomically
from ..errors import CheckpointError, Gpt2kitError

RUN_FILE, METRICS, SAMPLES, PLOT = "run.json", "metrics.jsonl", "samples.jsonl", "loss.png"
STATE, OPTIMIZER, RNG, COMPLETE = "trainer_state.json", "optimizer.pt", "rng.pt", "COMPLETE"
TRAINER_FILES = (STATE, OPTIMIZER, RNG, COMPLETE)
WEIGHTS = ("model.safetensors", "adapter_model.safetensors")
STEP_DIR = re.compile(r"step-(\d+)")


class RunFolderError(Gpt2kitError):
    """The run folder cannot be used as asked (exists, has nothing to resume, disk full, ...)."""


class Run:
    """A run folder. Only the main process (rank 0) writes to it."""

    def __init__(self, out: str | Path):
        self.path = Path(out).expanduser().absolute()
        self.checkpoints = self.path / "checkpoints"

    # ---- opening --------------------------------------------------------------------------

    def check_usable(self, resume: bool) -> None:
        """Never overwrite silently: a new run needs a new or empty folder; --resume needs a run."""
        is_run = (self.path / RUN_FILE).is_file()
        if resume and not is_run:
            raise RunFolderError(f"nothing to resume in {self.path}: it holds no training run "
                                 f"({RUN_FILE} not found); drop --resume to start one")
        if not resume and is_run:
            raise RunFolderError(f"{self.path} already holds a training run; pass --resume to "
                                 "continue it, or choose another --out")
        if not resume and self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise RunFolderError(f"--out {self.path} exists and is not an empty folder; choose "
                                 "another --out (gpt2kit never overwrites other files)")

    def start(self, settings: dict) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path / RUN_FILE, lambda p: write_json(p, settings))
        except OSError as e:
            raise RunFolderError(f"could not create the run folder {self.path}: {e.strerror or e}") from None

    def settings(self) -> dict:
        return read_state_json(self.path / RUN_FILE)

    # ---- checkpoints ----------------------------------------------------------------------

    def step_dirs(self) -> list[tuple[int, Path]]:
        """(step, folder) of every finally-named checkpoint folder, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m[1]), p) for p in self.checkpoints.iterdir()
                 if p.is_dir() and (m := STEP_DIR.fullmatch(p.name))]
        return sorted(found)

    def latest(self, warn=lambda message: None) -> Path | None:
        """The newest complete checkpoint; incomplete ones are skipped with a warning (a crash may leave one half-written)."""
        for step, folder in reversed(self.step_dirs()):
            missing = missing_files(folder)
            if not missing:
                return folder
            warn(f"skipping incomplete checkpoint {folder} (missing {', '.join(missing)})")
        return None

    def save(self, step: int, write_model, optimizer_state: dict, rng: dict[str, torch.Tensor],
             state: dict) -> Path:
        """Write checkpoint `step` atomically and return its folder. `write_model(folder)` writes
        the model or adapter files. On any write error the partial folder is removed and a
        one-line RunFolderError names the path, the free space and the last good checkpoint."""
        final = self.checkpoints / f"step-{step:07d}"
        previous = self.latest()
        try:
            with atomic_folder(final) as tmp:
                write_model(tmp)
                write_tensors(optimizer_state, tmp / OPTIMIZER)
                write_tensors(rng, tmp / RNG)
                write_json(tmp / STATE, state)
                (tmp / COMPLETE).write_text(f"step {step}\n")  # last: its presence vouches for the rest
        except (OSError, CheckpointError) as e:
            raise self._save_error(final, e, previous) from None
        return final

    def _save_error(self, final: Path, e: Exception, previous: Path | None) -> RunFolderError:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            why = "no space left on device"
        try:
            free = f"{shutil.disk_usage(self.path).free / 1024**3:.2f} GB free"
        except OSError:
            free = "free space unknown"
        keep = f"the last good checkpoint is {previous}" if previous else "no checkpoint was saved before"
        return RunFolderError(f"could not save checkpoint {final}: {why} ({free}); {keep}")

    def publish(self, folder: Path, move: bool = False) -> None:
        """Make `folder`'s model files the run folder's top level, one atomic rename per file:
        hard links to the checkpoint's files (no extra disk), or moved when `move`."""
        for src in sorted(folder.iterdir(), key=lambda p: p.name in WEIGHTS):  # weights last
            if src.name in TRAINER_FILES or not src.is_file():
                continue
            place = partial(os.replace if move else _link_or_copy, src)
            try:
                write_atomically(self.path / src.name, place)
            except OSError as e:
                raise RunFolderError(f"could not update {self.path / src.name}: {e.strerror or e}") from None

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep` complete checkpoints, and stale partial folders."""
        complete = [p for _, p in self.step_dirs() if not missing_files(p)]
        for folder in complete[:-keep]:
            remove_folder(folder)
        self.remove_partials()

    def remove_partials(self) -> None:
        """What a killed save left behind (atomic.remove_stale); only rank 0 writes here."""
        remove_stale(self.checkpoints)
        remove_stale(self.path)

    # ---- logs -----------------------------------------------------------------------------

    def records(self, name: str = METRICS) -> list[dict]:
        path = self.path / name
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_logs(self, step: int) -> None:
        """On resume, drop log lines written after checkpoint `step` (they will be written again)."""
        for name in (METRICS, SAMPLES):
            if (self.path / name).is_file():
                kept = [r for r in self.records(name) if r.get("step", 0) <= step]
                text = "".join(json.dumps(r) + "\n" for r in kept)
                write_atomically(self.path / name, lambda p: p.write_text(text))

    def append(self, name: str, record: dict) -> None:
        try:
            with open(self.path / name, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        except OSError as e:
            raise RunFolderError(f"could not write {self.path / name}: {e.strerror or e}") from None

    def plot(self) -> None:
        """Redraw loss.png from metrics.jsonl (matplotlib's Agg canvas: no display, no pyplot state)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        records = self.records()
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        fig = Figure(figsize=(7, 4), dpi=100)
        ax = fig.add_subplot()
        if train:
            ax.plot(*zip(*train), lw=0.8, alpha=0.7, label="train loss")
        if val:
            ax.plot(*zip(*val), "o-", lw=1.5, label="validation loss")
        ax.set(xlabel="step", ylabel="loss (nats per token)", title=self.path.name)
        ax.grid(alpha=0.3)
        ax.legend()
        FigureCanvasAgg(fig)
        try:
            write_atomically(self.path / PLOT, lambda p: fig.savefig(p, format="png", bbox_inches="tight"))
        except OSError as e:
            raise RunFolderError(f"could not write {self.path / PLOT}: {e.strerror or e}") from None


def missing_files(folder: Path) -> list[str]:
    missing = [name for name in TRAINER_FILES if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHTS):
        missing.append(" or ".join(WEIGHTS))
    return missing


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(src, dst)


# ---- files ---------------------------------------------------------------------------------

def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_tensors(obj, path: Path) -> None:
    """torch.save of tensors in plain containers (read back with weights_only=True)."""
    torch.save(obj, path)


def read_state_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable or corrupt ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is corrupt (expected a JSON object)")
    return data


def load_tensors(path: Path):
    """The restricted unpickler only (loading must never run code): tensors, numbers, strings and containers."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"unsafe or unsupported pickle content in {path}; "
                              "convert it to safetensors") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({str(e).splitlines()[0][:200]})") from None


# ---- random states -------------------------------------------------------------------------

def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """Every random stream training draws from, as tensors (rng.pt) and JSON (trainer_state)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, py_gauss = random.getstate()
    return tensors, {"python": [version, list(internal), py_gauss],
                     "numpy": [kind, int(pos), int(has_gauss), float(gauss)]}


def restore_rng(tensors: dict, saved: dict) -> None:
    try:
        torch.set_rng_state(tensors["torch_cpu"])
        cuda = sorted(k for k in tensors if k.startswith("torch_cuda_"))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensors[k] for k in cuda][:torch.cuda.device_count()])
        kind, pos, has_gauss, gauss = saved["numpy"]
        keys = tensors["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state((str(kind), keys, int(pos), int(has_gauss), float(gauss)))
        version, internal, py_gauss = saved["python"]
        if not all(isinstance(x, int) for x in internal):
            raise TypeError("python RNG state must be integers")
        random.setstate((int(version), tuple(internal), None if py_gauss is None else float(py_gauss)))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"the checkpoint's random state is corrupt ({e})") from None
