"""Byte layout of the disk stream (docs/stream-format.md sections 2-4), shared by both ends."""

from __future__ import annotations

import struct
from typing import Final, TypeAlias

import xxhash

Buffer: TypeAlias = bytes | bytearray | memoryview

MAGIC: Final = b"\x89AHVD\r\n\x1a"
END_MAGIC: Final = b"AHVDEND\n"
MAJOR: Final = 1
MINOR: Final = 0
MAX_META_LENGTH: Final = 1 << 20
MAX_DATA_LENGTH: Final = 64 << 20

PREAMBLE = struct.Struct("<8sHHI")  # magic, major, minor, meta_len
CHECK = struct.Struct("<Q")
RECORD = struct.Struct("<4sIQQQQ")  # tag, flags, seq, offset, length, payload check
RECORD_SIZE: Final = RECORD.size + CHECK.size  # 48
TRAILER_BODY = struct.Struct("<QQQQQ16s8s")
TRAILER_SIZE: Final = TRAILER_BODY.size  # 64

TAG_DATA: Final = b"DATA"
TAG_ZERO: Final = b"ZERO"
TAG_TRAILER: Final = b"TRLR"

check64 = xxhash.xxh3_64_intdigest
Digest = xxhash.xxh3_128


def record_header(tag: bytes, seq: int, offset: int, length: int, payload_check: int) -> bytes:
    head = RECORD.pack(tag, 0, seq, offset, length, payload_check)
    return head + CHECK.pack(check64(head))
