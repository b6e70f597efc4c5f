"""Data preparation: formats, bad input, the cache, the split and block sizes."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from jokes import make_jokes

import gpt2kit.data.prepare as data
import gpt2kit.data.readers as readers
from gpt2kit.data.blocks import TokenBlocks
from gpt2kit.data.prepare import DataConfig, PreparedData, prepare_data, read_documents
from gpt2kit.errors import InputFileError, OptionError
from gpt2kit.tokenizer import Tokenizer

LITERAL_EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


class Spy:
    """The real tokenizer, counting encode_batch calls; optionally pretending to another vocabulary."""

    def __init__(self, tok: Tokenizer, vocab_size: int | None = None, alter: bool = False, fast: bool = False):
        self.tok, self.alter, self.fast = tok, alter, fast
        self.vocab_size = vocab_size or tok.vocab_size
        self.eos_id = tok.eos_id
        self.batches = 0

    def token_bytes(self, i: int) -> bytes:
        if i >= self.tok.vocab_size:
            return b"extra%d" % i
        return b"altered" if self.alter and i == 0 else self.tok.token_bytes(i)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.batches += 1
        if self.fast:  # about as many ids as GPT-2 gives, without the cost of BPE
            return [[300] * (len(t) // 4) for t in texts]
        return self.tok.encode_batch(texts)


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def prep(tmp_path: Path, tok, block_size: int = 32, seed: int = 0, **options) -> PreparedData:
    options.setdefault("cache_dir", str(tmp_path / "cache"))
    return prepare_data(DataConfig(**options), tok, block_size, seed=seed)


def all_tokens(d: PreparedData) -> np.ndarray:
    parts = [d.train.tokens] + ([d.val.tokens] if d.val is not None else [])
    return np.concatenate([np.asarray(p) for p in parts])


def documents_of(tokens: np.ndarray, tok: Tokenizer) -> list[str]:
    """Decode a token file back into documents (each ends with the EOS id)."""
    ends = np.flatnonzero(np.asarray(tokens) == tok.eos_id)
    assert len(ends) and ends[-1] == len(tokens) - 1, "every document ends with EOS"
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]


def jokes_column(jokes_csv) -> list[str]:
    with open(jokes_csv, newline="", encoding="utf-8") as f:
        return [row["Joke"] for row in csv.DictReader(f)]


# --- a real CSV ---------------------------------------------------------------------------------

def test_onelinefun_csv_with_column(tmp_path, tok, jokes_csv):
    d = prep(tmp_path, tok, block_size=256, path=str(jokes_csv), column="Joke")
    assert d.documents + d.val_documents == 2950
    assert 0 < d.val_documents < 2950 * 0.1
    train_docs, val_docs = documents_of(np.asarray(d.train.tokens), tok), documents_of(np.asarray(d.val.tokens), tok)
    assert (len(train_docs), len(val_docs)) == (d.documents, d.val_documents)
    assert sorted(train_docs + val_docs) == sorted(jokes_column(jokes_csv))  # the Joke column, nothing else
    ids = {str(n) for n in range(1, 2951)}
    assert not any(doc in ids for doc in train_docs + val_docs)
    assert not any(doc.split(",")[0].strip() in ids for doc in train_docs[:200])
    assert d.tokens == d.train.n_tokens and d.train.tokens.dtype == np.uint16
    assert isinstance(d.train, TokenBlocks) and d.train.block_size == 256 and len(d.train) == d.tokens // 256
    assert d.train.batch([0, 1]).shape == (2, 256)
    assert not d.cached and d.notes == []


def test_onelinefun_without_column_lists_the_columns(tmp_path, tok, jokes_csv):
    with pytest.raises(InputFileError, match=r"2 columns \(ID, Joke\).*--column"):
        prep(tmp_path, tok, path=str(jokes_csv))


def test_csv_without_the_named_column(tmp_path, tok, jokes_csv):
    with pytest.raises(InputFileError, match=r"no column 'Text'.*columns are: ID, Joke.*--column"):
        prep(tmp_path, tok, path=str(jokes_csv), column="Text")


def test_single_column_csv_needs_no_column(tmp_path, tok):
    path = write(tmp_path / "one.csv", "Joke\nfirst joke\n\"second, with a comma\"\n")
    assert list(read_documents(DataConfig(str(path)))) == ["first joke", "second, with a comma"]


def test_bom_csv_finds_the_column(tmp_path, tok, jokes_csv):
    """Excel saves UTF-8 with a BOM: the first header is still `ID`, not `\\ufeffID`."""
    path = write(tmp_path / "excel.csv", b"\xef\xbb\xbf" + jokes_csv.read_bytes()[:2000].rsplit(b"\n", 1)[0])
    docs = list(read_documents(DataConfig(str(path), column="ID")))
    assert docs[:3] == ["1", "2", "3"]
    assert list(read_documents(DataConfig(str(path), column="Joke")))[0] == make_jokes()[0]
    bom_text = write(tmp_path / "bom.txt", b"\xef\xbb\xbfhello")
    assert list(read_documents(DataConfig(str(bom_text)))) == ["hello"]


# --- bad input (each a one-line error naming the problem and the fix) ----------------------------

def test_missing_file(tmp_path, tok):
    with pytest.raises(InputFileError, match=r"data file .*nope\.txt does not exist"):
        prep(tmp_path, tok, path=str(tmp_path / "nope.txt"))
    good = write(tmp_path / "a.txt", "text " * 50)
    with pytest.raises(InputFileError, match=r"validation file .*nope\.txt does not exist"):
        prep(tmp_path, tok, path=str(good), val_file=str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("name, content", [
    ("empty.txt", ""), ("blank.txt", "\n\n  \r\n\t\n"), ("header.csv", "ID,Joke\n"),
    ("blank_cells.csv", "ID,Joke\n1,\n2,  \n"), ("empty.csv", ""), ("empty.jsonl", "\n\n"),
    ("nulls.jsonl", '{"text": null}\n{"text": ""}\n'),
])
def test_no_usable_text(tmp_path, tok, name, content):
    path = write(tmp_path / name, content)
    column = "Joke" if name in ("header.csv", "blank_cells.csv") else None
    with pytest.raises(InputFileError, match=r"^no training text found in .*" + name.replace(".", r"\.")):
        prep(tmp_path, tok, path=str(path), column=column)
    assert not list((tmp_path / "cache").glob("*/manifest.json"))


def test_blank_line_by_line_and_blank_folder(tmp_path, tok):
    path = write(tmp_path / "blank.txt", "\n \n\u3000\n")
    with pytest.raises(InputFileError, match="no training text found"):
        prep(tmp_path, tok, path=str(path), line_by_line=True)
    (tmp_path / "folder").mkdir()
    write(tmp_path / "folder" / "a.txt", "  \n")
    with pytest.raises(InputFileError, match="no training text found"):
        prep(tmp_path, tok, path=str(tmp_path / "folder"))
    (tmp_path / "none").mkdir()
    with pytest.raises(InputFileError, match=r"holds no \.txt files"):
        prep(tmp_path, tok, path=str(tmp_path / "none"))


def test_csv_malformed_row_names_the_line(tmp_path, tok):
    path = write(tmp_path / "bad.csv", 'ID,Joke\n1,"fine"\n2,"unbalanced quote\n3,"next"\n')
    with pytest.raises(InputFileError, match=r"malformed row at line 3 of .*bad\.csv.*unbalanced quote"):
        list(read_documents(DataConfig(str(path), column="Joke")))
    eof = write(tmp_path / "eof.csv", 'ID,Joke\n1,"fine"\n2,"never closed\nmore\n')
    with pytest.raises(InputFileError, match=r"malformed row at line 3 of"):
        prep(tmp_path, tok, path=str(eof), column="Joke")
    extra = write(tmp_path / "extra.csv", "ID,Joke\n1,fine\n2,a, b\n")
    with pytest.raises(InputFileError, match=r"line 3 of .*extra\.csv has 3 fields but the header has 2"):
        list(read_documents(DataConfig(str(extra), column="Joke")))


def test_jsonl_broken_line_and_missing_field(tmp_path, tok):
    broken = write(tmp_path / "broken.jsonl", '{"text": "one"}\n\n{"text": "two"\n')
    with pytest.raises(InputFileError, match=r"line 3 of .*broken\.jsonl is not valid JSON"):
        prep(tmp_path, tok, path=str(broken))
    missing = write(tmp_path / "missing.jsonl", '{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(InputFileError, match=r"line 2 of .* has no field 'text'; it has the fields body; pass --field"):
        list(read_documents(DataConfig(str(missing), field="text")))
    several = write(tmp_path / "several.jsonl", '{"id": 1, "text": "one"}\n')
    with pytest.raises(InputFileError, match=r"line 1 of .* has the fields id, text; pass --field"):
        list(read_documents(DataConfig(str(several))))
    not_object = write(tmp_path / "list.jsonl", '["a"]\n')
    with pytest.raises(InputFileError, match=r"line 1 of .* is an array, not an object"):
        list(read_documents(DataConfig(str(not_object))))
    number = write(tmp_path / "number.jsonl", '{"text": 5}\n')
    with pytest.raises(InputFileError, match=r"field 'text' on line 1 of .* is a number, not text"):
        list(read_documents(DataConfig(str(number))))


def test_non_utf8_names_byte_and_line(tmp_path, tok):
    """Latin-1 bytes read as UTF-8 are an error naming the encoding option; nothing is written to the cache."""
    text = "line one\r\nline two\ncaf\xe9 au lait\n"
    path = write(tmp_path / "latin.txt", text.encode("latin-1"))
    pos = text.encode("latin-1").index(b"\xe9")
    with pytest.raises(InputFileError) as e:
        prep(tmp_path, tok, path=str(path))
    assert str(e.value) == (f"not valid UTF-8 at byte {pos} (line 3) of {path} (invalid continuation byte); "
                            "pass --encoding latin-1 or --encoding-errors replace")
    assert not any((tmp_path / "cache").iterdir())
    assert list(read_documents(DataConfig(str(path), encoding="latin-1"))) == [text.replace("\r\n", "\n")]
    replaced = next(read_documents(DataConfig(str(path), encoding_errors="replace")))
    assert "caf\ufffd au lait" in replaced


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64])
def test_decode_error_position_across_chunks(tmp_path, monkeypatch, chunk):
    """The byte offset is exact even when a multi-byte character or the error straddles reads."""
    monkeypatch.setattr(readers, "CHUNK_BYTES", chunk)
    good = "ünï\r\ncödé 🤗\rthird\n".encode()
    path = write(tmp_path / "mixed.txt", good + b"ok\xff\n")
    with pytest.raises(InputFileError, match=rf"at byte {len(good) + 2} \(line 4\)"):
        list(read_documents(DataConfig(str(path))))
    truncated = write(tmp_path / "truncated.txt", good + "é".encode()[:1])
    with pytest.raises(InputFileError, match=rf"at byte {len(good)} \(line 4\)"):
        list(read_documents(DataConfig(str(truncated))))


def test_utf16_file_gets_a_hint(tmp_path):
    path = write(tmp_path / "wide.txt", "hello\n".encode("utf-16"))
    with pytest.raises(InputFileError, match=r"at byte 0 \(line 1\).*pass --encoding utf-16"):
        list(read_documents(DataConfig(str(path))))
    assert list(read_documents(DataConfig(str(path), encoding="utf-16"))) == ["hello\n"]


def test_options_that_do_not_fit_the_format(tmp_path, tok, jokes_csv):
    txt = write(tmp_path / "a.txt", "text")
    with pytest.raises(OptionError, match=r"^column applies to CSV/TSV files only"):
        prep(tmp_path, tok, path=str(txt), column="Joke")
    with pytest.raises(OptionError, match=r"^field applies to JSONL files only"):
        list(read_documents(DataConfig(str(txt), field="text")))
    with pytest.raises(OptionError, match=r"^line_by_line applies to plain text files only"):
        prep(tmp_path, tok, path=str(jokes_csv), column="Joke", line_by_line=True)


@pytest.mark.parametrize("options, name", [
    (dict(val_fraction=0.6), "val_fraction"), (dict(val_fraction=-0.1), "val_fraction"),
    (dict(val_fraction=float("nan")), "val_fraction"), (dict(val_fraction=True), "val_fraction"),
    (dict(encoding="klingon"), "encoding"), (dict(encoding_errors="shrug"), "encoding_errors"),
    (dict(path=""), "path"), (dict(column=""), "column"), (dict(field=3), "field"),
    (dict(line_by_line="yes"), "line_by_line"),
])
def test_config_validation_names_the_field(options, name):
    with pytest.raises(OptionError) as e:
        DataConfig(**{"path": "x.txt", **options})
    assert e.value.field == name


def test_config_fields_have_help_and_accept_paths(tmp_path):
    assert all(f.metadata.get("help") for f in dataclasses.fields(DataConfig))
    assert DataConfig(tmp_path / "x.txt").path == str(tmp_path / "x.txt")
    with pytest.raises(OptionError, match="block_size"):
        prepare_data(DataConfig("x.txt"), Tokenizer.default(), 1)


def test_the_block_size_is_a_training_option_only():
    """DataConfig once had a block_size that nothing read; the run.json of such a run still loads."""
    assert "block_size" not in {f.name for f in dataclasses.fields(DataConfig)}
    with pytest.raises(TypeError):
        DataConfig("x.txt", block_size=64)
    saved = {f.name: f.default for f in dataclasses.fields(DataConfig) if f.name != "path"}
    assert DataConfig.from_json({**saved, "path": "x.txt", "block_size": None}) == DataConfig("x.txt")


# --- text handling ------------------------------------------------------------------------------

def test_newlines_normalised_but_unicode_separators_kept(tmp_path, monkeypatch):
    """Line ends: \\r\\n and \\r become \\n; U+2028, U+2029 and U+0085 are characters, not breaks."""
    monkeypatch.setattr(readers, "CHUNK_BYTES", 4)  # so a \\r\\n straddles two reads
    text = "a\r\nb\rc\u2028still c\u0085and c\u2029too\nd\r\n\r\ne"
    path = write(tmp_path / "mixed.txt", text)
    assert list(read_documents(DataConfig(str(path)))) == [
        "a\nb\nc\u2028still c\u0085and c\u2029too\nd\n\ne"]
    assert list(read_documents(DataConfig(str(path), line_by_line=True))) == [
        "a", "b", "c\u2028still c\u0085and c\u2029too", "d", "e"]
    quoted = write(tmp_path / "quoted.csv", 'Joke\r\n"two\r\nlines\rthree\u2028"\r\nnext\r\n')
    assert list(read_documents(DataConfig(str(quoted)))) == ["two\nlines\nthree\u2028", "next"]
    jsonl = write(tmp_path / "j.jsonl", json.dumps({"text": "x\r\ny\u2028z"}) + "\r\n")
    assert list(read_documents(DataConfig(str(jsonl)))) == ["x\ny\u2028z"]


def test_literal_endoftext_is_ordinary_text(tmp_path, tok):
    """The text `<|endoftext|>` is 7 tokens; the real EOS id ends each document, once."""
    docs = [f"first {LITERAL_EOS} joke, told twice: first {LITERAL_EOS} joke", "second joke " * 5, LITERAL_EOS]
    path = write(tmp_path / "eos.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
    d = prep(tmp_path, tok, block_size=8, path=str(path), val_fraction=0)
    tokens = np.asarray(d.train.tokens).tolist()
    assert tokens == [t for doc in docs for t in tok.encode(doc) + [tok.eos_id]]
    assert tokens.count(tok.eos_id) == 3 and d.documents == 3
    literal = tok.encode(LITERAL_EOS)
    assert len(literal) == 7 and tok.eos_id not in literal
    assert documents_of(np.asarray(d.train.tokens), tok) == docs


def test_long_document_pieces_give_the_same_tokens(tmp_path, tok, monkeypatch, jokes_csv):
    """A long document is tokenized in pieces; the cuts must not change a single token."""
    text = "\n".join(jokes_column(jokes_csv)[:300]) + " 東京は、とても大きい。数字123abc's"
    path = write(tmp_path / "long.txt", text)
    monkeypatch.setattr(readers, "PIECE_CHARS", 50)
    monkeypatch.setattr(readers, "CHUNK_BYTES", 97)
    pieces = list(readers.pieces(DataConfig(str(path)), path))
    assert len(pieces) > 100 and "".join(p for p, _ in pieces) == text
    assert [ends for _, ends in pieces].count(True) == 1
    d = prep(tmp_path, tok, path=str(path))
    assert np.asarray(d.train.tokens).tolist() == tok.encode(text) + [tok.eos_id]


def test_safe_cuts_property(tok):
    """Random text over tricky characters: cutting at `_safe_cut` points never changes the tokens."""
    alphabet = list("ab  \n\t'sSé東。，1².,!\u2028\u0085\xa0\x1ce\u0301") + ["'s", "'ll", " the", "  ", " 12"]
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120)))
        cuts = sorted({readers._safe_cut(text, end) for end in range(1, len(text))} - {0})
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert [t for p in pieces for t in tok.encode(p)] == tok.encode(text), text


# --- formats ------------------------------------------------------------------------------------

def test_tsv_jsonl_folder_and_line_by_line(tmp_path):
    spaced = write(tmp_path / "spaced.csv", "ID, Joke\n1, a joke\n")
    assert list(read_documents(DataConfig(str(spaced), column="Joke"))) == [" a joke"]
    tsv = write(tmp_path / "a.tsv", "id\ttext\n1\thello, world\n2\t\"quoted\ttab\"\n")
    assert list(read_documents(DataConfig(str(tsv), column="text"))) == ["hello, world", "quoted\ttab"]
    jsonl = write(tmp_path / "a.jsonl", '{"text": "one", "n": 1}\n\n{"text": "two"}\n')
    assert list(read_documents(DataConfig(str(jsonl), field="text"))) == ["one", "two"]
    single = write(tmp_path / "b.json", '{"body": "only field"}\n')
    assert list(read_documents(DataConfig(str(single)))) == ["only field"]
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    write(folder / "b.txt", "second\nfile\n")
    write(folder / "a.txt", "first file")
    write(folder / "sub" / "c.txt", "third")
    write(folder / "notes.md", "not text data")
    assert list(read_documents(DataConfig(str(folder)))) == ["first file", "second\nfile\n", "third"]
    assert list(read_documents(DataConfig(str(folder), line_by_line=True))) == ["first file", "second", "file",
                                                                                 "third"]
    other = write(tmp_path / "story.md", "  \n\nlines\n\n  indented\n")
    assert list(read_documents(DataConfig(str(other)))) == ["  \n\nlines\n\n  indented\n"]
    assert list(read_documents(DataConfig(str(other), line_by_line=True))) == ["lines", "  indented"]


def test_one_megabyte_row_without_spaces(tmp_path, tok):
    """A 1 MB CSV cell of one character run (above csv's default field limit) in bounded time."""
    path = write(tmp_path / "long.csv", "text\n" + "a" * 1_000_000 + "\nshort one\n")
    limit = csv.field_size_limit()
    start = time.perf_counter()
    d = prep(tmp_path, tok, block_size=1024, path=str(path), val_fraction=0)
    assert time.perf_counter() - start < 20
    assert d.documents == 2 and d.tokens == len(tok.encode("a" * 1_000_000)) + len(tok.encode("short one")) + 2
    assert csv.field_size_limit() == limit  # the process-wide limit is restored


def test_large_single_line_file_in_bounded_memory(tmp_path, tok):
    """A 20 MB file that is one line streams through in chunks. The tokenizer is stubbed
    (BPE speed is the tokenizer's business); the peak of Python allocations must stay far below
    the file size because text and ids are never held whole."""
    words = "the quick brown fox jumps over lazy dog and then some more words".split()
    rng = random.Random(0)
    line = " ".join(rng.choice(words) for _ in range(4_000_000))[:20_000_000]
    path = write(tmp_path / "big.txt", line)
    del line
    stub = Spy(tok, fast=True)
    data.tokenizer_identity(stub)
    tracemalloc.start()
    try:
        d = prep(tmp_path, stub, block_size=1024, path=str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000 / 5, f"peak {peak / 1e6:.1f} MB"
    assert d.documents == 1 and d.tokens > 4_000_000 and stub.batches > 100


def test_progress_bar_goes_to_stderr(tmp_path, tok, capsys):
    path = write(tmp_path / "a.txt", "some text here " * 40)
    prepare_data(DataConfig(str(path), cache_dir=str(tmp_path / "c1")), tok, 16, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "tokenizing" in err
    prepare_data(DataConfig(str(path), cache_dir=str(tmp_path / "c2")), tok, 16)
    assert capsys.readouterr() == ("", "")


# --- cache --------------------------------------------------------------------------------------

def test_second_call_is_a_cache_hit(tmp_path, tok, jokes_csv):
    spy = Spy(tok)
    first = prep(tmp_path, spy, block_size=128, path=str(jokes_csv), column="Joke")
    batches = spy.batches
    second = prep(tmp_path, spy, block_size=128, path=str(jokes_csv), column="Joke")
    assert (first.cached, second.cached) == (False, True)
    assert spy.batches == batches, "a cache hit tokenizes nothing"
    assert second.fingerprint == first.fingerprint
    counts = lambda d: (d.documents, d.val_documents, d.tokens)  # noqa: E731
    assert counts(second) == counts(first)
    assert np.array_equal(second.train.tokens, first.train.tokens)
    assert np.array_equal(second.val.tokens, first.val.tokens)
    folder = tmp_path / "cache" / first.fingerprint
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "train.bin", "val.bin"]
    assert json.loads((folder / "manifest.json").read_text())["dtype"] == "uint16"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.fingerprint]  # no temp folders left


def test_cache_miss_after_the_file_changes(tmp_path, tok):
    path = write(tmp_path / "a.txt", "first version of the text " * 20)
    first = prep(tmp_path, tok, path=str(path), line_by_line=True)
    write(path, "second version of the text " * 20)
    second = prep(tmp_path, tok, path=str(path), line_by_line=True)
    assert not second.cached and second.fingerprint != first.fingerprint
    assert tok.decode(np.asarray(second.train.tokens).tolist()).startswith("second")


def test_fingerprint_covers_options_seed_and_tokenizer(tmp_path, tok):
    csv_path = write(tmp_path / "a.csv", "a,b\n" + "".join(f"x{i},y{i} words\n" for i in range(40)))
    base = dict(path=str(csv_path), column="b")
    ref = prep(tmp_path, tok, **base).fingerprint
    variants = [dict(column="a"), dict(encoding="latin-1"), dict(encoding_errors="replace"), dict(val_fraction=0.1),
                dict(val_fraction=0)]
    prints = [prep(tmp_path, tok, **{**base, **v}).fingerprint for v in variants]
    prints.append(prep(tmp_path, tok, seed=1, **base).fingerprint)
    prints.append(prep(tmp_path, Spy(tok, alter=True), **base).fingerprint)
    txt = write(tmp_path / "t.txt", "one\ntwo\n" * 20)
    prints += [prep(tmp_path, tok, path=str(txt)).fingerprint,
               prep(tmp_path, tok, path=str(txt), line_by_line=True).fingerprint]
    assert len(set(prints + [ref])) == len(prints) + 1
    assert prep(tmp_path, tok, **base).fingerprint == ref  # and stable
    moved = write(tmp_path / "moved.csv", csv_path.read_bytes())
    assert prep(tmp_path, tok, path=str(moved), column="b").cached  # content, not the path, is the key


def test_crash_leaves_no_complete_looking_entry(tmp_path, tok, monkeypatch, jokes_csv):
    monkeypatch.setattr(data, "BATCH_PIECES", 10)
    spy = Spy(tok)

    def failing(texts):
        if spy.batches == 3:
            raise KeyboardInterrupt
        spy.batches += 1
        return tok.encode_batch(texts)

    spy.encode_batch = failing
    with pytest.raises(KeyboardInterrupt):
        prep(tmp_path, spy, path=str(jokes_csv), column="Joke")
    assert list((tmp_path / "cache").iterdir()) == []
    d = prep(tmp_path, tok, path=str(jokes_csv), column="Joke")
    assert not d.cached and d.documents + d.val_documents == 2950


def test_torn_cache_entry_is_rebuilt(tmp_path, tok, jokes_csv):
    first = prep(tmp_path, tok, path=str(jokes_csv), column="Joke")
    folder = tmp_path / "cache" / first.fingerprint
    del first
    with open(folder / "train.bin", "r+b") as f:
        f.truncate(1000)
    again = prep(tmp_path, tok, path=str(jokes_csv), column="Joke")
    assert not again.cached and again.train.n_tokens * 2 == (folder / "train.bin").stat().st_size
    (folder / "manifest.json").write_text("{not json")
    assert not prep(tmp_path, tok, path=str(jokes_csv), column="Joke").cached


def test_large_vocabularies_use_uint32(tmp_path, tok):
    path = write(tmp_path / "a.txt", "some words to tokenize " * 20)
    d = prep(tmp_path, Spy(tok, vocab_size=70_000), path=str(path))
    assert d.train.tokens.dtype == np.uint32
    assert np.asarray(d.train.tokens).tolist() == tok.encode(path.read_text()) + [tok.eos_id]


def test_default_cache_dir_from_environment(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("GPT2KIT_CACHE", str(tmp_path / "env-cache"))
    path = write(tmp_path / "a.txt", "some words to tokenize " * 20)
    d = prepare_data(DataConfig(str(path)), tok, 16)
    assert (tmp_path / "env-cache" / d.fingerprint / "manifest.json").is_file()


# --- validation split ---------------------------------------------------------------------------

def lines_file(tmp_path: Path, n: int, words: int = 6) -> Path:
    return write(tmp_path / f"lines{n}.txt", "".join(f"document {i} " + "word " * words + "\n" for i in range(n)))


def split_of(d: PreparedData, tok) -> tuple[list[str], list[str]]:
    val = documents_of(np.asarray(d.val.tokens), tok) if d.val is not None else []
    return documents_of(np.asarray(d.train.tokens), tok), val


def test_split_is_deterministic_per_seed(tmp_path, tok):
    path = lines_file(tmp_path, 400)
    a = prep(tmp_path, tok, path=str(path), line_by_line=True, val_fraction=0.2, seed=1)
    b = prep(tmp_path, tok, path=str(path), line_by_line=True, val_fraction=0.2, seed=1,
             cache_dir=str(tmp_path / "other-cache"))
    c = prep(tmp_path, tok, path=str(path), line_by_line=True, val_fraction=0.2, seed=2)
    assert not b.cached and split_of(a, tok) == split_of(b, tok)
    assert split_of(a, tok)[1] != split_of(c, tok)[1]
    train, val = split_of(a, tok)
    assert 40 <= len(val) <= 120 and not set(train) & set(val) and len(train) + len(val) == 400
    assert train == sorted(train, key=lambda s: int(s.split()[1]))  # document order is kept


def test_val_never_empty_and_train_never_empty(tmp_path, tok):
    path = lines_file(tmp_path, 2, words=40)
    for seed in range(5):
        d = prep(tmp_path, tok, path=str(path), line_by_line=True, val_fraction=0.01, seed=seed)
        assert (d.documents, d.val_documents) == (1, 1) and d.val is not None
        d = prep(tmp_path, tok, path=str(path), line_by_line=True, val_fraction=0.5, seed=seed)
        assert (d.documents, d.val_documents) == (1, 1)
    off = prep(tmp_path, tok, path=str(path), line_by_line=True, val_fraction=0)
    assert (off.documents, off.val_documents, off.val) == (2, 0, None)


def test_single_document_has_no_val_and_says_so(tmp_path, tok):
    path = write(tmp_path / "one.txt", "a single document with enough words " * 10)
    for seed in range(4):
        d = prep(tmp_path, tok, path=str(path), val_fraction=0.5, seed=seed)
        assert (d.documents, d.val_documents, d.val) == (1, 0, None)
        assert any("single document" in n for n in d.notes)


def test_val_file(tmp_path, tok):
    train = write(tmp_path / "train.csv", "text\n" + "training row words here\n" * 20)
    val = write(tmp_path / "val.csv", "text\n" + "held out row\n" * 5)
    d = prep(tmp_path, tok, block_size=8, path=str(train), val_file=str(val), val_fraction=0.3)
    assert (d.documents, d.val_documents) == (20, 5)
    assert set(split_of(d, tok)[1]) == {"held out row"}
    blank_val = write(tmp_path / "blank.csv", "text\n\n")
    with pytest.raises(InputFileError, match=r"no validation text found in .*blank\.csv"):
        prep(tmp_path, tok, path=str(train), val_file=str(blank_val))


def test_check_input_fails_fast_on_either_file(tmp_path, jokes_csv):
    """check_input reads only the first piece of each file, and fails as the full read would."""
    good = write(tmp_path / "train.csv", "text\n" + "training row\n" * 3)
    readers.check_input(DataConfig(str(good), val_file=str(good)))
    blank = write(tmp_path / "blank.csv", "text\n\n")
    jsonl = write(tmp_path / "rows.jsonl", '{"text": "one"}\n')
    bad = [
        (dict(path=str(tmp_path / "missing.txt")), r"data file .*missing\.txt does not exist"),
        (dict(path=str(good), val_file=str(tmp_path / "gone.csv")), r"validation file .*gone\.csv does not exist"),
        (dict(path=str(jokes_csv)), "pass --column"),
        (dict(path=str(jokes_csv), column="Jokes"), "has no column 'Jokes'"),
        (dict(path=str(jsonl), field="body"), "has no field 'body'"),
        (dict(path=str(blank)), r"no training text found in .*blank\.csv"),
        (dict(path=str(good), val_file=str(blank)), r"no validation text found in .*blank\.csv"),
    ]
    for options, message in bad:
        with pytest.raises(InputFileError, match=message):
            readers.check_input(DataConfig(**options))


# --- block size ---------------------------------------------------------------------------------

def test_block_size_fallback_and_too_little_text(tmp_path, tok):
    path = write(tmp_path / "small.txt", "word" + " word" * 299)  # 300 tokens + EOS
    d = prep(tmp_path, tok, block_size=1024, path=str(path), val_fraction=0)
    assert d.tokens == 301 and d.block_size == 64 and len(d.train) == 4
    assert d.notes == ["the training text has 301 tokens, fewer than 4 blocks of 1024: using 64-token blocks"]
    exact = prep(tmp_path, tok, block_size=75, path=str(path), val_fraction=0)
    assert (exact.block_size, exact.notes, len(exact.train)) == (75, [], 4)
    tiny = write(tmp_path / "tiny.txt", "just a few words")
    with pytest.raises(InputFileError, match=r"has only 5 tokens of training text; at least 32 are needed: add more"):
        prep(tmp_path, tok, block_size=1024, path=str(tiny))


def test_val_shorter_than_a_block_is_dropped_with_a_note(tmp_path, tok):
    train = write(tmp_path / "train.txt", "many training words " * 100)
    val = write(tmp_path / "val.txt", "short")
    d = prep(tmp_path, tok, block_size=64, path=str(train), val_file=str(val))
    assert d.val is None and d.val_documents == 1
    assert any("validation split has 2 tokens" in n for n in d.notes)


def test_unwritable_cache_dir(tmp_path, tok):
    path = write(tmp_path / "a.txt", "some words to tokenize " * 20)
    blocker = write(tmp_path / "not-a-folder", "")
    with pytest.raises(OptionError, match=r"^cache_dir folder .*not-a-folder cannot be written") as e:
        prep(tmp_path, tok, path=str(path), cache_dir=str(blocker))
    assert e.value.as_flag().startswith("--cache-dir folder")
