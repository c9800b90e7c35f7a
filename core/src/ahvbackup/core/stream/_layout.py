"""Byte layout of the disk stream (docs/stream-format.md sections 2-4), shared by both ends."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, TypeAlias

import xxhash

Buffer: TypeAlias = bytes | bytearray | memoryview

MAGIC: Final = b"\x89AHVD\r\n\x1a"
END_MAGIC: Final = b"AHVDEND\n"
MAJOR: Final = 2  # the newest major this code reads and writes
MINOR: Final = 0
PLAIN_MAJOR: Final = 1  # written when no record is compressed or encrypted (older readers)
MAX_META_LENGTH: Final = 1 << 20
MAX_DATA_LENGTH: Final = 64 << 20

PREAMBLE = struct.Struct("<8sHHI")  # magic, major, minor, meta_len
CHECK = struct.Struct("<Q")
TRAILER_BODY = struct.Struct("<QQQQQ16s8s")
TRAILER_SIZE: Final = TRAILER_BODY.size  # 64
TAG_SIZE: Final = 16  # AES-GCM authentication tag

TAG_DATA: Final = b"DATA"
TAG_ZERO: Final = b"ZERO"
TAG_TRAILER: Final = b"TRLR"

FLAG_ZSTD: Final = 1  # 2.x: the stored payload is one zstd frame of the record's bytes

check64 = xxhash.xxh3_64_intdigest
Digest = xxhash.xxh3_128


@dataclass(frozen=True, slots=True)
class RecordFields:
    """A record header, either version. `stored` is the number of payload bytes that follow
    (1.x: `length` for data, 64 for the trailer, 0 for zeros)."""

    tag: bytes
    flags: int
    seq: int
    offset: int
    length: int
    stored: int
    payload_check: int


class Layout:
    """The record header of one major version: 1.x has 48 bytes, 2.x adds `stored` (56)."""

    def __init__(self, major: int) -> None:
        self.major = major
        self.record = struct.Struct("<4sIQQQQ" if major == 1 else "<4sIQQQQQ")
        self.record_size = self.record.size + CHECK.size

    def pack(self, f: RecordFields) -> bytes:
        head = self.framing(f) + struct.pack("<Q", f.payload_check)
        return head + CHECK.pack(check64(head))

    def framing(self, f: RecordFields) -> bytes:
        """The header bytes before the payload check: what encryption authenticates."""
        if self.major == 1:
            return struct.pack("<4sIQQQ", f.tag, f.flags, f.seq, f.offset, f.length)
        return struct.pack("<4sIQQQQ", f.tag, f.flags, f.seq, f.offset, f.length, f.stored)

    def unpack(self, head: Buffer) -> RecordFields:
        if self.major == 1:
            tag, flags, seq, offset, length, check = self.record.unpack_from(head)
            stored = length if tag == TAG_DATA else TRAILER_SIZE if tag == TAG_TRAILER else 0
        else:
            tag, flags, seq, offset, length, stored, check = self.record.unpack_from(head)
        return RecordFields(bytes(tag), flags, seq, offset, length, stored, check)

    def header_ok(self, head: Buffer) -> bool:
        view = memoryview(head)
        check: int = CHECK.unpack_from(view, self.record.size)[0]
        return check == check64(view[: self.record.size])


LAYOUTS: Final = {1: Layout(1), 2: Layout(2)}
RECORD_SIZE: Final = LAYOUTS[1].record_size  # 48 (1.x)
