"""Data preparation: text, CSV/TSV, JSON lines or a folder of .txt files -> packed token blocks.

The recipe (`prepare_data`): fingerprint the inputs; reuse the cache entry when it is complete;
else stream the documents, tokenize them in batches, append each document's tokens and the EOS id
to train.bin / val.bin in a temporary folder and rename it into place; then cut blocks.

Chat data (`--format chat`) is a .jsonl of conversations, each rendered with the chat template
(gpt2kit.chat) into one document; train.mask.bin / val.mask.bin then hold one byte per token, 1
where the token is trained on (the assistant's turns, their end of turn and the closing
<|endoftext|>). Conversations are packed like any documents: a block boundary may fall inside a
turn, and the mask keeps each token's role wherever it lands.

Reading the input formats (decoding, line splitting, CSV/JSONL, the safe cuts that keep memory
bounded without changing a token) lives in `readers.py`; this module turns its pieces into tokens.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..atomic import atomic_folder
from ..chat import ChatTemplate, choose_template, encode_chat
from ..config import DataConfig
from ..errors import InputFileError, OptionError
from .blocks import TokenBlocks, mask_path
from .readers import (
    check_options,
    conversations,
    existing_path,
    file_kind,
    folder_files,
    input_paths,
    open_text,
    pieces,
)

CACHE_VERSION = 1  # bump when the token files or manifest change meaning
BATCH_CHARS = 1 << 17  # characters per encode_batch call: bounds the Python lists of ids
BATCH_PIECES = 1024
BATCH_TOKENS = 1 << 16  # chat data: tokens held before a file is written
MIN_BLOCKS, MIN_BLOCK_SIZE = 4, 8


@dataclass
class PreparedData:
    """Token blocks ready for training, and what was done to make them."""

    train: TokenBlocks
    val: TokenBlocks | None
    documents: int  # training documents
    val_documents: int
    tokens: int  # training tokens, including the EOS after each document
    block_size: int  # may be smaller than asked (see notes)
    fingerprint: str  # sha256 of (data content, parse and split options, seed, tokenizer): resume compares it
    cached: bool  # loaded from the cache
    notes: list[str]  # human-readable remarks for the user
    trained_tokens: int | None = None  # chat data: training tokens the loss is on (None: all of them)
    chat_template: ChatTemplate | None = None  # chat data: the template it was rendered with


def read_documents(cfg: DataConfig, path: str | None = None) -> Iterator[str]:
    """The non-blank documents of `path` (default `cfg.path`), newlines normalised, streamed. Each
    document is held whole here; `prepare_data` streams long plain-text documents in pieces instead."""
    parts: list[str] = []
    for piece, ends in pieces(cfg, existing_path(path or cfg.path)):
        parts.append(piece)
        if ends:
            yield "".join(parts)
            parts = []


def prepare_data(cfg: DataConfig, tokenizer, block_size: int, seed: int = 0,
                 progress: bool = False) -> PreparedData:
    """Tokenize `cfg`'s data (or load it from the cache) into blocks of `block_size` tokens,
    falling back to smaller blocks when the text is short. Call it before loading a model: bad
    input fails here, fast."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise OptionError("block_size", f"must be an integer of at least 2, got {block_size!r}")
    sources = input_paths(cfg)
    for source in sources:
        check_options(cfg, source)
    template = chat_template(cfg, tokenizer)
    fingerprint = _fingerprint(cfg, tokenizer, seed, sources, template)
    folder = _cache_root(cfg) / fingerprint
    manifest = _read_manifest(folder)
    cached = manifest is not None
    if manifest is None:
        manifest = _build(cfg, tokenizer, seed, sources, folder, progress, template)
    return replace(_assemble(folder, manifest, block_size, fingerprint, cached, sources[0]), chat_template=template)


# --- tokenizing and caching ---------------------------------------------------------------------

class _TokenFile:
    """A raw token file being appended to (and, `masked`, its mask file: one byte per token, 1 if
    it is trained on); remembers where its last document starts."""

    def __init__(self, path: Path, dtype: str, masked: bool = False):
        self.path, self.dtype = path, np.dtype(dtype)
        self.tokens = self.documents = self.last_start = self.trained = 0
        self._ids: list[int] = []
        self._mask: list[bool] = []
        self._files = [open(path, "wb")] + ([open(mask_path(path), "wb")] if masked else [])

    def add(self, ids: list[int], starts: bool, eos: int | None, mask: list[bool] | None = None) -> None:
        """`mask`: per token of ids (+ the EOS), whether it is trained on (masked files only)."""
        if starts:
            self.last_start = self.tokens
        self._ids += ids
        if eos is not None:  # the real EOS id, never the text "<|endoftext|>" (a user's text must not forge document boundaries)
            self._ids.append(eos)
            self.documents += 1
        self.tokens += len(ids) + (eos is not None)
        if mask is not None:
            self._mask += mask
            self.trained += sum(mask)

    def flush(self) -> None:
        np.asarray(self._ids, dtype=self.dtype).tofile(self._files[0])
        if len(self._files) > 1:
            np.asarray(self._mask, dtype=np.uint8).tofile(self._files[1])
        self._ids, self._mask = [], []

    def close(self) -> None:
        if not self._files[0].closed:
            self.flush()
            for f in self._files:
                f.flush()
                os.fsync(f.fileno())
                f.close()


def _tokenize(pieces: Iterator[tuple[str, bool]], tokenizer, route: Callable[[int], _TokenFile]) -> None:
    """Encode pieces in batches; `route(document index)` picks each document's file."""
    batch: list[tuple[str, bool, bool, _TokenFile]] = []
    size, index, starts = 0, 0, True
    for text, ends in pieces:
        if starts:
            dest = route(index)
            index += 1
        batch.append((text, starts, ends, dest))
        size, starts = size + len(text), ends
        if size >= BATCH_CHARS or len(batch) >= BATCH_PIECES:
            _encode(batch, tokenizer)
            batch, size = [], 0
    _encode(batch, tokenizer)


def _encode(batch: list, tokenizer) -> None:
    ids = tokenizer.encode_batch([text for text, *_ in batch]) if batch else []
    for piece_ids, (_, starts, ends, dest) in zip(ids, batch):
        dest.add(piece_ids, starts, tokenizer.eos_id if ends else None)
    for dest in {id(b[3]): b[3] for b in batch}.values():
        dest.flush()


def _in_val(seed: int, index: int, fraction: float) -> bool:
    """Whether document `index` is held out: splitmix64 of (seed, index) as a number in [0, 1)."""
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) / 2**64 < fraction


def _build(cfg: DataConfig, tokenizer, seed: int, sources: list[Path], folder: Path, progress: bool,
           template: ChatTemplate | None) -> dict:
    """Tokenize into a hidden folder beside `folder`, then rename it into place (atomic.py: an
    interrupted run leaves no entry). A complete entry another run published meanwhile is kept."""
    dtype = "uint16" if tokenizer.vocab_size <= 65536 else "uint32"
    files: list[_TokenFile] = []
    try:
        with atomic_folder(folder, keep=lambda entry: _read_manifest(entry) is not None) as tmp:
            masked = template is not None and not cfg.train_on_all_tokens
            train, val = files = [_TokenFile(tmp / f"{split}.bin", dtype, masked) for split in ("train", "val")]
            _tokenize_sources(cfg, tokenizer, seed, sources, train, val, progress, template)
            train.close()
            val.close()
            notes = _balance(cfg, train, val, sources)
            manifest = {"version": CACHE_VERSION, "dtype": dtype, "train_tokens": train.tokens,
                        "val_tokens": val.tokens, "documents": train.documents,
                        "val_documents": val.documents, "notes": notes}
            if masked:
                manifest["train_trained"] = train.trained
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    except BaseException as e:
        for f in files:
            f.close()
        if isinstance(e, OSError):  # reading errors are InputFileError already
            raise OptionError("cache_dir", f"folder {folder.parent} cannot be written ({e.strerror or e}); "
                              "free some space or choose another folder") from None
        raise
    return manifest


def _tokenize_sources(cfg: DataConfig, tokenizer, seed: int, sources: list[Path], train: _TokenFile,
                      val: _TokenFile, progress: bool, template: ChatTemplate | None) -> None:
    total = sum(p.stat().st_size for s in sources for p in (folder_files(s) if s.is_dir() else [s]))
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress,
              file=sys.stderr) as bar:
        def read(path: Path, route: Callable[[int], _TokenFile]) -> None:
            if template is None:
                _tokenize(pieces(cfg, path, bar), tokenizer, route)
            else:
                _tokenize_chats(conversations(cfg, path, bar), tokenizer, template, cfg.train_on_all_tokens, route)
        if cfg.val_file:
            read(sources[0], lambda i: train)
            read(sources[1], lambda i: val)
        else:
            fraction = cfg.val_fraction
            read(sources[0], lambda i: val if _in_val(seed, i, fraction) else train)


def _tokenize_chats(chats, tokenizer, template: ChatTemplate, all_tokens: bool,
                    route: Callable[[int], _TokenFile]) -> None:
    """Each conversation as one document: the rendered ids and which of them are trained on. The
    closing EOS is trained where the conversation ends on the assistant's turn (it learns to stop)."""
    eos, routed = tokenizer.eos_id, {}
    for i, messages in enumerate(chats):
        ids, mask = encode_chat(tokenizer, template.render(messages))
        mask = [True] * len(ids) if all_tokens else mask
        if ids and ids[-1] == eos:  # the template ended the conversation itself (DialoGPT)
            ids, mask, closing = ids[:-1], mask[:-1], mask[-1]
        else:
            closing = bool(mask) and mask[-1]
        dest = route(i)
        dest.add(ids, True, eos, mask + [closing])
        routed[id(dest)] = dest
        if len(dest._ids) >= BATCH_TOKENS:
            dest.flush()
    for dest in routed.values():
        dest.flush()


def chat_template(cfg: DataConfig, tokenizer) -> ChatTemplate | None:
    """The template chat data is rendered with (None for text data): --chat-template, else the
    checkpoint's, found from the folder its tokenizer was read from (prepare_data is given the
    tokenizer, not the model), else the built-in one."""
    if cfg.format != "chat":
        return None
    folder = Path(tokenizer.source)
    return choose_template(cfg.chat_template, folder if folder.is_dir() else None)


def _balance(cfg: DataConfig, train: _TokenFile, val: _TokenFile, sources: list[Path]) -> list[str]:
    """Check there is text, and that neither split is empty when it need not be."""
    if not train.documents and (cfg.val_file or not val.documents):
        raise InputFileError(f"no training text found in {sources[0]}: it holds no non-blank document")
    if cfg.val_file and not val.documents:
        raise InputFileError(f"no validation text found in {sources[1]}: it holds no non-blank document")
    if not train.documents:
        _move_last_document(val, train)
    if cfg.val_fraction > 0 and not cfg.val_file and not val.documents:
        if train.documents < 2:
            return ["the data is a single document, so nothing is held out for validation; use "
                    "--line-by-line, a folder of files or --val-file for a validation split"]
        _move_last_document(train, val)
    return []


def _move_last_document(src: _TokenFile, dst: _TokenFile) -> None:
    _move_tail(src.path, dst.path, src.last_start * src.dtype.itemsize)
    if len(src._files) > 1:  # masked
        trained = int(np.fromfile(mask_path(src.path), dtype=np.uint8, offset=src.last_start).sum())
        _move_tail(mask_path(src.path), mask_path(dst.path), src.last_start)
        src.trained, dst.trained = src.trained - trained, dst.trained + trained
    moved = src.tokens - src.last_start
    src.tokens, dst.tokens = src.last_start, dst.tokens + moved
    src.documents, dst.documents = src.documents - 1, dst.documents + 1


def _move_tail(src: Path, dst: Path, start: int) -> None:
    """Append `src` from byte `start` to `dst`, and cut it there."""
    with open(src, "rb") as s, open(dst, "ab") as d:
        s.seek(start)
        shutil.copyfileobj(s, d)
    os.truncate(src, start)


def _read_manifest(folder: Path) -> dict | None:
    """The manifest of a complete cache entry (token files of the recorded sizes), else None."""
    try:
        m = json.loads((folder / "manifest.json").read_text())
        itemsize = np.dtype(m["dtype"]).itemsize
        sizes = {f"{split}.bin": m[f"{split}_tokens"] * itemsize for split in ("train", "val")}
        if "train_trained" in m:
            sizes.update({f"{split}.mask.bin": m[f"{split}_tokens"] for split in ("train", "val")})
        complete = m["version"] == CACHE_VERSION and all((folder / f).stat().st_size == n for f, n in sizes.items())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return m if complete else None


def _assemble(folder: Path, m: dict, block_size: int, fingerprint: str, cached: bool, path: Path) -> PreparedData:
    notes = list(m["notes"])
    n = m["train_tokens"]
    block = _fit_block_size(n, block_size, path)
    if block < block_size:
        notes.append(f"the training text has {n} tokens, fewer than {MIN_BLOCKS} blocks of {block_size}: "
                     f"using {block}-token blocks")
    masked = "train_trained" in m
    train = TokenBlocks.from_file(folder / "train.bin", block, m["dtype"], masked)
    if masked:
        notes.append(f"chat: the loss is on {m['train_trained']:,} of the {n:,} training tokens (the assistant's "
                     "turns), and so is the validation loss")
    val = None
    if m["val_tokens"] >= block:
        val = TokenBlocks.from_file(folder / "val.bin", block, m["dtype"], masked)
    elif m["val_documents"]:
        notes.append(f"the validation split has {m['val_tokens']} tokens, less than one {block}-token block: "
                     "no validation")
    return PreparedData(train=train, val=val, documents=m["documents"], val_documents=m["val_documents"],
                        tokens=n, block_size=block, fingerprint=fingerprint, cached=cached, notes=notes,
                        trained_tokens=m.get("train_trained"))


def _fit_block_size(n_tokens: int, block_size: int, path: Path) -> int:
    """`block_size`, or the largest power of two that still gives MIN_BLOCKS blocks."""
    if n_tokens // block_size >= MIN_BLOCKS:
        return block_size
    fit = 1 << ((n_tokens // MIN_BLOCKS).bit_length() - 1) if n_tokens >= MIN_BLOCKS else 0
    if fit < MIN_BLOCK_SIZE:
        raise InputFileError(f"{path} has only {n_tokens} tokens of training text; at least "
                             f"{MIN_BLOCKS * MIN_BLOCK_SIZE} are needed: add more text")
    return fit


def _cache_root(cfg: DataConfig) -> Path:
    default = os.environ.get("GPT2KIT_CACHE") or Path.home() / ".cache" / "gpt2kit" / "data"
    return Path(cfg.cache_dir or default).expanduser()


# --- fingerprints -------------------------------------------------------------------------------

def _fingerprint(cfg: DataConfig, tokenizer, seed: int, sources: list[Path], template: ChatTemplate | None) -> str:
    """Everything the token files depend on; the path itself does not count (moving a file keeps its cache)."""
    parts = {"version": CACHE_VERSION, "data": _content_hash(sources[0]), "kind": file_kind(sources[0]),
             "column": cfg.column, "field": cfg.field, "line_by_line": cfg.line_by_line,
             "encoding": codecs.lookup(cfg.encoding).name, "encoding_errors": cfg.encoding_errors,
             "val_file": _content_hash(sources[1]) if cfg.val_file else None,
             "val_kind": file_kind(sources[1]) if cfg.val_file else None,
             "val_fraction": None if cfg.val_file else cfg.val_fraction, "seed": seed,
             "tokenizer": tokenizer_identity(tokenizer)}
    if template is not None:  # only then, so text data keeps the fingerprints runs recorded before chat
        parts.update(format=cfg.format, train_on_all_tokens=cfg.train_on_all_tokens, template=template.source)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _content_hash(path: Path) -> str:
    """sha256 of a file read in chunks; for a folder, of its .txt files' names and hashes."""
    h = hashlib.sha256()
    if path.is_dir():
        for file in folder_files(path):
            h.update(f"{file.relative_to(path).as_posix()}\0{_content_hash(file)}\n".encode())
        return h.hexdigest()
    with open_text(path) as f:
        while data := f.read(1 << 20):
            h.update(data)
    return h.hexdigest()


_IDENTITIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> identity
_PROBE = "Hello world! It's 2024: naïve café, 東京, 🤗 <|endoftext|>\n\n  indented\ttabs 12345"


def tokenizer_identity(tokenizer) -> str:
    """sha256 of the id -> bytes table, the EOS id and a probe's tokens (which depend on the merges)."""
    if (known := _IDENTITIES.get(tokenizer)) is None:
        h = hashlib.sha256()
        for i in range(tokenizer.vocab_size):
            b = tokenizer.token_bytes(i)
            h.update(len(b).to_bytes(4, "little") + b)
        h.update(json.dumps([tokenizer.eos_id, tokenizer.encode(_PROBE)]).encode())
        known = _IDENTITIES[tokenizer] = h.hexdigest()
    return known
