"""Tokenizer tests: token-for-token parity with tiktoken's gpt2 encoding and transformers'
GPT2TokenizerFast (both built offline from the shipped vocabulary files), round trips, special
tokens, streaming, and untrusted vocabulary files."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt2kit.tokenizer
from gpt2kit.errors import TokenizerError
from gpt2kit.tokenizer import Tokenizer

# The shipped assets are OpenAI's encoder.json and vocab.bpe under transformers' names (byte for
# byte; test_assets_are_the_released_gpt2_files checks their hashes). The oracles read the same files.
ASSETS = Path(gpt2kit.tokenizer.__file__).parent / "assets"
ENCODER_JSON, VOCAB_BPE = ASSETS / "vocab.json", ASSETS / "merges.txt"
EOT = "<|endoftext|>"

TEXTS = {
    "empty": "",
    "ascii": "Hello, world! How's it going?",
    "emoji": "I 🤗 you 😀😃 🫠",
    "zwj": "👨‍👩‍👧‍👦 and 🏳️‍🌈 and 👍🏽",
    "cjk": "日本語のテキスト、中文文本，한국어 텍스트",
    "combining": "e\u0301 n\u0303 a\u0308\u0304 Z̤͔ͧ̑̓ä͖̭̈̇",
    "crlf": "line one\r\nline two\r\n\r\n",
    "nul": "a\x00b\x00\x00c",
    "controls": "\x01\x1b[31mred\x1b[0m\x7f\t\v\f",
    "unicode_spaces": "x\u00a0y\u2028z\u0085w\u3000v\u200b\ufeff",
    "spaces_10k": " " * 10_000,
    "newlines_10k": "\n" * 10_000,
    "zeros_10k": "0" * 10_000,
    "apostrophe_s_10k": "'s" * 10_000,
    "contractions": "I'm you're he's we've they'll I'd DON'T 'S 'll",
    "digits": "3.14159 1,000,000 ١٢٣ ½ ²³ ⅷ",
    "code": 'def f(x):\n\tif x:\n        return {"a": [1, 2]}  # ok\n\n\n',
    "long_line": "x = [" + ", ".join(str(i) for i in range(20_000)) + "]",
    "long_words": "word " * 20_000,
    "literal_eot": f"a{EOT}b {EOT}",
    "trailing_ws": "end with spaces   \n\n  ",
    "scripts": "Привет мир ✓ مرحبا שלום हिंदी ภาษาไทย",
}
SHORT_TEXTS = [text for name, text in TEXTS.items() if not name.startswith("long")]
STREAM_TEXTS = ["🤗 hugs", "café é", "한국어 텍스트", "世界你好", "👨‍👩‍👧‍👦 family", "mixed é 🤗 世 한 z"]
# Characters that stress GPT-2's pre-tokenizer regex: contractions, digits, whitespace kinds, marks.
TRICKY = list(" \t\n\r\x00'sdmtlvreSDMTLVRE0123456789aZ_-.,!?<|>"
              "é世🤗\u200d\u0301\u00a0\u3000\u0085\u2028\ufeff")
texts = st.one_of(st.text(max_size=100), st.text(alphabet=st.sampled_from(TRICKY), max_size=60))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    """tiktoken's gpt2 encoding, from local files (get_encoding("gpt2") would download them)."""
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is a test dependency (pip install -e \".[test]\"); CI installs it")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATA_GYM_CACHE_DIR", "")  # read the files directly, write no cache
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(VOCAB_BPE), encoder_json_file=str(ENCODER_JSON))
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: 50256})


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """The vocabulary under transformers' file names (vocab.json, merges.txt)."""
    folder = tmp_path_factory.mktemp("hf-gpt2-vocab")
    shutil.copy(ENCODER_JSON, folder / "vocab.json")
    shutil.copy(VOCAB_BPE, folder / "merges.txt")
    return folder


@pytest.fixture(scope="module")
def hf_gpt2(hf_folder):
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e \".[test]\"); CI installs it")
    # from_pretrained, not GPT2TokenizerFast(vocab_file=..., merges_file=...): transformers 5 ignores
    # those two arguments and builds an empty vocabulary, so the size check below guards the oracle.
    hf = transformers.GPT2TokenizerFast.from_pretrained(hf_folder)
    assert len(hf) == 50257 and hf.encode("hello world") == [31373, 995]
    return hf


def hf_ids(hf, text: str) -> list[int]:
    return hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_assets_are_the_released_gpt2_files():
    # The SHA-256 values tiktoken_ext/openai_public.py pins for OpenAI's encoder.json / vocab.bpe.
    assets = ASSETS
    assert hashlib.sha256((assets / "vocab.json").read_bytes()).hexdigest().startswith("196139668be63f3b")
    assert hashlib.sha256((assets / "merges.txt").read_bytes()).hexdigest().startswith("1ce1664773c50f3e")
    assert "Copyright (c) 2019 OpenAI" in (assets / "LICENSE-gpt2-vocab.txt").read_text(encoding="utf-8")


def test_default_properties(tok):
    assert (tok.eos_id, tok.eos_token, tok.vocab_size) == (50256, EOT, 50257)
    assert tok.source == "built-in GPT-2 vocabulary"
    assert Tokenizer.default() is tok


@pytest.mark.parametrize("name", TEXTS)
def test_fixed_texts_match_tiktoken_and_transformers(tok, tiktoken_gpt2, hf_gpt2, name):
    text = TEXTS[name]
    ids = tok.encode(text)
    assert ids == tiktoken_gpt2.encode_ordinary(text)
    assert ids == hf_ids(hf_gpt2, text)
    assert tok.decode(ids) == text


@settings(max_examples=300, deadline=None)
@given(text=texts)
def test_generated_texts_match_oracles_and_round_trip(tok, tiktoken_gpt2, hf_gpt2, text):
    ids = tok.encode(text)
    assert ids == tiktoken_gpt2.encode_ordinary(text)
    assert ids == hf_ids(hf_gpt2, text)
    assert tok.decode(ids) == text


def test_encode_batch_equals_encode(tok):
    batch = list(TEXTS.values())
    assert tok.encode_batch(batch) == [tok.encode(t) for t in batch]
    assert tok.encode_batch(batch, allow_special=True) == [tok.encode(t, allow_special=True) for t in batch]
    assert tok.encode_batch([]) == []


def test_special_token_text_is_ordinary_by_default(tok, tiktoken_gpt2):
    ids = tok.encode(EOT)
    assert len(ids) == 7 and ids == tiktoken_gpt2.encode_ordinary(EOT)
    many = f"x{EOT}" * 100
    assert 50256 not in tok.encode(many)
    assert all(50256 not in ids for ids in tok.encode_batch([many, EOT]))


def test_allow_special_makes_it_one_token(tok, tiktoken_gpt2):
    text = f"Hello{EOT} world{EOT}"
    ids = tok.encode(text, allow_special=True)
    assert ids == tiktoken_gpt2.encode(text, allowed_special="all") == [15496, 50256, 995, 50256]
    assert tok.decode(ids) == text


@pytest.mark.parametrize("bad", [50257, -1, 2**40])
def test_out_of_range_ids_raise_naming_id_and_size(tok, bad):
    for call in (lambda: tok.decode([1, bad]), lambda: tok.decode_bytes([bad]), lambda: tok.token_bytes(bad),
                 lambda: tok.stream_decoder().add(bad)):
        with pytest.raises(TokenizerError, match=rf"{bad}\b.*vocabulary size 50257"):
            call()
    assert issubclass(TokenizerError, ValueError)


def test_non_integer_ids_and_inputs_are_rejected(tok):
    with pytest.raises(TokenizerError, match="integers"):
        tok.decode([1.5])
    with pytest.raises(TokenizerError, match="integers"):
        tok.decode(["50"])
    for bad in (lambda: tok.encode(None), lambda: tok.encode_batch("abc"), lambda: tok.encode_batch([("a", "b")])):
        with pytest.raises(TokenizerError):
            bad()
    with pytest.raises(TokenizerError, match="errors mode"):
        tok.decode([1], errors="nonsense")
    assert tok.decode(range(3)) == '!"#'


def test_lone_surrogate_becomes_replacement_like_tiktoken(tok, tiktoken_gpt2):
    for text in ["\ud83d", "ok \udc00 then", "\ud83d\ude00"]:  # the last is a pair: joined into 😀
        ids = tok.encode(text)
        assert ids == tiktoken_gpt2.encode_ordinary(text)
        assert tok.encode_batch(["fine", text]) == [tok.encode("fine"), ids]
    assert tok.decode(tok.encode("\ud83d")) == "\ufffd"
    assert tok.decode(tok.encode("\ud83d\ude00")) == "😀"


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(categories=["Cs", "L", "Zs", "So"]), max_size=40))
def test_surrogate_text_matches_tiktoken(tok, tiktoken_gpt2, text):
    assert tok.encode(text) == tiktoken_gpt2.encode_ordinary(text)


def test_lone_continuation_byte(tok, tiktoken_gpt2):
    token = tiktoken_gpt2.encode_single_token(b"\x80")
    assert tok.token_bytes(token) == tok.decode_bytes([token]) == b"\x80"
    assert tok.decode([token]) == "\ufffd"
    with pytest.raises(TokenizerError, match="invalid UTF-8 at byte 0"):
        tok.decode([token], errors="strict")
    assert tok.decode(tok.encode("é"), errors="strict") == "é"


def stream(tok, ids) -> list[str]:
    decoder = tok.stream_decoder()
    return [decoder.add(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_decoder_emits_whole_characters(tok, text):
    ids = tok.encode(text)
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)
    assert len(ids) > len(text.encode("utf-8")) // 4  # multi-token characters really occur


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 50256), max_size=30))
def test_stream_decoder_equals_decode_on_any_ids(tok, ids):
    chunks = stream(tok, ids)
    full = tok.decode(ids)
    assert "".join(chunks) == full
    assert "\ufffd" in full or not any("\ufffd" in c for c in chunks)


def test_stream_decoder_flush_then_reuse(tok):
    decoder = tok.stream_decoder()
    first = tok.encode("🤗")
    assert decoder.add(first[0]) == "" and decoder.flush() == "\ufffd"
    assert "".join(decoder.add(i) for i in tok.encode("é")) == "é"


def test_long_input_without_spaces_is_linear(tok):
    # Bounded time on hostile input (tiktoken#195): one 1 MB pre-token. tokenizers' BPE merges with a priority queue
    # (about 0.6 s here); the budget is generous for a slow CI machine.
    text = "a" * 1_000_000
    start = time.perf_counter()
    ids = tok.encode(text)
    assert time.perf_counter() - start < 10
    assert tok.decode(ids) == text


# --- loading from a checkpoint folder -------------------------------------------------------------

def test_folder_without_tokenizer_files_gives_none(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert Tokenizer.from_folder(tmp_path) is None
    assert Tokenizer.from_folder(tmp_path / "missing") is None


@pytest.fixture(scope="module")
def pad_folder(hf_folder, tmp_path_factory) -> Path:
    """A transformers-saved tokenizer with an added <|pad|>, plus plain vocab files without it."""
    from transformers import GPT2TokenizerFast
    hf = GPT2TokenizerFast.from_pretrained(hf_folder)
    hf.add_special_tokens({"pad_token": "<|pad|>"})
    folder = tmp_path_factory.mktemp("pad-tokenizer")
    hf.save_pretrained(folder)
    shutil.copy(ENCODER_JSON, folder / "vocab.json")  # must lose to tokenizer.json
    shutil.copy(VOCAB_BPE, folder / "merges.txt")
    return folder


def test_tokenizer_json_takes_precedence_with_its_added_tokens(pad_folder, tok):
    from transformers import AutoTokenizer
    loaded = Tokenizer.from_folder(pad_folder)
    assert loaded.vocab_size == 50258 and loaded.source == str(pad_folder) and loaded.eos_id == 50256
    text = f"a<|pad|>b{EOT}"
    ids = loaded.encode(text, allow_special=True)
    assert ids == AutoTokenizer.from_pretrained(pad_folder).encode(text) == [64, 50257, 65, 50256]
    assert loaded.encode(text) == tok.encode(text)  # special tokens are text by default
    assert loaded.decode(ids) == text


def test_legacy_vocab_merges_added_tokens_layout(tmp_path, tok):
    shutil.copy(ENCODER_JSON, tmp_path / "vocab.json")
    shutil.copy(VOCAB_BPE, tmp_path / "merges.txt")
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|pad|>": 50257}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": EOT},
                                                                  "pad_token": "<|pad|>"}))
    loaded = Tokenizer.from_folder(tmp_path)
    assert loaded.vocab_size == 50258
    assert loaded.encode("x<|pad|>", allow_special=True) == [87, 50257]
    assert loaded.encode("x<|pad|>") == tok.encode("x<|pad|>")


def test_tokenizer_json_truncation_and_padding_are_ignored(tmp_path, tok):
    tok.save(tmp_path)
    path = tmp_path / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    data["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None,
                       "pad_id": 50256, "pad_type_id": 0, "pad_token": EOT}
    path.write_text(json.dumps(data), encoding="utf-8")
    text = "one two three four five six"
    loaded = Tokenizer.from_folder(tmp_path)
    assert loaded.encode(text) == loaded.encode(text, allow_special=True) == tok.encode(text)
    assert loaded.encode_batch([text], allow_special=True) == [tok.encode(text)]


@pytest.mark.parametrize("with_pad", [False, True])
def test_save_loads_identically_in_transformers_and_here(tmp_path, tok, pad_folder, with_pad):
    from transformers import AutoTokenizer
    ours = Tokenizer.from_folder(pad_folder) if with_pad else tok
    ours.save(tmp_path)
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    again = Tokenizer.from_folder(tmp_path)
    assert theirs.eos_token == EOT and len(theirs) == ours.vocab_size == again.vocab_size
    for text in [*SHORT_TEXTS, f"a<|pad|>b{EOT}"]:
        assert theirs.encode(text, split_special_tokens=True) == ours.encode(text) == again.encode(text)
        assert theirs.encode(text) == ours.encode(text, allow_special=True) == again.encode(text, allow_special=True)


# --- untrusted vocabulary files -----------------------------------------------------------------

def tiny_vocab() -> dict[str, int]:
    """The 256 byte tokens (GPT-2's first 256 ids), one merge result, and <|endoftext|>."""
    full = json.loads(ENCODER_JSON.read_text(encoding="utf-8"))
    vocab = {t: i for t, i in full.items() if i < 256}
    return {**vocab, "Ġt": 256, EOT: 257}


def write_tiny(folder: Path, vocab=None, merges="#version: 0.2\nĠ t\n") -> Path:
    (folder / "vocab.json").write_text(json.dumps(tiny_vocab() if vocab is None else vocab), encoding="utf-8")
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    return folder


def test_tiny_custom_vocabulary_loads(tmp_path):
    loaded = Tokenizer.from_folder(write_tiny(tmp_path))
    assert loaded.vocab_size == 258 and loaded.eos_id == 257
    assert loaded.encode(" t") == [256]
    assert loaded.decode(loaded.encode("any 🤗 text")) == "any 🤗 text"


def _dup(v):
    v["Ġt"] = 5
    return v


def _hole(v):
    v["Ġt"] = 10**9
    return v


def _drop(v):
    del v["Ġ"]
    return v


BAD_VOCABS = {
    "not json": ("{", "not valid JSON"),
    "a list": ([1, 2], "JSON object"),
    "duplicate id": (_dup, "used by both"),
    "negative id": (lambda v: {**v, "Ġt": -1}, "non-negative"),
    "string id": (lambda v: {**v, "Ġt": "256"}, "non-negative"),
    "bool id": (lambda v: {**v, "Ġt": True}, "non-negative"),
    "id gap": (_hole, "without gaps"),
    "huge id": (lambda v: {**v, "Ġt": 2**40}, "without gaps"),
    "missing byte": (_drop, "byte tokens are missing"),
    "foreign characters": (lambda v: {**v, "日本": 258}, "byte alphabet"),
}


@pytest.mark.parametrize("case", BAD_VOCABS)
def test_bad_vocab_json_is_refused_naming_the_file(tmp_path, case):
    change, message = BAD_VOCABS[case]
    write_tiny(tmp_path)
    content = change(tiny_vocab()) if callable(change) else change
    (tmp_path / "vocab.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(TokenizerError, match=message) as err:
        Tokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("merges, message", [
    ("#version: 0.2\nĠ t x\n", "merge 1"),
    ("#version: 0.2\nĠ t\nz q\n", "merge 2"),  # "zq" is not a token: tokenizers itself would panic
    ("#version: 0.2\nĠ nope\n", "merge 1"),
])
def test_bad_merges_are_refused(tmp_path, merges, message):
    write_tiny(tmp_path, merges=merges)
    with pytest.raises(TokenizerError, match=message) as err:
        Tokenizer.from_folder(tmp_path)
    assert "merges.txt" in str(err.value)


def test_unreadable_and_incomplete_files(tmp_path):
    write_tiny(tmp_path)
    (tmp_path / "merges.txt").write_bytes(b"#version: 0.2\n\xff\xfe t\n")
    with pytest.raises(TokenizerError, match="merges.txt.*UTF-8"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(TokenizerError, match="no merges.txt"):
        Tokenizer.from_folder(tmp_path)


def test_added_token_ids_must_follow_the_vocabulary(tmp_path):
    write_tiny(tmp_path)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|pad|>": 300}))
    with pytest.raises(TokenizerError, match="0 to 258 without gaps"):
        Tokenizer.from_folder(tmp_path)


def test_missing_eos_token_is_refused(tmp_path):
    write_tiny(tmp_path)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|eos|>"}))
    with pytest.raises(TokenizerError, match="end-of-text token '<\\|eos\\|>'"):
        Tokenizer.from_folder(tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda d: "{", "not valid JSON"),
    (lambda d: {**d, "model": {**d["model"], "type": "WordPiece"}}, "not a BPE tokenizer"),
    (lambda d: {**d, "model": {**d["model"], "merges": [["z", "q"]]}}, "merge 1"),
    (lambda d: {**d, "pre_tokenizer": {"type": "NoSuchThing"}}, "cannot be loaded by tokenizers"),
])
def test_bad_tokenizer_json_is_refused(tmp_path, change, message):
    tiny = Tokenizer.from_folder(write_tiny(tmp_path))
    tiny.save(tmp_path)
    path = tmp_path / "tokenizer.json"
    content = change(json.loads(path.read_text(encoding="utf-8")))
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    with pytest.raises(TokenizerError, match=message) as err:
        Tokenizer.from_folder(tmp_path)
    assert "tokenizer.json" in str(err.value)
