"""TensorFlow's checkpoint format (a "tensor bundle"), read without TensorFlow.

    <prefix>.index                     a LevelDB-style sorted table: tensor name -> BundleEntryProto
    <prefix>.data-00000-of-00001       the tensors' raw little-endian bytes, at the entries' offsets

The table (tensorflow/core/lib/io/table): a 48-byte footer ending in a magic number points at
the index block, whose entries point at data blocks; each block is prefix-compressed key/value
entries, followed by a type byte (0: uncompressed) and a masked crc32c. Values are protobufs, of
which we decode the small subset we need by hand (varints, fixed32, length-delimited fields):

    BundleHeaderProto (key "")  1 num_shards, 2 endianness (0 = little)
    BundleEntryProto            1 dtype, 2 shape {2 dim {1 size}}, 3 shard_id, 4 offset, 5 size,
                                6 crc32c (masked), 7 slices (partitioned variables: refused)

Everything is checked: block checksums, the footer's magic number, every entry's byte size
against its dtype and shape, and that every tensor lies inside its data file. The tensors' own
crc32c is not recomputed: in pure Python that costs seconds per gigabyte, and a truncated or
misplaced file is already caught by the sizes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import CheckpointError
from .weights import printable

MAGIC = 0xDB4775248B80FB57  # kTableMagicNumber, the footer's last 8 bytes
FOOTER = 48  # two block handles padded to 40 bytes, then the magic number
TRAILER = 5  # after each block: compression type (1 byte) + masked crc32c (4 bytes)
# TensorFlow's DataType enum (types.proto) for the types a GPT-2 checkpoint can hold.
DTYPES = {1: torch.float32, 2: torch.float64, 3: torch.int32, 9: torch.int64,
          14: torch.bfloat16, 19: torch.float16}


@dataclass(frozen=True)
class Entry:
    """Where one tensor is: BundleEntryProto's fields."""

    dtype: int  # TensorFlow DataType
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int  # bytes


class Corrupt(Exception):
    """A structural problem inside the index file; turned into a CheckpointError naming the file."""


def read_bundle(prefix: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor in the file's dtype) for every tensor of the checkpoint at `prefix`,
    one at a time, after checking that every tensor lies inside its data file."""
    index = prefix.with_name(prefix.name + ".index")
    shards, entries = read_index(index)
    files = [prefix.with_name(f"{prefix.name}.data-{i:05d}-of-{shards:05d}") for i in range(shards)]
    sizes = [_size(f) for f in files]
    for name, e in entries.items():
        if e.shard >= shards:
            raise CheckpointError(f"{index} is truncated or corrupt (tensor {printable(name)} is in data shard "
                                  f"{e.shard}, of {shards})")
        if e.offset + e.size > sizes[e.shard]:
            raise CheckpointError(f"{files[e.shard]} is truncated or corrupt (tensor {printable(name)} needs bytes "
                                  f"{e.offset}..{e.offset + e.size}, the file has {sizes[e.shard]})")
    for name, e in entries.items():
        data = bytearray(e.size)
        with open(files[e.shard], "rb") as f:  # opened per tensor: there are only ~150
            f.seek(e.offset)
            if f.readinto(data) != e.size:
                raise CheckpointError(f"{files[e.shard]} is truncated (tensor {printable(name)})")
        dtype = DTYPES[e.dtype]
        yield name, (torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)).reshape(e.shape)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"cannot read the checkpoint's data file {path}: {e.strerror or e}") from None


def read_index(path: Path) -> tuple[int, dict[str, Entry]]:
    """(number of data shards, tensor name -> Entry) from a bundle's .index file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        shards, entries = _parse_index(data)
    except Corrupt as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({e})") from None
    for name, entry in entries.items():
        _check_entry(name, entry, path)
    return shards, entries


def _parse_index(data: bytes) -> tuple[int, dict[str, Entry]]:
    if len(data) < FOOTER or int.from_bytes(data[-8:], "little") != MAGIC:
        raise Corrupt("no table footer: not a TensorFlow checkpoint index")
    footer = data[-FOOTER:]
    _, pos = _varint(footer, _varint(footer, 0)[1])  # skip the metaindex handle
    index_offset, pos = _varint(footer, pos)
    index_size, _ = _varint(footer, pos)
    shards, entries = None, {}
    for _, handle in _entries(_block(data, index_offset, index_size)):
        offset, pos = _varint(handle, 0)
        size, _ = _varint(handle, pos)
        for key, value in _entries(_block(data, offset, size)):
            if key == b"":
                shards = _header(value)
            else:
                entries[key.decode("utf-8", "replace")] = _entry(value)
    if shards is None:
        raise Corrupt("no bundle header entry")
    return shards, entries


def _block(data: bytes, offset: int, size: int) -> bytes:
    """One table block's contents, after checking its trailer."""
    if offset + size + TRAILER > len(data) - FOOTER:
        raise Corrupt(f"a block at byte {offset} runs past the end of the file")
    contents = data[offset:offset + size + 1]  # with the compression-type byte, as the crc covers it
    stored = int.from_bytes(data[offset + size + 1:offset + size + TRAILER], "little")
    if masked_crc32c(contents) != stored:
        raise Corrupt(f"checksum mismatch in the block at byte {offset}")
    if contents[-1] != 0:
        raise Corrupt("compressed (snappy) blocks are not supported; re-save the checkpoint uncompressed")
    return contents[:-1]


def _entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """A block's (key, value) pairs; keys share a prefix with the previous key."""
    if len(block) < 4:
        raise Corrupt("a block is too short")
    restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 - 4 * restarts
    if limit < 0:
        raise Corrupt("a block's restart array is larger than the block")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        fresh, pos = _varint(block, pos)
        length, pos = _varint(block, pos)
        if shared > len(key) or pos + fresh + length > limit:
            raise Corrupt("a block entry runs past its block")
        key = key[:shared] + block[pos:pos + fresh]
        yield key, block[pos + fresh:pos + fresh + length]
        pos += fresh + length


# ---- protobuf, by hand ---------------------------------------------------------------------

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A base-128 varint at `pos`: (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise Corrupt("a varint runs past its field")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _fields(buf: bytes) -> dict[int, list]:
    """field number -> values (int for varint and fixed fields, bytes for length-delimited)."""
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):  # fixed64, fixed32
            width = 8 if wire == 1 else 4
            value, pos = int.from_bytes(buf[pos:pos + width], "little"), pos + width
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        else:
            raise Corrupt(f"protobuf wire type {wire} is not used by checkpoint entries")
        if pos > len(buf):
            raise Corrupt("a protobuf field runs past its message")
        fields.setdefault(number, []).append(value)
    return fields


def _last(fields: dict[int, list], number: int, default=0):
    return fields.get(number, [default])[-1]  # proto3: absent means the default; last one wins


def _header(value: bytes) -> int:
    header = _fields(value)
    if _last(header, 2) != 0:
        raise Corrupt("the checkpoint was written big-endian; only little-endian files are read")
    return _last(header, 1, 1)


def _entry(value: bytes) -> Entry:
    f = _fields(value)
    if 7 in f:
        raise Corrupt("a tensor is saved in slices (a partitioned variable); re-save it whole")
    dims = _fields(_last(f, 2, b"")).get(2, [])
    return Entry(dtype=_last(f, 1), shape=tuple(_last(_fields(d), 1) for d in dims),
                 shard=_last(f, 3), offset=_last(f, 4), size=_last(f, 5))


def _check_entry(name: str, e: Entry, path: Path) -> None:
    if e.dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor {printable(name)} has TensorFlow dtype {e.dtype}, which is not a "
                              "float or integer type gpt2kit reads")
    want = math.prod(e.shape) * DTYPES[e.dtype].itemsize
    if e.size != want:
        raise CheckpointError(f"{path} is truncated or corrupt (tensor {printable(name)} of shape {e.shape} "
                              f"should take {want} bytes, its entry says {e.size})")


# ---- checksums -----------------------------------------------------------------------------

@functools.cache
def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        c = byte
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)  # Castagnoli polynomial, reflected
        table.append(c)
    return tuple(table)


def crc32c(data: bytes) -> int:
    table, c = _crc_table(), 0xFFFFFFFF
    for byte in data:
        c = table[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """LevelDB's masked crc32c (rotated and offset, so a crc stored inside data stays unlikely)."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF
