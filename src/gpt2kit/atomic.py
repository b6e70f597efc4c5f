"""Writing files and folders so that readers see the old version or the new one, never half of either.

Every file and folder gpt2kit writes for a user goes through here: models, checkpoints, run files,
adapters, samples, plots, GGUF files and the tokenized-data cache. The new content is written
under a hidden name beside its destination (`.NAME.partial-1a2b3c4d`), flushed to disk and renamed
into place. A crash, Ctrl-C or full disk mid-write leaves at most that temporary, which is removed
on the way out, or by `remove_stale` after a process was killed outright (SIGKILL runs no cleanup).

A rename cannot replace a folder that holds files, so an existing folder is first renamed aside
(`.NAME.old-1a2b3c4d`), the new one renamed in, and the old one deleted. Between the two renames
NAME is missing but the old copy is whole; `remove_stale` puts it back if a crash struck there.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

PARTIAL, OLD = "partial", "old"  # being written (garbage if left) / replaced, on its way out
# Names made by `_hidden`; nothing else is ever deleted or restored by `remove_stale`.
HIDDEN = re.compile(rf"\.(?P<name>.+)\.(?P<kind>{PARTIAL}|{OLD})-[0-9a-f]{{8}}")


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` beside `path`, flushed to disk, then renamed over `path`."""
    tmp = _hidden(path, PARTIAL)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(folder: Path, keep: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a new, empty hidden folder beside `folder` to write into; when the block ends, flush
    it to disk and rename it to `folder`. An existing `folder` is replaced (see the module doc),
    unless `keep(folder)` says it is already good: then it stays and the new one is dropped (for
    entries other processes may publish too, such as the data cache). On any error, and on
    Ctrl-C, the hidden folder is removed and the exception goes on."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden(folder, PARTIAL)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _publish(tmp, folder, keep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once published


def remove_folder(folder: Path) -> None:
    """Delete `folder`, renaming it to a hidden name first so it never looks half-deleted."""
    trash = _hidden(folder, PARTIAL)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale(folder: Path) -> None:
    """Clear what writers killed outright left in `folder`: `.NAME.partial-*` are deleted; a
    `.NAME.old-*` is deleted if NAME exists, else renamed back to NAME (the last whole version).
    Only for a folder no other process is writing to: their temporaries would look stale too."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if not (m := HIDDEN.fullmatch(path.name)):
            continue
        final = folder / m["name"]
        if m["kind"] == OLD and not final.exists():
            os.replace(path, final)
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def default_permissions(path: Path) -> None:
    """Give `path` the mode a newly created file gets in this process (0o666 less the umask).
    safetensors creates its files 0600, so a saved model would otherwise be unreadable to the
    other users and services (a server, a container) that read everything else gpt2kit writes."""
    os.chmod(path, 0o666 & ~_umask())


def _hidden(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}")


def _publish(tmp: Path, folder: Path, keep: Callable[[Path], bool] | None) -> None:
    try:
        os.replace(tmp, folder)  # nothing there yet (or an empty folder): one rename
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if keep is not None and keep(folder):
        return
    old = _hidden(folder, OLD)
    os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask can only read it by setting it)
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _fsync_tree(folder: Path) -> None:
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
