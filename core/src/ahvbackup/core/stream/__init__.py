"""The ahvbackup disk stream format (docs/stream-format.md): one disk at one snapshot, full or
delta, as a self-checking byte stream that can be written to and read from a pipe."""

from __future__ import annotations

from ._layout import MAGIC, MAJOR, MAX_DATA_LENGTH, MINOR
from .decoder import Decoder, StreamReader
from .encoder import Encoder, StreamWriter, is_zero
from .header import KINDS, StreamHeader
from .index import IndexEntry, StreamIndex, index_stream
from .payload import Keyring, StreamCodec, StreamKey, parse_compression
from .records import DATA, ZERO, Record, Trailer

__all__ = [
    "DATA",
    "KINDS",
    "MAGIC",
    "MAJOR",
    "MAX_DATA_LENGTH",
    "MINOR",
    "ZERO",
    "Decoder",
    "Encoder",
    "IndexEntry",
    "Keyring",
    "Record",
    "StreamCodec",
    "StreamHeader",
    "StreamIndex",
    "StreamKey",
    "StreamReader",
    "StreamWriter",
    "Trailer",
    "index_stream",
    "is_zero",
    "parse_compression",
]
