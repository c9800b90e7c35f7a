"""Index a stream's records first, fetch their data later.

Restore of a chain wants to know, before writing anything, which stream holds the newest copy of
each block; consolidation and `verify` want the same map. An index holds per record its kind,
seq, disk offset, length and stream position in compact arrays (40 bytes a record, about 40 MiB
for a 1 TiB disk in 1 MiB records) and never the data.
"""

from __future__ import annotations

__all__ = ["IndexEntry", "StreamIndex", "index_stream"]

import bisect
import io
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NoReturn, Protocol

from ..errors import SinkError, StreamFormatError
from ._layout import LAYOUTS, RECORD_SIZE, TAG_DATA, check64
from .decoder import Decoder, StreamReader
from .header import StreamHeader
from .payload import KeyProblem, Keyring, PayloadOpener
from .records import DATA, ZERO, Record, Trailer


class _Source(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Seekable(_Source, Protocol):
    def seek(self, offset: int, whence: int = 0, /) -> int: ...
    def readinto(self, buf: memoryview, /) -> int | None: ...


@dataclass(frozen=True, slots=True)
class IndexEntry:
    kind: Literal["data", "zero"]
    seq: int
    offset: int
    length: int
    position: int  # stream offset of the record header
    stored: int = 0  # payload bytes in the stream (differs from length when 2.x transforms)
    flags: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length


class StreamIndex:
    """The records of one stream, in disk order (which is also stream order).

    `verified` is True when every payload checksum and the whole-stream digest were checked while
    indexing (always for pipes); False when payloads were skipped by seeking, in which case
    `read()` still checks each payload it fetches.
    """

    def __init__(self, header: StreamHeader, *, name: str = "", major: int = 1,
                 opener: PayloadOpener | None = None) -> None:
        self.header = header
        self.name = name
        self.opener = opener  # opens 2.x payloads (with the reader's keys)
        self._layout = LAYOUTS[major]
        self.trailer: Trailer | None = None
        self._stored = array("Q")
        self._flags = bytearray()
        self._kinds = bytearray()
        self._seqs = array("Q")
        self._offsets = array("Q")
        self._lengths = array("Q")
        self._positions = array("Q")

    @property
    def verified(self) -> bool:
        return self.trailer is not None and self.trailer.digest_verified

    def add(self, rec: Record) -> None:
        self._kinds.append(1 if rec.kind == DATA else 0)
        self._seqs.append(rec.seq)
        self._offsets.append(rec.offset)
        self._lengths.append(rec.length)
        self._positions.append(rec.position)
        self._stored.append(rec.stored)
        self._flags.append(rec.flags)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> IndexEntry:
        return IndexEntry(
            DATA if self._kinds[i] else ZERO, self._seqs[i], self._offsets[i], self._lengths[i],
            self._positions[i], self._stored[i], self._flags[i],
        )

    def __iter__(self) -> Iterator[IndexEntry]:
        return (self[i] for i in range(len(self)))

    def find(self, disk_offset: int) -> IndexEntry | None:
        """The record covering `disk_offset`, or None when no record does."""
        i = bisect.bisect_right(self._offsets, disk_offset) - 1
        if i >= 0 and disk_offset < self._offsets[i] + self._lengths[i]:
            return self[i]
        return None

    def read(
        self, src: _Seekable, entry: IndexEntry, *, into: bytearray | memoryview | None = None
    ) -> memoryview:
        """Fetch one data record's payload from the seekable `src` this index was made from,
        checking its record header against the index and its payload checksum (and, in a 2.x
        stream, opening it: the view is then not `into`)."""
        if entry.kind != DATA:
            raise ValueError(f"record {entry.seq} is a zero record: it has no data")
        stored = entry.stored or entry.length
        if into is not None and len(memoryview(into).cast("B")) < stored:
            if self.opener is None:
                raise ValueError(f"buffer of {len(into)} bytes for a record of {stored}")
            into = None
        buf = memoryview(into if into is not None else bytearray(stored)).cast("B")
        head = bytearray(self._layout.record_size)
        try:
            src.seek(entry.position, io.SEEK_SET)
            ok = _read_exact(src, memoryview(head)) and _read_exact(src, buf[:stored])
        except OSError as err:
            raise SinkError(f"{self._who()}: reading record {entry.seq}: {err}") from err
        where = f"record {entry.seq} (disk offset {entry.offset})"
        if not ok:
            self._fail(f"truncated: the stream ends inside {where}", entry.position)
        if not self._layout.header_ok(head):
            self._fail(f"{where}: record header check mismatch (header damaged)", entry.position)
        f = self._layout.unpack(head)
        if (f.tag, f.seq, f.offset, f.length, f.stored, f.flags) != (
            TAG_DATA, entry.seq, entry.offset, entry.length, stored, entry.flags
        ):
            self._fail(f"{where}: the stream no longer matches its index", entry.position)
        out = buf[:stored]
        if check64(out) != f.payload_check:
            self._fail(
                f"{where}: data checksum mismatch (payload damaged)", entry.position
            )
        if self.opener is None:
            return out
        try:
            return self.opener.open(f.seq, f.flags, f.length, self._layout.framing(f), out)
        except (KeyProblem, ValueError) as err:
            self._fail(f"{where}: {err}", entry.position)

    def _who(self) -> str:
        return f"disk stream {self.name}" if self.name else "disk stream"

    def _fail(self, problem: str, at: int) -> NoReturn:
        raise StreamFormatError(
            f"{self._who()}: {self.header.identity} at stream offset {at}: {problem}"
        )


def index_stream(src: _Source, *, name: str = "", verify: bool = False,
                 keys: Keyring | None = None) -> StreamIndex:
    """Index the stream in `src`. A seekable source is indexed by reading record headers and
    seeking over payloads (cheap; payloads and digest unchecked) unless `verify`; anything else
    is read and verified in full. `keys` open an encrypted stream's payloads; a full read
    without the stream's key checks all but the AES-GCM tags (the trailer says so)."""
    seekable = not verify and _is_seekable(src)
    if not seekable:
        reader = StreamReader(src, name=name, keys=keys, keyless=True)
        dec = reader.decoder
        index = StreamIndex(reader.header, name=name, major=dec.major,
                            opener=dec.opener)
        for rec in reader:
            index.add(rec)
        index.trailer = reader.trailer
        return index
    assert isinstance(src, io.IOBase)
    dec = Decoder(name=name, keys=keys)
    buf = bytearray(max(RECORD_SIZE, 1 << 16))
    built: StreamIndex | None = None
    try:
        start = src.tell()
        size = src.seek(0, io.SEEK_END) - start
        src.seek(start, io.SEEK_SET)
        while dec.want:
            if dec.pending is not None:
                if dec.position + dec.want > size:
                    dec.truncated_in(size - dec.position)
                rec = dec.skip()
                src.seek(rec.stored, io.SEEK_CUR)
                assert built is not None
                built.add(rec)
                continue
            n = dec.want
            if len(buf) < n:
                buf = bytearray(n)
            view = memoryview(buf)[:n]
            got = _read_some(src, view)
            if got < n:
                dec.truncated_in(got)
            item = dec.take(view)
            if isinstance(item, StreamHeader):
                built = StreamIndex(item, name=name, major=dec.major, opener=dec.opener)
            elif isinstance(item, Record):
                assert built is not None
                built.add(item)
        extra = _read_some(src, memoryview(bytearray(1)))
    except OSError as err:
        raise SinkError(
            f"disk stream {name}: indexing at stream offset {dec.position}: {err}"
        ) from err
    dec.at_eof(extra=bool(extra))
    assert built is not None
    built.trailer = dec.trailer
    return built


def _is_seekable(src: object) -> bool:
    if not isinstance(src, io.IOBase):
        return False
    try:
        return src.seekable() and src.tell() >= 0
    except OSError:
        return False


def _read_some(src: _Source, view: memoryview) -> int:
    got = 0
    readinto = getattr(src, "readinto", None)
    while got < len(view):
        if readinto is not None:
            k = readinto(view[got:]) or 0
        else:
            chunk = src.read(len(view) - got)
            k = len(chunk)
            view[got : got + k] = chunk
        if not k:
            break
        got += k
    return got


def _read_exact(src: _Source, view: memoryview) -> bool:
    return _read_some(src, view) == len(view)

