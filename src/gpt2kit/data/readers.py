"""Reading documents out of the input formats: plain text, CSV/TSV, JSON lines, a folder of .txt files.

It is kept apart from `prepare.py` (tokenizing, splitting, caching) because reading is where user files
enter: format detection by extension, decoding with errors that name the byte and line, and the
cutting of long texts into pieces. `prepare.py` imports from here, never the other way round.

Memory stays bounded, whatever the file's shape: files are read in chunks, and long documents are tokenized in
pieces cut where GPT-2's pre-tokenizer always starts a new pre-token: before a space between two
non-space characters (` ?\\p{L}+`, ` ?\\p{N}+`, ` ?[^\\s\\p{L}\\p{N}]+` each take one leading space),
or, in text without spaces such as Chinese, after a letter or digit followed by a character of
another class. So the pieces give exactly the tokens of the whole document; only a run of
MAX_PIECE_CHARS with no such place is cut anyway. A CSV/JSONL row is read whole.

Text is decoded strictly by default (a wrong encoding is an error, not silent mojibake), `\\r\\n` and `\\r` become `\\n`, and only `\\n` ends a
line: U+2028 and U+0085 are characters (str.splitlines would split on them; datasets#3910).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..chat import Message, to_messages
from ..errors import InputFileError, OptionError

if TYPE_CHECKING:  # annotations only
    from tqdm import tqdm

    from ..config import DataConfig


CHUNK_BYTES = 1 << 18  # read size
PIECE_CHARS = 1 << 16  # plain text is tokenized in pieces of about this many characters
MAX_PIECE_CHARS = 1 << 18  # text without a safe cut for this long is cut anyway (tokens may differ there)
MAX_FIELD_CHARS = 1 << 24  # csv's default field limit (131,072) is below a legitimate 1 MB row
_KINDS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
_KIND_NAMES = {"csv": "CSV", "tsv": "TSV", "jsonl": "JSON lines", "text": "plain text", "folder": "a folder"}
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def file_kind(path: Path) -> str:
    return "folder" if path.is_dir() else _KINDS.get(path.suffix.lower(), "text")


def existing_path(path: str, what: str = "data file") -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise InputFileError(f"{what} {p} does not exist")
    return p


def input_paths(cfg: DataConfig) -> list[Path]:
    """The training data, then the validation file if there is one; each must exist."""
    return [existing_path(cfg.path)] + ([existing_path(cfg.val_file, "validation file")] if cfg.val_file else [])


def check_input(cfg: DataConfig) -> None:
    """Fail fast, before a model is loaded or a token is cut, on a missing file, a wrong --column or
    --field, or no text at all, in the training or the validation data: a mistake costs seconds,
    not a model download. Reading the first piece of text runs every check a full read would."""
    read = conversations if cfg.format == "chat" else pieces
    for path, what in zip(input_paths(cfg), ("training", "validation")):
        if next(read(cfg, path), None) is None:
            raise InputFileError(f"no {what} text found in {path}: it holds no non-blank document")


def check_options(cfg: DataConfig, path: Path) -> None:
    kind = file_kind(path)
    wrong = {"column": kind not in ("csv", "tsv") and cfg.column is not None,
             "field": kind != "jsonl" and cfg.field is not None,
             "line_by_line": kind not in ("text", "folder") and cfg.line_by_line}
    for name, bad in wrong.items():
        if bad:
            applies = {"column": "CSV/TSV", "field": "JSONL", "line_by_line": "plain text"}[name]
            raise OptionError(name, f"applies to {applies} files only; {path} is read as {_KIND_NAMES[kind]}")


def pieces(cfg: DataConfig, path: Path, bar: tqdm | None = None) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pairs: each non-blank document of `path` as one or more pieces."""
    if cfg.format == "chat":  # conversations carry which tokens are trained: prepare.py reads them
        raise OptionError("format", "chat data is read as conversations (prepare_data), not as text")
    kind = file_kind(path)
    check_options(cfg, path)
    if kind in ("csv", "tsv"):
        yield from _split_documents(_csv_documents(cfg, path, kind, bar))
    elif kind == "jsonl":
        yield from _split_documents(_jsonl_documents(cfg, path, bar))
    else:
        for file in folder_files(path) if kind == "folder" else [path]:
            yield from _text_pieces(cfg, file, bar)


def folder_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not files:
        raise InputFileError(f"{folder} holds no .txt files; put one document per .txt file in it")
    return files


def _chunks(cfg: DataConfig, path: Path, bar: tqdm | None) -> Iterator[str]:
    """The decoded text of `path` in chunks, `\\r\\n` and `\\r` turned into `\\n`, a UTF-8 BOM dropped."""
    utf8 = codecs.lookup(cfg.encoding).name in ("utf-8", "utf-8-sig")
    decoder = codecs.getincrementaldecoder("utf-8" if utf8 else cfg.encoding)(cfg.encoding_errors)
    offset, carry = 0, ""
    with open_text(path) as f:
        while True:
            data = f.read(CHUNK_BYTES)
            eof = not data
            if offset == 0 and utf8 and data.startswith(codecs.BOM_UTF8):  # Excel writes one (pandas#4793)
                data, offset = data[3:], 3
            held = len(decoder.getstate()[0])  # bytes of a character split across reads
            try:
                text = carry + decoder.decode(data, final=eof)
            except UnicodeDecodeError as e:
                raise _decode_error(cfg, path, offset - held + e.start, e) from None
            offset += len(data)
            if bar is not None:
                bar.update(len(data))
            carry = "\r" if not eof and text.endswith("\r") else ""  # may be half of a \r\n
            text = text[:len(text) - len(carry)].replace("\r\n", "\n").replace("\r", "\n")
            if text:
                yield text
            if eof:
                return


def open_text(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise InputFileError(f"cannot read {path}: {e.strerror}") from None


def _decode_error(cfg: DataConfig, path: Path, pos: int, e: UnicodeDecodeError) -> InputFileError:
    name = "UTF-8" if codecs.lookup(cfg.encoding).name in ("utf-8", "utf-8-sig") else cfg.encoding
    with open_text(path) as f:
        head = f.read(2)
    hint = "--encoding utf-16" if head in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "--encoding latin-1"
    return InputFileError(f"not valid {name} at byte {pos} (line {_line_at(path, pos)}) of {path} ({e.reason}); "
                          f"pass {hint} or --encoding-errors replace")


def _line_at(path: Path, pos: int) -> int:
    """The 1-based line holding byte `pos`, counting `\\n`, `\\r\\n` and a lone `\\r` as one break each."""
    line, prev = 1, b""
    with open_text(path) as f:
        while pos > 0 and (data := f.read(min(CHUNK_BYTES, pos))):
            pos -= len(data)
            line += data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n") - (prev + data[:1] == b"\r\n")
            prev = data[-1:]
    return line


def _lines(chunks: Iterator[str]) -> Iterator[str]:
    """Lines ending in "\\n" (the last one may not); only "\\n" ends a line."""
    rest: list[str] = []
    for chunk in chunks:
        lines = chunk.split("\n")
        if len(lines) > 1:
            yield "".join([*rest, lines[0], "\n"])
            rest = []
            yield from (line + "\n" for line in lines[1:-1])
        if lines[-1]:
            rest.append(lines[-1])
    if rest:
        yield "".join(rest)


def _text_pieces(cfg: DataConfig, path: Path, bar: tqdm | None) -> Iterator[tuple[str, bool]]:
    if cfg.line_by_line:
        lines = _lines(_chunks(cfg, path, bar))
        yield from _split_documents(line.rstrip("\n") for line in lines if line.strip())
        return
    held: str | None = ""  # leading whitespace, held until the file proves to have text
    for piece in _safe_pieces(_chunks(cfg, path, bar)):
        if held is not None:
            if not piece.strip():
                held += piece
                continue
            piece, held = held + piece, None
        yield piece, False
    if held is None:
        yield "", True


def _split_documents(documents: Iterator[str]) -> Iterator[tuple[str, bool]]:
    for document in documents:
        last = None
        for piece in _safe_pieces([document]):
            if last is not None:
                yield last, False
            last = piece
        yield last, True


def _safe_pieces(chunks: Iterable[str]) -> Iterator[str]:
    """Re-cut text into pieces of about PIECE_CHARS at cuts that keep the tokens unchanged."""
    buf = ""
    for chunk in chunks:
        buf += chunk
        while len(buf) > PIECE_CHARS:
            cut = _safe_cut(buf, PIECE_CHARS) or _safe_cut(buf, len(buf) - 2)
            if not cut:
                if len(buf) < MAX_PIECE_CHARS:
                    break  # wait for more text
                cut = PIECE_CHARS
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def _safe_cut(text: str, end: int) -> int:
    """The largest i <= end where the pre-tokenizer surely starts a new pre-token, or 0: at a space
    between two non-space characters, else (text without spaces, e.g. Chinese) where a letter or
    digit is followed by a non-space character of another class."""
    i = text.rfind(" ", 1, end + 1)
    while i > 0:
        if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        i = text.rfind(" ", 1, i)
    for i in range(min(end, len(text) - 1), max(0, end - 4096), -1):
        before, here = _char_class(text[i - 1]), _char_class(text[i])
        if before in "LN" and here not in (before, " "):  # not after punctuation: "'" + "s" is one token
            return i
    return 0


def _char_class(c: str) -> str:
    """The pre-tokenizer's classes: letter (L), number (N), space, other (P)."""
    return " " if c.isspace() else {"L": "L", "N": "N"}.get(unicodedata.category(c)[0], "P")


def _csv_documents(cfg: DataConfig, path: Path, kind: str, bar: tqdm | None) -> Iterator[str]:
    reader = csv.reader(_lines(_chunks(cfg, path, bar)), delimiter="\t" if kind == "tsv" else ",", strict=True)
    with _csv_field_limit(MAX_FIELD_CHARS):
        rows = _csv_rows(reader, path)
        _, header = next(rows, (0, None))
        if header is None:
            return
        column = _csv_column(cfg, header, path)
        for line, row in rows:
            if len(row) > len(header):
                raise InputFileError(f"line {line} of {path} has {len(row)} fields but the header has "
                                     f"{len(header)}; quote fields that contain the delimiter")
            if column < len(row) and row[column].strip():
                yield row[column]


@contextlib.contextmanager
def _csv_field_limit(limit: int):
    old = csv.field_size_limit(limit)  # process-wide in the csv module, so restored after reading
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _csv_rows(reader, path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first line, fields) of each non-blank row; a malformed row fails naming its line."""
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise InputFileError(f"malformed row at line {line} of {path}: {e}; "
                                 'look for an unbalanced quote (")') from None
        if row:
            yield line, row


def _csv_column(cfg: DataConfig, header: list[str], path: Path) -> int:
    names = [name.strip() for name in header]  # "ID, Joke" names its second column "Joke"
    if cfg.column is None:
        if len(header) == 1:
            return 0
        # never fall back to the first column: often an ID (run_clm's silent choice)
        raise InputFileError(f"{path} has {len(header)} columns ({', '.join(names)}); "
                             "pass --column with the one that holds the text")
    if cfg.column.strip() not in names:
        raise InputFileError(f"{path} has no column {cfg.column!r}; its columns are: {', '.join(names)}; "
                             "pass --column with one of them")
    return names.index(cfg.column.strip())


def _jsonl_documents(cfg: DataConfig, path: Path, bar: tqdm | None) -> Iterator[str]:
    key = cfg.field
    for n, obj in _jsonl_objects(cfg, path, bar):
        if key is None and len(obj) == 1:
            key = next(iter(obj))
        if key is None or key not in obj:
            missing = "" if key is None else f"has no field {key!r}; it "
            raise InputFileError(f"line {n} of {path} {missing}has the fields {', '.join(obj) or '(none)'}; "
                                 "pass --field with the one that holds the text")
        value = obj[key]
        if not isinstance(value, (str, type(None))):
            raise InputFileError(f"field {key!r} on line {n} of {path} is {_JSON_TYPES.get(type(value))}, "
                                 "not text")
        if value and value.strip():
            yield value.replace("\r\n", "\n").replace("\r", "\n")


def _jsonl_objects(cfg: DataConfig, path: Path, bar: tqdm | None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON lines file."""
    for n, line in enumerate(_lines(_chunks(cfg, path, bar)), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputFileError(f"line {n} of {path} is not valid JSON ({e.msg}, column {e.colno}); "
                                 "each line must hold one JSON object") from None
        if not isinstance(obj, dict):
            raise InputFileError(f"line {n} of {path} is {_JSON_TYPES[type(obj)]}, not an object; "
                                 'each line must hold one object such as {"text": "..."}')
        yield n, obj


def conversations(cfg: DataConfig, path: Path, bar: tqdm | None = None) -> Iterator[list[Message]]:
    """The conversations of a chat .jsonl file (--format chat): one {"messages": [{"role",
    "content"}, ...]} object per line (--field names another key), each checked, errors naming
    the line."""
    if file_kind(path) != "jsonl":
        raise OptionError("format", f"chat reads JSON lines (.jsonl) files; {path} is read as "
                          f"{_KIND_NAMES[file_kind(path)]}")
    for option in ("column", "line_by_line"):
        if getattr(cfg, option):
            raise OptionError(option, "does not apply with --format chat")
    key = cfg.field or "messages"
    for n, obj in _jsonl_objects(cfg, path, bar):
        if key not in obj:
            raise InputFileError(f"line {n} of {path} has no field {key!r} (it has {', '.join(obj) or 'none'}); "
                                 'each line must hold {"messages": [{"role": ..., "content": ...}, ...]}')
        try:
            messages = to_messages(obj[key])
        except OptionError as e:
            raise InputFileError(f"line {n} of {path}: {e}") from None
        yield [Message(m.role, m.content.replace("\r\n", "\n").replace("\r", "\n")) for m in messages]
