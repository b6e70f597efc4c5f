"""Reading text inputs and writing outputs for the commands: UTF-8 checked, written atomically."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import InputFileError


def read_lines(path: Path | None, noun: str) -> list[str] | None:
    """The non-empty lines of `path`, else of piped standard input; None if neither is given
    (standard input is a terminal). `noun` names a line in the error messages."""
    if path is not None:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InputFileError(f"cannot read {noun}s file {path}: {e.strerror}") from None
        text = decode_utf8(data, path)
    elif not sys.stdin.isatty():
        text = decode_utf8(sys.stdin.buffer.read(), "standard input")
    else:
        return None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise InputFileError(f"no {noun}s found in {path or 'standard input'} (one {noun} per non-empty line)")
    return lines


def decode_utf8(data: bytes, name) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputFileError(f"{name} is not valid UTF-8 at byte {e.start} (line {line}); "
                             "save it as UTF-8") from None


def write_output(path: Path, write) -> None:
    """`write(tmp)`, then the result renamed to `path` (see atomic.py); failures are one line."""
    from ..atomic import write_atomically
    try:
        write_atomically(path, write)
    except OSError as e:
        raise InputFileError(f"cannot write {path}: {e.strerror}") from None
