"""Writing a file so that readers see the old version or the new one, never half of either.

Used for every file gpt2kit writes for a user (samples, run files, adapters, plots): a crash,
Ctrl-C or full disk mid-write leaves at most a hidden temporary file, which is removed.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` beside `path`, flushed to disk, then renamed over `path`."""
    tmp = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def default_permissions(path: Path) -> None:
    """Give `path` the mode a newly created file gets in this process (0o666 less the umask).
    safetensors creates its files 0600, so a saved model would otherwise be unreadable to the
    other users and services (a server, a container) that read everything else gpt2kit writes."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask can only read it by setting it)
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def fsync_tree(folder: Path) -> None:
    """Flush every file in `folder`, and the folder itself, to disk before a rename publishes it."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
