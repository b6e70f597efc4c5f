"""The loaders fuzzed (issue 17): random corruptions of every checkpoint format gpt2kit reads, built
here from a tiny random GPT-2 (safetensors headers, shard indexes, config.json values, `.bin`
archives and legacy pickles, nanoGPT model_args, TensorFlow index blocks and hparams.json).

Each load must end either loaded or in one gpt2kit error (one line, a type from gpt2kit.errors),
within seconds, and must not allocate far beyond what the files hold. Examples are derandomized
(the same ones every run: a CI failure is reproducible, not luck).
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from helpers_checkpoints import CPU, save_nanogpt, tiny_hf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2kit import errors
from gpt2kit.checkpoints import load_model
from gpt2kit.checkpoints.tf_bundle import FOOTER, _entries, _varint, masked_crc32c

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tf-tiny"
HANG_S = 30  # a load still running after this is a hang: the example fails with a traceback here
MAX_GROWTH = 64 * 2**20  # resident memory a load may add beyond 4x the checkpoint's own bytes
FAST = settings(max_examples=60, deadline=timedelta(seconds=5), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

Files = dict[str, bytes]  # a checkpoint: file name -> contents

# ---- the pristine checkpoints, built once --------------------------------------------------


def read_folder(folder: Path) -> Files:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


class Checkpoints(dict):
    """layout -> Files; shown by its layouts only (hypothesis prints the arguments of a failure)."""

    def __repr__(self) -> str:
        return f"Checkpoints({', '.join(self)})"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Checkpoints:
    root = tmp_path_factory.mktemp("pristine")
    ref = tiny_hf()  # a 128-token vocabulary: ~50 KB of weights
    ref.save_pretrained(root / "safetensors")
    ref.save_pretrained(root / "sharded", max_shard_size="20KB")
    (root / "bin").mkdir()
    ref.config.save_pretrained(root / "bin")
    torch.save(ref.state_dict(), root / "bin" / "pytorch_model.bin")
    (root / "legacy").mkdir()
    ref.config.save_pretrained(root / "legacy")
    torch.save(ref.state_dict(), root / "legacy" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    save_nanogpt(tiny_hf(vocab_size=50257), root / "nanogpt" / "ckpt.pt")  # GPT-2's vocabulary, no less
    shutil.copytree(FIXTURE, root / "tf", ignore=shutil.ignore_patterns("expected_logits.npz"))
    found = Checkpoints({name: read_folder(root / name) for name in
                         ("safetensors", "sharded", "bin", "legacy", "nanogpt", "tf")})
    assert sum(name.endswith(".safetensors") for name in found["sharded"]) > 1
    for files in found.values():  # each loads as it is, so every failure below is the corruption's
        assert outcome(files) == "loaded"
    return found


# ---- the property -------------------------------------------------------------------------


@contextlib.contextmanager
def hang_guard(seconds: int):
    """Fail a load that runs past `seconds` (hypothesis' deadline only judges finished examples)."""
    def stop(signum, frame):
        raise TimeoutError(f"a load ran for more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def outcome(files: Files) -> str:
    """Write `files` to a fresh folder and load it: "loaded" or the error's message. Any other
    exception, a hang or a peak of resident memory far above the files' size fails the test."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        before, peak_before = resident(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            with hang_guard(HANG_S):
                load_model(str(folder), CPU, torch.float32)
            result = "loaded"
        except errors.Gpt2kitError as e:
            assert type(e).__module__ == "gpt2kit.errors", f"{type(e)} is not one of gpt2kit.errors' types"
            result = str(e)
            assert result and "\n" not in result, f"not one line: {result!r}"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if peak > peak_before:  # this load set a new peak (kB): it is what the load added
            growth = peak * 1024 - before
            limit = MAX_GROWTH + 4 * sum(len(d) for d in files.values())
            assert growth < limit, f"the load grew resident memory by {growth / 2**20:.0f} MB"
        return result


def test_the_guards_can_fail(pristine, monkeypatch):
    """outcome() is not vacuous: a load that makes resident memory grow far past the files fails
    it, and so does one that runs on."""
    def greedy(*args):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        torch.ones((peak - resident() + MAX_GROWTH + 2**25) // 4)  # written, so resident

    monkeypatch.setattr(sys.modules[__name__], "load_model", greedy)
    with pytest.raises(AssertionError, match="grew resident memory"):
        outcome(pristine["safetensors"])
    with pytest.raises(TimeoutError), hang_guard(1):
        time.sleep(5)


# ---- corruptions ----------------------------------------------------------------------------

def flip(data: bytes, flips: list[tuple[float, int]], start: int = 0, end: int | None = None) -> bytes:
    """XOR each (place in [0, 1) of data[start:end], mask) into the data."""
    out = bytearray(data)
    end = len(out) if end is None else end
    for where, mask in flips:
        out[start + int(where * (end - start))] ^= mask
    return bytes(out)


def cut(data: bytes, where: float) -> bytes:
    return data[:int(where * len(data))]


FLIPS = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=6)
PLACE = st.floats(0, 1, exclude_max=True)
# JSON values a hostile file may hold: wrong types, huge and negative numbers, NaN and infinity.
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, -1, 2**31, 2**63])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


def safetensors_parts(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def safetensors_bytes(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


# ---- safetensors ------------------------------------------------------------------------------

@FAST
@given(flips=FLIPS)
def test_safetensors_header_bytes_flipped(pristine, flips):
    files = dict(pristine["safetensors"])
    data = files["model.safetensors"]
    files["model.safetensors"] = flip(data, flips, 0, 8 + struct.unpack("<Q", data[:8])[0])
    outcome(files)


@FAST
@given(where=PLACE, length=st.none() | st.integers(0, 2**64 - 1))
def test_safetensors_truncated_or_header_length_rewritten(pristine, where, length):
    files = dict(pristine["safetensors"])
    data = files["model.safetensors"]
    files["model.safetensors"] = cut(data, where) if length is None else struct.pack("<Q", length) + data[8:]
    assert outcome(files) != "loaded"


ENTRY = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I8", "BOOL", "U8", "F8_E4M3", "X"]) | VALUES,
    "shape": st.lists(st.integers(-2, 2**40) | st.sampled_from([0, 1, 32, 96, 128]), max_size=4) | VALUES,
    "data_offsets": st.lists(st.integers(-1, 2**64), min_size=2, max_size=2) | VALUES,
})


@FAST
@given(pick=st.integers(0, 2**16), entry=ENTRY, rename=st.none() | st.text(max_size=40))
def test_safetensors_header_entries_rewritten(pristine, pick, entry, rename):
    """A well-formed header whose entries lie: dtypes, shapes and offsets the data does not hold,
    tensor names of other layers or of nothing."""
    files = dict(pristine["safetensors"])
    header, body = safetensors_parts(files["model.safetensors"])
    names = sorted(k for k in header if k != "__metadata__")
    name = names[pick % len(names)]
    header[name] = {**header[name], **entry}
    if rename is not None:
        header[rename] = header.pop(name)
    files["model.safetensors"] = safetensors_bytes(header, body)
    outcome(files)


# ---- shard indexes ----------------------------------------------------------------------------

INDEX = "model.safetensors.index.json"


@FAST
@given(pick=st.integers(0, 2**16), value=VALUES | st.sampled_from(
    ["../x.safetensors", "/etc/passwd", "model-00001-of-00002.safetensors", "", "a\0b.safetensors"]),
    flips=st.none() | FLIPS, cut_at=st.none() | PLACE)
def test_shard_index_corrupted(pristine, pick, value, flips, cut_at):
    files = dict(pristine["sharded"])
    index = json.loads(files[INDEX])
    names = sorted(index["weight_map"])
    index["weight_map"][names[pick % len(names)]] = value
    text = json.dumps(index).encode()
    text = text if flips is None else flip(text, flips)
    files[INDEX] = text if cut_at is None else cut(text, cut_at)
    outcome(files)


@FAST
@given(index=VALUES)
def test_shard_index_replaced_by_any_json(pristine, index):
    files = dict(pristine["sharded"])
    files[INDEX] = json.dumps(index).encode()
    assert outcome(files) != "loaded"


# ---- config.json ------------------------------------------------------------------------------

CONFIG_KEYS = ("vocab_size", "n_positions", "n_ctx", "n_embd", "n_layer", "n_head", "n_inner",
               "layer_norm_epsilon", "resid_pdrop", "model_type", "activation_function",
               "tie_word_embeddings", "scale_attn_weights")


@FAST
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), VALUES | st.integers(-(2**64), 2**64), min_size=1,
                               max_size=4), layout=st.sampled_from(["safetensors", "sharded", "bin"]))
def test_config_values_wrong(pristine, changes, layout):
    files = dict(pristine[layout])
    files["config.json"] = json.dumps({**json.loads(files["config.json"]), **changes}).encode()
    outcome(files)


@FAST
@given(flips=FLIPS, cut_at=st.none() | PLACE)
def test_config_bytes_flipped_or_cut(pristine, flips, cut_at):
    files = dict(pristine["safetensors"])
    text = flip(files["config.json"], flips)
    files["config.json"] = text if cut_at is None else cut(text, cut_at)
    outcome(files)


# ---- .bin: zip archives, legacy pickles, nanoGPT ---------------------------------------------------

@FAST
@given(layout=st.sampled_from(["bin", "legacy"]), flips=FLIPS, cut_at=st.none() | PLACE)
def test_bin_bytes_flipped_or_cut(pristine, layout, flips, cut_at):
    files = dict(pristine[layout])
    data = flip(files["pytorch_model.bin"], flips)
    files["pytorch_model.bin"] = data if cut_at is None else cut(data, cut_at)
    outcome(files)


def rezip(data: bytes, member: str, change) -> bytes:
    """The archive with `member`'s bytes changed and its checksums right, so the change reaches
    the unpickler rather than the zip reader."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            body = src.read(info)
            dst.writestr(info, change(body) if info.filename.endswith(member) else body)
    return out.getvalue()


@FAST
@given(flips=FLIPS)
def test_bin_pickle_flipped_inside_a_valid_archive(pristine, flips):
    files = dict(pristine["bin"])
    files["pytorch_model.bin"] = rezip(files["pytorch_model.bin"], "data.pkl", lambda b: flip(b, flips))
    outcome(files)


@FAST
@given(changes=st.dictionaries(st.sampled_from(["n_layer", "n_head", "n_embd", "block_size", "vocab_size",
                                                "bias", "dropout"]), VALUES, min_size=1, max_size=3),
       flips=st.none() | FLIPS)
def test_nanogpt_model_args_and_bytes(pristine, changes, flips):
    files = dict(pristine["nanogpt"])
    if flips is None:
        ckpt = torch.load(io.BytesIO(files["ckpt.pt"]), weights_only=True)
        ckpt["model_args"].update(changes)
        out = io.BytesIO()
        torch.save(ckpt, out)
        files["ckpt.pt"] = out.getvalue()
    else:
        files["ckpt.pt"] = flip(files["ckpt.pt"], flips)
    outcome(files)


# ---- TensorFlow -------------------------------------------------------------------------------

TF_INDEX, TF_DATA = "model-1000.index", "model-1000.data-00000-of-00001"


def tf_blocks(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of every block of a TensorFlow index file: the index block and its data blocks."""
    footer = data[-FOOTER:]
    _, pos = _varint(footer, _varint(footer, 0)[1])
    offset, pos = _varint(footer, pos)
    size, _ = _varint(footer, pos)
    blocks = [(offset, size)]
    for _, handle in _entries(data[offset:offset + size]):
        at, pos = _varint(handle, 0)
        blocks.append((at, _varint(handle, pos)[0]))
    return blocks


def with_checksums(data: bytes, blocks: list[tuple[int, int]]) -> bytes:
    """`data` with each block's masked crc32c recomputed, so a change inside a block is parsed."""
    out = bytearray(data)
    for offset, size in blocks:
        out[offset + size + 1:offset + size + 5] = masked_crc32c(bytes(out[offset:offset + size + 1])).to_bytes(4, "little")
    return bytes(out)


@FAST
@given(flips=FLIPS, fix=st.booleans(), cut_at=st.none() | PLACE)
def test_tensorflow_index_blocks_flipped(pristine, flips, fix, cut_at):
    files = dict(pristine["tf"])
    data = files[TF_INDEX]
    blocks = tf_blocks(data)
    if fix:  # inside the blocks, checksums made right: the entries and protobufs are what is tested
        offset, size = blocks[int(flips[0][0] * len(blocks))]
        data = with_checksums(flip(data, flips, offset, offset + size), blocks)
    else:
        data = flip(data, flips)
    files[TF_INDEX] = data if cut_at is None else cut(data, cut_at)
    outcome(files)


@FAST
@given(changes=st.dictionaries(st.sampled_from(["n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"]),
                               VALUES, max_size=3), data_cut=st.none() | PLACE,
       pointer=st.none() | st.text(max_size=30).map(lambda name: f'model_checkpoint_path: "{name}"\n'))
def test_tensorflow_hparams_pointer_and_data_file(pristine, changes, data_cut, pointer):
    files = dict(pristine["tf"])
    files["hparams.json"] = json.dumps({**json.loads(files["hparams.json"]), **changes}).encode()
    if data_cut is not None:
        files[TF_DATA] = cut(files[TF_DATA], data_cut)
    if pointer is not None:
        files["checkpoint"] = pointer.encode("utf-8", "surrogatepass")
    outcome(files)
