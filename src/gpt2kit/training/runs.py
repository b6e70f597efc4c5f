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
import logging
import math
import os
import pickle
import random
import re
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..atomic import atomic_folder, remove_folder, remove_stale, write_atomically
from ..checkpoints.weights import UNREADABLE
from ..errors import CheckpointError, Gpt2kitError
from .memory import gb

RUN_FILE, METRICS, SAMPLES, PLOT = "run.json", "metrics.jsonl", "samples.jsonl", "loss.png"
STATE, OPTIMIZER, RNG, COMPLETE = "trainer_state.json", "optimizer.pt", "rng.pt", "COMPLETE"
TRAINER_FILES = (STATE, OPTIMIZER, RNG, COMPLETE)
WEIGHTS = ("model.safetensors", "adapter_model.safetensors")
STEP_DIR = re.compile(r"step-(\d+)")

log = logging.getLogger("gpt2kit.training")


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

    def last_good(self, newest: Path | None) -> Path | None:
        """`newest` if its weights are all finite, else the newest complete checkpoint before it
        whose weights are: a checkpoint named as good after a NaN stop must load as a usable model."""
        if newest is None:
            return None
        last = int(STEP_DIR.fullmatch(newest.name)[1])
        for step, folder in reversed(self.step_dirs()):
            if step <= last and not missing_files(folder) and saved_weights_finite(folder):
                return folder
        return None

    def save(self, step: int, write_model, optimizer_state: dict, rng: dict[str, torch.Tensor],
             state: dict, model_bytes: int = 0) -> Path:
        """Write checkpoint `step` atomically and return its folder. `write_model(folder)` writes
        the model or adapter files (about `model_bytes` bytes). On any write error the partial folder
        is removed and a one-line RunFolderError names the path, the free space, the space the
        checkpoint needs and the last good checkpoint."""
        final = self.checkpoints / f"step-{step:07d}"
        previous = self.latest()
        try:
            with atomic_folder(final) as tmp:
                write_model(tmp)
                write_tensors(optimizer_state, tmp / OPTIMIZER)
                write_tensors(rng, tmp / RNG)
                write_json(tmp / STATE, state)
                (tmp / COMPLETE).write_text(f"step {step}\n")  # last: its presence vouches for the rest
        except (OSError, CheckpointError, SafetensorError) as e:
            need = model_bytes + tensor_bytes(optimizer_state) + tensor_bytes(rng)
            raise self._save_error(final, e, previous, need) from None
        return final

    def _save_error(self, final: Path, e: Exception, previous: Path | None, need: int) -> RunFolderError:
        """One line: why, how much room there is and is needed, and what is still good. Writers
        other than open() do not say ENOSPC (safetensors' SafetensorError, torch.save's "unexpected
        pos"), so a write that failed with less room left than the checkpoint needs is a full disk too."""
        why = e.strerror if isinstance(e, OSError) and e.strerror else _first_line(e)
        try:
            free = shutil.disk_usage(self.path).free
        except OSError:
            free = None
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or (free is not None and free < need):
            why = "no space left on device"
        room = f"{gb(free)} free" if free is not None else "free space unknown"
        keep = f"the last good checkpoint is {previous}" if previous else "no checkpoint was saved before"
        return RunFolderError(f"could not save checkpoint {final}: {why} ({room} on the disk holding "
                              f"{self.path}, the checkpoint needs about {gb(need)}); {keep}")

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

    def records(self, name: str = METRICS, warn=log.warning) -> list[dict]:
        """The log's records. A run killed while appending leaves a torn last line: it is dropped,
        with a `warn`ing; a bad line anywhere else is a RunFolderError naming it."""
        path = self.path / name
        if not path.is_file():
            return []
        lines = [(n, line) for n, line in enumerate(path.read_bytes().split(b"\n"), 1) if line.strip()]
        found = []
        for n, line in lines:
            record = _json_object(line)
            if record is not None:
                found.append(record)
            elif n == lines[-1][0]:
                warn(f"dropped the torn last line of {path} (line {n}: the run stopped while writing it)")
            else:
                raise RunFolderError(f"{path} line {n} is not a JSON object; delete that line and retry")
        return found

    def truncate_logs(self, step: int, warn=log.warning) -> None:
        """On resume: remove what writers killed outright left behind (the logs' and checkpoints'
        temporaries), then drop log lines written after checkpoint `step` (they will be written again)."""
        self.remove_partials()
        for name in (METRICS, SAMPLES):
            if (self.path / name).is_file():
                kept = [r for r in self.records(name, warn) if r.get("step", 0) <= step]
                text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
                write_atomically(self.path / name, lambda p: p.write_text(text, encoding="utf-8"))

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


def _json_object(line: bytes) -> dict | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(src, dst)


# ---- files ---------------------------------------------------------------------------------

def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_tensors(obj, path: Path) -> None:
    """torch.save of tensors in plain containers (read back with weights_only=True). Its writer
    reports a failed write (a full disk among them) as RuntimeError "[enforce fail at
    inline_container.cc...] unexpected pos": raised here as the OSError it is."""
    try:
        torch.save(obj, path)
    except RuntimeError as e:
        raise OSError(errno.EIO, f"could not write {path.name} ({_first_line(e)})") from None


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in `obj` (nested dicts, lists and tuples): what saving it takes on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(x) for x in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(x) for x in obj)
    return 0


def nonfinite(tensors) -> float | None:
    """NaN if any floating tensor in `tensors` holds a NaN, else inf if one holds an infinity, else None."""
    found = None
    for t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            if bool(torch.isnan(t).any()):
                return math.nan
            found = math.inf
    return found


def saved_weights_finite(folder: Path) -> bool:
    """Whether the model (or adapter) weights a checkpoint holds are all finite, read one tensor at a time."""
    path = next(folder / name for name in WEIGHTS if (folder / name).is_file())
    try:
        with safe_open(path, framework="pt") as f:
            return all(nonfinite([f.get_tensor(key)]) is None for key in f.keys())
    except (OSError, SafetensorError):
        return False  # unreadable is not good either


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
    except UNREADABLE as e:  # what the restricted unpickler raises on damaged bytes (fuzzed)
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
