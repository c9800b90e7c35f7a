"""Writing disk streams: a sans-IO `Encoder` and a `StreamWriter` for anything with `write()`.

The encoder returns small header bytes and hands the caller's payload back as a memoryview, so
the payload is checksummed but never copied; the caller decides how bytes reach the sink (a
file, a pipe, Bacula packets, a trio channel). With a `StreamCodec` that compresses or
encrypts, the payload handed back is the stored form (format 2.x), made once per record.
"""

from __future__ import annotations

__all__ = ["Encoder", "StreamWriter", "is_zero"]

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from ..errors import SinkError, StreamFormatError
from ._layout import (
    CHECK,
    END_MAGIC,
    LAYOUTS,
    MAGIC,
    MAJOR,
    MAX_DATA_LENGTH,
    MAX_META_LENGTH,
    MINOR,
    PLAIN_MAJOR,
    PREAMBLE,
    TAG_DATA,
    TAG_TRAILER,
    TAG_ZERO,
    TRAILER_BODY,
    TRAILER_SIZE,
    Buffer,
    Digest,
    RecordFields,
    check64,
)
from .header import StreamHeader
from .payload import ENCRYPTION, KEY_BYTES, PayloadSealer, StreamCodec
from .records import Trailer

_ZEROS = bytes(1 << 20)


def is_zero(buf: Buffer) -> bool:
    """True when every byte of `buf` is zero. memcmp speed, no copy, stops at the first non-zero."""
    view = memoryview(buf).cast("B")
    step = len(_ZEROS)
    return all(_ZEROS.startswith(view[i : i + step]) for i in range(0, len(view), step))


@dataclass(frozen=True, slots=True)
class Packed:
    """A payload made ready by `Encoder.pack` (compressed when that shrinks it)."""

    flags: int
    body: Buffer


class Encoder:
    """Produces the bytes of one stream in order: `header()`, records, `trailer()`.

    Every record is checked before its bytes are produced (order, bounds, length), so an encoder
    never emits a stream a reader would refuse. A `codec` that compresses or encrypts makes a
    2.x stream (with a fresh data key for this stream alone); without one it is 1.0.
    """

    def __init__(self, header: StreamHeader, codec: StreamCodec | None = None) -> None:
        codec = codec or StreamCodec()
        self.codec = codec
        self._data_key: bytes | None = None
        if codec.transforms:
            encryption = key_id = wrapped = ""
            if codec.key is not None:
                self._data_key = os.urandom(KEY_BYTES)
                encryption, key_id = ENCRYPTION, codec.key.key_id
                wrapped = codec.key.wrap(self._data_key, header.stream_id).hex()
            header = dataclasses.replace(
                header, compression=codec.compression, encryption=encryption or "none",
                key_id=key_id, wrapped_key=wrapped)
        self.meta = header
        self.major = MAJOR if codec.transforms else PLAIN_MAJOR
        self._layout = LAYOUTS[self.major]
        self._sealer: PayloadSealer | None = None
        self.data_records = 0
        self.zero_records = 0
        self.data_bytes = 0
        self.zero_bytes = 0
        self.stream_bytes = 0
        self._digest = Digest()
        self._end = 0  # disk offset the next record may start at
        self._state = "header"

    @property
    def seq(self) -> int:
        """Number of data and zero records so far (the next record's seq)."""
        return self.data_records + self.zero_records

    def header(self) -> bytes:
        self._expect("header", "header")
        meta = self.meta.to_json()
        if len(meta) > MAX_META_LENGTH:
            raise StreamFormatError(
                f"cannot encode {self.meta.identity}: metadata is {len(meta)} bytes "
                f"(at most {MAX_META_LENGTH})"
            )
        head = PREAMBLE.pack(MAGIC, self.major, MINOR, len(meta)) + meta
        out = head + CHECK.pack(check64(head))
        if self.codec.transforms:
            self._sealer = PayloadSealer(self.codec, self._data_key,
                                         hashlib.sha256(head).digest())
            self._data_key = None
        self._state = "records"
        return self._emit(out)

    def pack(self, payload: Buffer) -> Packed:
        """Compress `payload` ahead of its `data()` call. The one step that costs CPU, and the
        only one that may run in several threads at once (records still go out in order)."""
        self._expect("records", "data record")
        view = memoryview(payload).cast("B")
        if self._sealer is None:
            return Packed(0, view)
        flags, body = self._sealer.compress(view)
        return Packed(flags, body)

    def data(self, offset: int, payload: Buffer, packed: Packed | None = None
             ) -> tuple[bytes, memoryview]:
        """A data record for `payload` at disk `offset`: (record header, payload view). Write both,
        in that order. `packed` is `pack(payload)` when that was done ahead."""
        self._expect("records", "data record")
        view = memoryview(payload).cast("B")
        length = len(view)
        if not 0 < length <= MAX_DATA_LENGTH:
            raise StreamFormatError(
                f"cannot encode {self.meta.identity}: data record at disk offset {offset} has "
                f"{length} bytes (1 to {MAX_DATA_LENGTH})"
            )
        self._place(offset, length)
        flags, body = 0, view
        if self._sealer is not None:
            flags, ready = (packed.flags, packed.body) if packed else self._sealer.compress(view)
            stored = len(ready) + self._sealer.overhead
            fields = RecordFields(TAG_DATA, flags, self.seq, offset, length, stored, 0)
            body = memoryview(self._sealer.seal(TAG_DATA, self.seq,
                                                self._layout.framing(fields), ready))
        head = self._record(TAG_DATA, flags, offset, length, len(body), check64(body))
        self._emit(head)
        self._digest.update(body)
        self.stream_bytes += len(body)
        self.data_records += 1
        self.data_bytes += length
        return head, body

    def zero(self, offset: int, length: int) -> bytes:
        """A zero record: `[offset, offset+length)` reads as zeros. No payload."""
        self._expect("records", "zero record")
        if length <= 0:
            raise StreamFormatError(
                f"cannot encode {self.meta.identity}: zero record at disk offset {offset} has "
                f"length {length}"
            )
        self._place(offset, length)
        head = self._record(TAG_ZERO, 0, offset, length, 0, 0)
        self.zero_records += 1
        self.zero_bytes += length
        return self._emit(head)

    def trailer(self) -> bytes:
        """The trailer: totals and the whole-stream digest. The stream is complete after it."""
        self._expect("records", "trailer")
        self._state = "done"
        body = TRAILER_BODY.pack(
            self.data_records, self.zero_records, self.data_bytes, self.zero_bytes,
            self.stream_bytes, self._digest.digest(), END_MAGIC,
        )
        if self._sealer is not None and self._sealer.overhead:
            # the tag authenticates the totals, so records cannot be dropped from the end
            stored = TRAILER_SIZE + self._sealer.overhead
            framing = self._layout.framing(
                RecordFields(TAG_TRAILER, 0, self.seq, 0, TRAILER_SIZE, stored, 0))
            body += self._sealer.seal(TAG_TRAILER, self.seq, framing + body, b"")
        head = self._record(TAG_TRAILER, 0, 0, TRAILER_SIZE, len(body), check64(body))
        return head + body

    def _record(self, tag: bytes, flags: int, offset: int, length: int, stored: int,
                check: int) -> bytes:
        return self._layout.pack(RecordFields(tag, flags, self.seq, offset, length, stored,
                                              check))

    def summary(self) -> Trailer:
        """What the trailer says (or would say now)."""
        return Trailer(
            data_records=self.data_records, zero_records=self.zero_records,
            data_bytes=self.data_bytes, zero_bytes=self.zero_bytes,
            stream_bytes=self.stream_bytes, digest=self._digest.digest(), digest_verified=True,
        )

    def _place(self, offset: int, length: int) -> None:
        if offset < self._end or offset + length > self.meta.disk_size:
            raise StreamFormatError(
                f"cannot encode {self.meta.identity}: record {self.seq} at disk offset {offset} "
                f"(+{length}) is out of order or outside the disk (next record must start at "
                f">= {self._end}; disk size {self.meta.disk_size})"
            )
        self._end = offset + length

    def _expect(self, state: str, what: str) -> None:
        if self._state != state:
            order = {"header": "before the header", "records": "twice", "done": "after the trailer"}
            raise StreamFormatError(
                f"cannot encode {self.meta.identity}: {what} {order[self._state]}"
            )

    def _emit(self, out: bytes) -> bytes:
        self._digest.update(out)
        self.stream_bytes += len(out)
        return out


class _Writable(Protocol):
    def write(self, data: bytes | memoryview, /) -> object: ...


class StreamWriter:
    """Writes one stream to `out` (a file, a pipe, ``sys.stdout.buffer``): the header at once,
    records as they come, the trailer on `close()`.

    Leaving a ``with`` block by an exception writes no trailer: the partial stream then reads as
    truncated instead of looking complete. `out` is neither flushed nor closed here.
    """

    def __init__(self, out: _Writable, header: StreamHeader, *, name: str = "",
                 codec: StreamCodec | None = None) -> None:
        self.encoder = Encoder(header, codec)
        self.name = name or header.identity
        self._out = out
        self._write(self.encoder.header())

    @property
    def bytes_written(self) -> int:
        return self.encoder.stream_bytes

    def write_data(self, offset: int, payload: Buffer) -> None:
        head, view = self.encoder.data(offset, payload)
        self._write(head)
        self._write(view)

    def write_zero(self, offset: int, length: int) -> None:
        self._write(self.encoder.zero(offset, length))

    def write_chunk(self, offset: int, payload: Buffer) -> bool:
        """Write `payload` as a data record, or as a zero record when it is all zeros (returns
        True then)."""
        if is_zero(payload):
            self.write_zero(offset, memoryview(payload).nbytes)
            return True
        self.write_data(offset, payload)
        return False

    def close(self) -> Trailer:
        """Write the trailer; returns the totals and digest it holds."""
        summary = self.encoder.summary()
        self._write(self.encoder.trailer())
        return summary

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                n = self._out.write(view)
                if not isinstance(n, int) or n >= len(view):
                    break
                view = view[n:]
        except OSError as err:
            raise SinkError(f"{self.name}: writing the disk stream failed: {err}") from err
