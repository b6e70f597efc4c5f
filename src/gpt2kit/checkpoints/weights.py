"""Reading tensors out of weights files, treating every file as untrusted input.

Formats: safetensors (preferred: no code can run), PyTorch pickles (`.bin`, `.pt`) through
`torch.load(weights_only=True)` only (a pickle can run any code; torch >= 2.10 for
CVE-2026-24747), and sharded checkpoints whose `*.index.json` names the shard files. Shard names
come from the model's own metadata, so each must stay inside the model folder (a crafted index
must not make gpt2kit read files elsewhere, CWE-22). Writing: `save_safetensors`.

Tensors are yielded one at a time, in the file's dtype on the CPU, so the caller can convert and
place each before reading the next: at most one tensor beyond the final model is held at once.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import default_permissions
from ..errors import CheckpointError

# A folder's weights, in order of preference: safetensors first (no code can run), then the pickles.
WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# What torch.load raises on damaged bytes: its zip reader (RuntimeError), short reads (EOFError,
# OSError), and the restricted unpickler running a corrupt opcode stream (IndexError "pop from
# empty list", KeyError on a missing memo entry, UnicodeDecodeError, struct.error, its own asserts
# such as "saved_id must be a tuple"; found by tests/test_fuzz_loaders.py). Code it refuses is
# pickle.UnpicklingError, caught before these.
UNREADABLE = (RuntimeError, OSError, EOFError, ValueError, LookupError, TypeError, AttributeError,
              ArithmeticError, AssertionError, struct.error, MemoryError)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write `tensors` as a safetensors file with the permissions of any other new file."""
    save_file(tensors, path, metadata={"format": "pt"})
    default_permissions(path)


def printable(name: str) -> str:
    """A name read from a file, fit for a one-line message: control characters (a newline in a
    tensor name) escaped."""
    return name if name.isprintable() else repr(name)[1:-1]


def corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is truncated or corrupt ({_one_line(why)})")


def _one_line(text: str) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else "unreadable"
    return line[:200]


def read_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(path, f"not valid JSON: {e}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def find_weights(folder: Path) -> Path:
    """The weights file (or shard index) of a Hugging Face-layout folder, safetensors first."""
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"no weights found in {folder}: looked for {', '.join(WEIGHT_NAMES)}")


def weight_files(path: Path) -> list[Path]:
    """The files holding the tensors: the shards an index names, or the file itself."""
    if not path.name.endswith(".index.json"):
        return [path]
    index = read_json(path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise corrupt(path, "no 'weight_map' of tensor names to shard files")
    suffix = ".safetensors" if path.name.endswith(".safetensors.index.json") else ".bin"
    shards = dict.fromkeys(weight_map.values())  # unique, in order of first mention
    return [_shard_path(path, name, suffix) for name in shards]


def _shard_path(index: Path, name: str, suffix: str) -> Path:
    """`name` joined onto the index's folder, refused unless it stays inside that folder.

    The check is lexical on purpose: in the hub cache a snapshot's files are symlinks into
    `../../blobs/`, so resolving symlinks would reject every legitimate cached shard.
    """
    folder = index.parent
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if (not name or "\\" in name or "\0" in name or posix.is_absolute() or windows.is_absolute()
            or windows.drive or ".." in posix.parts):
        raise CheckpointError(f"{index} names the shard {name!r}, which is outside the model folder "
                              f"{folder}; refusing to read it")
    if not name.endswith(suffix):
        raise CheckpointError(f"{index} names the shard {name!r}; expected a {suffix} file")
    shard = folder / posix
    if not shard.is_file():
        raise CheckpointError(f"{index} names the shard {name!r}, which is missing from {folder}")
    return shard


def read_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, reading as little as the format allows."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        if path.suffix == ".safetensors":
            with _safe_open(path) as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        else:
            shapes.update({k: tuple(t.shape) for k, t in _torch_load(path).items()})
    return shapes


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor in the file's dtype) for every tensor, one at a time."""
    for path in files:
        if path.suffix == ".safetensors":
            with _safe_open(path) as f:
                for key in f.keys():
                    try:
                        tensor = f.get_tensor(key)
                    except SafetensorError as e:
                        raise corrupt(path, f"tensor {printable(key)}: {e}") from None
                    yield key, tensor
        else:
            yield from _torch_load(path).items()


def _safe_open(path: Path):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except SafetensorError as e:  # bad header, header past EOF, data not covering the tensors
        raise corrupt(path, str(e)) from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    state = load_pickle(path)
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path} does not hold a flat dictionary of named tensors "
                              "(a Hugging Face-style state dict); convert it to safetensors")
    return state


def load_pickle(path: Path, fix: str = "convert it to safetensors") -> object:
    """A PyTorch pickle through torch.load(weights_only=True): tensors, containers and plain values,
    never code. `fix` ends the message when the file holds anything else."""
    # mmap keeps a zip-format file's tensors on disk until they are converted; the legacy
    # (non-zip) format cannot be mapped but goes through the same restricted unpickler.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:  # weights_only met a global it does not allow: code, not data
        raise CheckpointError(f"unsafe or unsupported pickle content in {path}; {fix}") from None
    except PermissionError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    except UNREADABLE as e:
        raise corrupt(path, f"{type(e).__name__}: {e}") from None


def describe_dtypes(dtypes: set[torch.dtype]) -> str:
    """"float32", or "bfloat16+float32" for a file that mixes dtypes."""
    return "+".join(sorted(str(d).removeprefix("torch.") for d in dtypes)) or "none"

