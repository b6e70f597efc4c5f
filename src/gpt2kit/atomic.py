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
