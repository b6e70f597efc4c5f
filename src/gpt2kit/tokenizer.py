"""GPT-2's byte-level BPE, as a thin layer over the Rust `tokenizers` library.

Why a layer at all: the library gets the merges right and fast, but four things the rest of
gpt2kit relies on are not its defaults. (1) Text is ordinary text: `<|endoftext|>` typed by a user
is 7 tokens unless the caller opts in, so a user's text cannot forge document boundaries
(tokenizers#1850). (2) Decoding is a byte operation: a token can hold half a UTF-8 character, so
ids map to bytes through a precomputed table and the streaming decoder holds partial characters
back (no half character is ever printed). (3) Vocabulary files are
untrusted: tokenizers panics on a merge whose result is not in the vocabulary and silently drops
bytes missing from it, so both are checked here first and fail naming the file. (4) A checkpoint's
tokenizer.json may carry truncation or padding settings; they are switched off so encode never
shortens text behind the caller's back.

Speed: `encode_batch_fast` skips offset tracking, which makes one call faster than
`GPT2TokenizerFast` (see benchmarks/bench_tokenizer.py). The library merges with a priority queue,
so a long pre-token (1 MB of "a") stays linear, unlike tiktoken#195.
"""

from __future__ import annotations

import codecs
import functools
import json
import operator
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from .errors import TokenizerError

EOS_TOKEN = "<|endoftext|>"
_SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _gpt2_byte_decoder() -> dict[str, int]:
    """Invert GPT-2's `bytes_to_unicode`: vocab.json spells each byte as a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_in = {b: b for b in printable}
    for b in range(256):
        if b not in stand_in:
            stand_in[b] = 256 + len(stand_in) - len(printable)
    return {chr(c): b for b, c in stand_in.items()}


_BYTE_DECODER = _gpt2_byte_decoder()
_TO_LATIN1 = str.maketrans({ch: chr(b) for ch, b in _BYTE_DECODER.items()})  # then .encode("latin-1")


class Tokenizer:
    """GPT-2 byte-level BPE. Build with `Tokenizer.default()` or `Tokenizer.from_folder(path)`."""

    def __init__(self, backend: tokenizers.Tokenizer, declared: dict[str, int], eos_token: str, source: str,
                 roles: dict[str, str] | None = None):
        """Wrap a byte-level BPE `backend` whose vocabulary must equal `declared` (what the files say)."""
        if eos_token not in declared:
            raise TokenizerError(f"{source}: end-of-text token {eos_token!r} is not in the vocabulary")
        backend.no_truncation()
        backend.no_padding()
        # Two backends because `encode_special_tokens` is a mutable flag: toggling one shared object
        # per call would race between server threads. The twin shares the Rust model, so it is free.
        self._special, self._ordinary = backend, _twin(backend)
        self._ordinary.encode_special_tokens = True
        vocab = backend.get_vocab(with_added_tokens=True)
        if vocab != declared:
            token = next(t for t in declared.keys() | vocab.keys() if declared.get(t) != vocab.get(t))
            raise TokenizerError(f"{source}: token {token!r} is declared with id {declared.get(token)} but gets "
                                 f"id {vocab.get(token)}; added token ids must follow the vocabulary without gaps")
        # The twin shares the model, so only its added tokens could differ (not its ~30 ms vocabulary copy).
        assert _added_tokens(self._ordinary) == _added_tokens(backend), source
        self._table = _byte_table(vocab, self._special.get_added_tokens_decoder())
        self.eos_token = eos_token
        self.eos_id = vocab[eos_token]
        self.vocab_size = len(self._table)
        self.source = source
        self._roles = {"bos_token": eos_token, "unk_token": eos_token, **(roles or {}), "eos_token": eos_token}

    @classmethod
    @functools.cache
    def default(cls) -> Tokenizer:
        """OpenAI's GPT-2 vocabulary, shipped as package data (modified MIT, assets/LICENSE-gpt2-vocab.txt)."""
        assets = resources.files("gpt2kit") / "assets"
        return cls._from_vocab_merges(assets / "vocab.json", assets / "merges.txt", {}, {}, "built-in GPT-2 vocabulary")

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer | None:
        """A checkpoint's own tokenizer: tokenizer.json if present, else vocab.json + merges.txt
        (+ added_tokens.json, special_tokens_map.json). None when the folder has none of these."""
        folder = Path(folder)
        roles = _special_token_roles(folder)
        if (folder / "tokenizer.json").is_file():
            return cls._from_tokenizer_json(folder / "tokenizer.json", roles, str(folder))
        present = [name for name in ("vocab.json", "merges.txt") if (folder / name).is_file()]
        if not present:
            return None
        if len(present) == 1:
            missing = "merges.txt" if present == ["vocab.json"] else "vocab.json"
            raise TokenizerError(f"{folder} has {present[0]} but no {missing}; a GPT-2 tokenizer needs both "
                                 "(or a tokenizer.json)")
        added = _read_json(folder / "added_tokens.json") if (folder / "added_tokens.json").is_file() else {}
        return cls._from_vocab_merges(folder / "vocab.json", folder / "merges.txt", added, roles, str(folder))

    @classmethod
    def _from_vocab_merges(cls, vocab_path: Any, merges_path: Any, added: Any, roles: dict[str, str],
                           source: str) -> Tokenizer:
        vocab = _check_vocab(_read_json(vocab_path), vocab_path)
        added = _check_added(added, source)
        merges = _check_merges(_read_merges(merges_path), vocab, merges_path)
        eos = roles.get("eos_token", EOS_TOKEN)
        specials = set(roles.values()) | {eos}
        declared = _check_contiguous({**vocab, **added}, source)
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()  # for transformers after save(); we decode via _table
        # tokenizers numbers new added tokens sequentially, so add them in id order.
        for token in sorted(added.keys() | {eos}, key=lambda t: added.get(t, vocab.get(t, -1))):
            _add_token(backend, AddedToken(token, special=token in specials, normalized=False))
        return cls(backend, declared, eos, source, roles)

    @classmethod
    def _from_tokenizer_json(cls, path: Path, roles: dict[str, str], source: str) -> Tokenizer:
        text = _read_text(path)
        data = _parse_json(text, path)
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE":
            raise TokenizerError(f"{path}: not a BPE tokenizer (model.type is "
                                 f"{model.get('type') if isinstance(model, dict) else None!r}); GPT-2 needs BPE")
        added = {t.get("content"): t.get("id") for t in data.get("added_tokens") or [] if isinstance(t, dict)}
        vocab = _check_vocab(model.get("vocab"), path, skip=added.keys())
        _check_merges(model.get("merges"), vocab, path)
        eos = roles.get("eos_token", EOS_TOKEN)
        declared = _check_contiguous({**vocab, **_check_added(added, path)}, path)
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the library raises bare Exception with a parse message
            raise TokenizerError(f"{path}: cannot be loaded by tokenizers: {e}") from None
        if eos in vocab and eos not in added:  # so allow_special=True can produce it
            backend.add_special_tokens([AddedToken(eos, special=True, normalized=False)])
        return cls(backend, declared, eos, source, roles)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token text such as `<|endoftext|>` is ordinary text unless
        `allow_special`. Lone surrogates (not valid Unicode scalars, so not encodable as UTF-8) become
        U+FFFD first, as tiktoken does: the one input where decode(encode(text)) != text."""
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode text (str), got {type(text).__name__}")
        return self.encode_batch([text], allow_special)[0]

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        """`encode` over many texts in one call (the library parallelises across texts)."""
        if isinstance(texts, str):
            raise TokenizerError("encode_batch takes a list of strings; use encode() for one string")
        texts = list(texts)
        if bad := [t for t in texts if not isinstance(t, str)]:
            raise TokenizerError(f"can only encode text (str), got {type(bad[0]).__name__}")
        backend = self._special if allow_special else self._ordinary
        try:
            encodings = backend.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError:  # "TextInputSequence must be str": a str holding lone surrogates
            encodings = backend.encode_batch_fast([_scrub(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Text of `ids`. Bytes that are not valid UTF-8 (e.g. a lone continuation byte) become U+FFFD;
        `errors="strict"` raises TokenizerError instead (any `bytes.decode` handler name works)."""
        try:
            codecs.lookup_error(errors)
        except LookupError:
            raise TokenizerError(f"unknown errors mode {errors!r}; use 'replace' or 'strict'") from None
        data = self.decode_bytes(ids)
        try:
            return data.decode("utf-8", errors)
        except UnicodeDecodeError as e:
            raise TokenizerError(f"token ids decode to invalid UTF-8 at byte {e.start} ({e.reason}); "
                                 "decode with errors='replace' or use decode_bytes()") from None

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of `ids` (concatenated token bytes, no UTF-8 decoding)."""
        table = self._table
        return b"".join([table[i] for i in self._check_ids(ids)])

    def token_bytes(self, id: int) -> bytes:
        """The bytes of one token (may be part of a UTF-8 character)."""
        return self._table[self._check_ids([id])[0]]

    def stream_decoder(self) -> StreamDecoder:
        """A fresh decoder that turns ids into text one token at a time, never splitting a character."""
        return StreamDecoder(self)

    def save(self, folder: str | Path) -> None:
        """Write vocab.json, merges.txt, tokenizer.json and the special-token files, laid out so that
        transformers' `AutoTokenizer.from_pretrained(folder)` encodes exactly as this tokenizer does."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._special.model.save(str(folder))  # the BPE model's vocab.json + merges.txt
        self._special.save(str(folder / "tokenizer.json"))
        extra = {t.content: i for i, t in self._special.get_added_tokens_decoder().items()
                 if self._special.model.token_to_id(t.content) is None}
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "add_bos_token": False,
                  "errors": "replace", **self._roles}
        files = {"special_tokens_map.json": self._roles, "tokenizer_config.json": config}
        if extra:
            files["added_tokens.json"] = extra
        for name, content in files.items():
            (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError as e:
            raise TokenizerError(f"token ids must be integers: {e}") from None
        n = len(self._table)
        if ids and (min(ids) < 0 or max(ids) >= n):
            bad = next(i for i in ids if not 0 <= i < n)
            raise TokenizerError(f"token id {bad} is outside the vocabulary: ids run from 0 to {n - 1} "
                                 f"(vocabulary size {n})")
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Incremental detokenizer: `add` returns only complete characters, holding back the start of a
    UTF-8 sequence split across tokens (an emoji is often 2-3 GPT-2 tokens), so no streamed chunk
    shows U+FFFD for a character that the next token completes."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back (an unfinished sequence becomes U+FFFD); the decoder is then reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def _added_tokens(backend: tokenizers.Tokenizer) -> dict[int, str]:
    return {i: t.content for i, t in backend.get_added_tokens_decoder().items()}


def _add_token(backend: tokenizers.Tokenizer, token: AddedToken) -> None:
    (backend.add_special_tokens if token.special else backend.add_tokens)([token])


def _twin(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """A second tokenizer over the same (shared, immutable) model, with its own added-token flags."""
    twin = tokenizers.Tokenizer(backend.model)
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        if getattr(backend, part) is not None:
            setattr(twin, part, getattr(backend, part))
    for _, token in sorted(backend.get_added_tokens_decoder().items()):
        _add_token(twin, token)
    return twin


def _scrub(text: str) -> str:
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # as tiktoken's encode


def _read_text(path: Any) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot be read as UTF-8 text ({e})") from None


def _parse_json(text: str, path: Any) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e}); the tokenizer file is corrupt") from None


def _read_json(path: Any) -> Any:
    return _parse_json(_read_text(path), path)


def _read_merges(path: Any) -> list[Any]:
    lines = _read_text(path).splitlines()
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return [line for line in lines if line]


def _check_vocab(vocab: Any, where: Any, skip: Iterable[str] = ()) -> dict[str, int]:
    """A BPE vocabulary: str -> unique non-negative int, every byte present, byte-level characters only."""
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError(f"{where}: the vocabulary must be a non-empty JSON object of token -> id")
    if not all(type(i) is int and i >= 0 for i in vocab.values()):
        token, i = next((t, i) for t, i in vocab.items() if type(i) is not int or i < 0)
        raise TokenizerError(f"{where}: token {token!r} has id {i!r}; ids must be non-negative integers")
    if len(set(vocab.values())) != len(vocab):
        seen: dict[int, str] = {}
        token, i = next((t, i) for t, i in vocab.items() if seen.setdefault(i, t) != t)
        raise TokenizerError(f"{where}: id {i} is used by both {seen[i]!r} and {token!r}")
    if missing := set(_BYTE_DECODER) - vocab.keys():
        raise TokenizerError(f"{where}: {len(missing)} of the 256 byte tokens are missing (e.g. {min(missing)!r}); "
                             "byte-level BPE would silently drop those bytes")
    bpe_tokens = vocab.keys() - set(skip)
    if foreign := set("".join(bpe_tokens)) - _BYTE_DECODER.keys():
        token = next(t for t in bpe_tokens if foreign & set(t))
        raise TokenizerError(f"{where}: token {token!r} has characters outside GPT-2's byte alphabet; "
                             "this is not a byte-level BPE vocabulary")
    return vocab


def _check_added(added: Any, where: Any) -> dict[str, int]:
    if not isinstance(added, dict) or not all(isinstance(t, str) and isinstance(i, int) and not isinstance(i, bool)
                                              for t, i in added.items()):
        raise TokenizerError(f"{where}: added tokens must map token text to an integer id")
    return added


def _check_merges(merges: Any, vocab: dict[str, int], where: Any) -> list[tuple[str, str]]:
    """Each merge is two vocabulary tokens whose concatenation is also one (else tokenizers panics)."""
    if not isinstance(merges, list):
        raise TokenizerError(f"{where}: merges must be a list")
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) if isinstance(m, list) else (m,) for m in merges]
    try:  # set operations first: a per-merge Python loop would dominate load time
        fine = ({len(p) for p in pairs} <= {2} and {t for p in pairs for t in p} <= vocab.keys()
                and {a + b for a, b in pairs} <= vocab.keys())
    except TypeError:  # unhashable parts
        fine = False
    if not fine:
        n, merge = next((n, m) for n, (m, p) in enumerate(zip(merges, pairs), start=1) if not _is_merge(p, vocab))
        raise TokenizerError(f"{where}: merge {n} ({merge!r}) must be two vocabulary tokens whose "
                             "concatenation is also in the vocabulary")
    return pairs


def _is_merge(pair: tuple, vocab: dict[str, int]) -> bool:
    return (len(pair) == 2 and all(isinstance(t, str) and t in vocab for t in pair)
            and pair[0] + pair[1] in vocab)


def _check_contiguous(vocab: dict[str, int], where: Any) -> dict[str, int]:
    """Ids must be exactly 0..N-1: the id -> bytes table is a plain list, and ids index model rows."""
    n = len(vocab)
    if len(set(vocab.values())) != n or not all(0 <= i < n for i in vocab.values()):
        missing = min(set(range(n)) - set(vocab.values()))
        raise TokenizerError(f"{where}: token ids must run from 0 to {n - 1} without gaps or repeats; "
                             f"id {missing} is missing")
    return vocab


def _byte_table(vocab: dict[str, int], added: dict[int, AddedToken]) -> list[bytes]:
    """id -> bytes: GPT-2's stand-in characters back to bytes; added tokens are their UTF-8 text."""
    table = [b""] * len(vocab)
    for token, i in vocab.items():
        table[i] = added[i].content.encode("utf-8") if i in added else token.translate(_TO_LATIN1).encode("latin-1")
    return table


def _special_token_roles(folder: Path) -> dict[str, str]:
    """bos/eos/unk/pad token texts from tokenizer_config.json, overridden by special_tokens_map.json."""
    roles: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            content = _read_json(folder / name)
            for role in _SPECIAL_ROLES:
                value = content.get(role) if isinstance(content, dict) else None
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    roles[role] = value
    return roles
