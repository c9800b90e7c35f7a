"""Reading disk streams: a sans-IO `Decoder` and a `StreamReader` over anything with `readinto()`.

The decoder is told exactly the bytes it asked for (`want`) and checks everything the spec
lists (docs/stream-format.md section 5) as they pass; it never looks back, so it works on a pipe
and memory stays flat whatever the stream's size.
"""

from __future__ import annotations

__all__ = ["Decoder", "StreamReader"]

import hashlib
from collections.abc import Iterator
from typing import NoReturn, Protocol

from ..errors import SinkError, StreamFormatError
from ._layout import (
    CHECK,
    END_MAGIC,
    FLAG_ZSTD,
    LAYOUTS,
    MAGIC,
    MAJOR,
    MAX_DATA_LENGTH,
    MAX_META_LENGTH,
    PREAMBLE,
    RECORD_SIZE,
    TAG_DATA,
    TAG_SIZE,
    TAG_TRAILER,
    TAG_ZERO,
    TRAILER_BODY,
    TRAILER_SIZE,
    Buffer,
    Digest,
    check64,
)
from .header import StreamHeader
from .payload import KeyProblem, Keyring, PayloadOpener
from .records import DATA, ZERO, Record, Trailer

_WHAT = {
    "preamble": "the stream header",
    "meta": "the stream metadata",
    "record": "a record header",
    "payload": "a data payload",
    "trailer": "the trailer",
}


class Decoder:
    """Reader state machine. Loop: read exactly `want` bytes, pass them to `take()`; it returns
    the `StreamHeader`, each `Record` and finally the `Trailer` (None while it needs more). `want`
    is 0 once the trailer was taken; the caller must then see end of input (`at_eof()`).

    A data record's `take()` returns the Record with `data` set to the bytes passed in, after its
    checksum matched. Index mode: call `skip()` instead of reading a payload; the record is then
    returned without data and the whole-stream digest can no longer be checked.

    A 2.x stream's payloads are opened (decrypted, decompressed) with `keys`. An encrypted
    stream whose key is not among them fails at its first data record, unless `keyless`:
    then framing, checksums and digest are still checked, data records come without data,
    and the trailer's `unchecked` says what could not be authenticated.
    """

    def __init__(self, *, name: str = "", keys: Keyring | None = None,
                 keyless: bool = False) -> None:
        self.name = name
        self.keys = keys
        self.keyless = keyless
        self.opener: PayloadOpener | None = None  # 2.x streams
        self._layout = LAYOUTS[1]
        self._unopened = 0
        self.header: StreamHeader | None = None
        self.trailer: Trailer | None = None
        self.position = 0  # stream bytes taken (or skipped)
        self.want = PREAMBLE.size
        self._state = "preamble"
        self._digest: Digest | None = Digest()
        self._preamble = b""
        self._pending: Record | None = None
        self._pending_check = 0
        self._seq = 0
        self._end = 0
        self._data_records = self._zero_records = self._data_bytes = self._zero_bytes = 0
        self._record_start = 0  # stream offset of the record being decoded
        self._trailer_start = 0
        self._pending_framing = self._trailer_framing = b""

    @property
    def pending(self) -> Record | None:
        """The data record whose payload is wanted next (without data), else None."""
        return self._pending if self._state == "payload" else None

    def take(self, buf: Buffer) -> StreamHeader | Record | Trailer | None:
        view = memoryview(buf).cast("B")
        if len(view) != self.want or self.want == 0:
            raise ValueError(f"Decoder.take wants {self.want} bytes, got {len(view)}")
        state = self._state
        if state not in ("record", "trailer") and self._digest is not None:
            self._digest.update(view)
        self.position += len(view)
        if state == "preamble":
            self._take_preamble(view)
            return None
        if state == "meta":
            return self._take_meta(view)
        if state == "record":
            return self._take_record(view)
        if state == "payload":
            return self._take_payload(view)
        return self._take_trailer(view)

    def skip(self) -> Record:
        """Skip the pending payload (the caller seeks over it); returns its record, unverified."""
        rec = self.pending
        if rec is None:
            raise ValueError("Decoder.skip: no payload is pending")
        self._digest = None
        self.position += rec.stored
        self._next_record()
        return rec

    def at_eof(self, *, extra: bool = False) -> None:
        """Call at end of input (`extra`: input went on after the trailer). Raises unless the
        stream ended exactly after its trailer."""
        if self.want == 0:
            if extra:
                self._fail("bytes after the trailer", at=self.position)
            return
        what = _WHAT[self._state]
        if self._state == "payload" and self._pending is not None:
            what += f" of record {self._pending.seq} (disk offset {self._pending.offset})"
        self._fail(f"truncated: the stream ends inside {what} at stream offset {self.position}")

    def truncated_in(self, got: int) -> NoReturn:
        """End of input after `got` of the `want` bytes: raises the truncation error."""
        self.position += got
        self.at_eof()
        raise AssertionError("at_eof returned with bytes still wanted")

    # states -------------------------------------------------------------------------------------

    def _take_preamble(self, view: memoryview) -> None:
        magic, major, minor, meta_len = PREAMBLE.unpack(view)
        if magic != MAGIC:
            self._fail(f"not an ahvbackup disk stream (magic {bytes(magic)!r}, want {MAGIC!r})")
        if major > MAJOR:
            self._fail(
                f"stream format version {major}.{minor} is newer than this reader "
                f"(understands {MAJOR}.x); upgrade ahvbackup to read it"
            )
        if major not in LAYOUTS:
            self._fail(f"stream format version {major}.{minor} is not supported")
        self._layout = LAYOUTS[major]
        if not 2 <= meta_len <= MAX_META_LENGTH:
            self._fail(f"metadata length {meta_len} is out of range (2 to {MAX_META_LENGTH})")
        self._preamble = bytes(view)
        self._state = "meta"
        self.want = meta_len + CHECK.size

    def _take_meta(self, view: memoryview) -> StreamHeader:
        meta, (check,) = view[: -CHECK.size], CHECK.unpack(view[-CHECK.size :])
        if check != check64(self._preamble + meta):
            self._fail("stream header check mismatch (header damaged)", at=0)
        try:
            self.header = StreamHeader.from_json(meta, major=self._layout.major)
        except StreamFormatError as err:
            self._fail(str(err), at=PREAMBLE.size)
        h = self.header
        if h.transformed:
            self.opener = PayloadOpener(
                compression=h.compression, encrypted=h.encryption != "none", key_id=h.key_id,
                wrapped=bytes.fromhex(h.wrapped_key), stream_id=h.stream_id,
                header_auth=hashlib.sha256(self._preamble + bytes(meta)).digest(),
                keys=self.keys)
        self._next_record()
        return self.header

    @property
    def major(self) -> int:
        """The stream's major version (1 until the preamble was read)."""
        return self._layout.major

    def _take_record(self, view: memoryview) -> Record | None:
        at = self._record_start
        if not self._layout.header_ok(view):
            self._fail(f"record {self._seq}: record header check mismatch (header damaged)", at=at)
        if self._digest is not None and bytes(view[:4]) != TAG_TRAILER:
            self._digest.update(view)
        fields = self._layout.unpack(view)
        tag, flags, seq, offset, length = (fields.tag, fields.flags, fields.seq, fields.offset,
                                           fields.length)
        stored, payload_check = fields.stored, fields.payload_check
        where = f"record {seq} (disk offset {offset})"
        zstd = self.opener is not None and self.opener.compression == "zstd"
        if flags & ~(FLAG_ZSTD if zstd and tag == TAG_DATA else 0):
            self._fail(f"{where}: unknown flags {flags:#x}", at=at)
        if seq != self._seq:
            problem = (
                f"record {self._seq} is missing or records are out of order"
                if seq > self._seq
                else f"record {seq} is repeated or out of order"
            )
            self._fail(f"{where}: expected record {self._seq} here; {problem}", at=at)
        overhead = TAG_SIZE if self.opener is not None and self.opener.encrypted else 0
        if tag == TAG_TRAILER:
            if length != TRAILER_SIZE or offset or stored != TRAILER_SIZE + overhead:
                self._fail(f"trailer offset {offset}, length {length} and stored length "
                           f"{stored} (want 0, 64, {TRAILER_SIZE + overhead})", at=at)
            self._state, self.want, self._pending_check = "trailer", stored, payload_check
            self._trailer_start = at
            if self.opener is not None:
                self._trailer_framing = self._layout.framing(fields)
            return None
        if tag not in (TAG_DATA, TAG_ZERO):
            self._fail(f"{where}: unknown record tag {bytes(tag)!r}", at=at)
        if length == 0 or (tag == TAG_DATA and length > MAX_DATA_LENGTH):
            self._fail(f"{where}: bad length {length}", at=at)
        if tag == TAG_ZERO and stored:
            self._fail(f"{where}: a zero record with {stored} stored bytes", at=at)
        if tag == TAG_DATA and (not overhead < stored <= length + overhead or (
            self.opener is None and stored != length
        )):
            self._fail(f"{where}: bad stored length {stored} for {length} bytes", at=at)
        assert self.header is not None
        if offset < self._end:
            self._fail(
                f"{where}: out of order (starts before the end of the previous record, "
                f"disk offset {self._end})",
                at=at,
            )
        if offset + length > self.header.disk_size:
            self._fail(
                f"{where}: ends at {offset + length}, beyond the disk size "
                f"{self.header.disk_size}",
                at=at,
            )
        self._seq += 1
        self._end = offset + length
        if tag == TAG_ZERO:
            self._zero_records += 1
            self._zero_bytes += length
            self._next_record()
            return Record(ZERO, seq, offset, length, at)
        self._data_records += 1
        self._data_bytes += length
        self._pending = Record(DATA, seq, offset, length, at, stored=stored, flags=flags)
        self._pending_check = payload_check
        if self.opener is not None:  # what the payload's tag authenticates
            self._pending_framing = self._layout.framing(fields)
        self._state, self.want = "payload", stored
        return None

    def _take_payload(self, view: memoryview) -> Record:
        rec = self._pending
        assert rec is not None
        if check64(view) != self._pending_check:
            self._fail(
                f"record {rec.seq} (disk offset {rec.offset}, {rec.length} bytes): data "
                "checksum mismatch (payload damaged)",
                at=rec.position,
            )
        rec.data = view if self.opener is None else self._open(rec, view)
        self._next_record()
        return rec

    def _open(self, rec: Record, stored: memoryview) -> memoryview | None:
        opener = self.opener
        assert opener is not None
        if self.keyless and not opener.can_open:
            self._unopened += 1
            return None
        try:
            return opener.open(rec.seq, rec.flags, rec.length, self._pending_framing, stored)
        except (KeyProblem, ValueError) as err:
            self._fail(f"record {rec.seq} (disk offset {rec.offset}): {err}", at=rec.position)

    def _take_trailer(self, view: memoryview) -> Trailer:
        at = self._trailer_start
        if check64(view) != self._pending_check:
            self._fail("trailer check mismatch (trailer damaged)", at=at)
        body = view[:TRAILER_SIZE]
        (data_records, zero_records, data_bytes, zero_bytes, stream_bytes, digest,
         end) = TRAILER_BODY.unpack(body)
        if end != END_MAGIC:
            self._fail("trailer end magic is wrong", at=at)
        got = (self._data_records, self._zero_records, self._data_bytes, self._zero_bytes, at)
        said = (data_records, zero_records, data_bytes, zero_bytes, stream_bytes)
        names = ("data records", "zero records", "data bytes", "zero bytes", "stream bytes")
        for name, g, s in zip(names, got, said, strict=True):
            if g != s:
                self._fail(f"trailer says {s} {name}, the stream has {g}", at=at)
        verified = self._digest is not None
        if self._digest is not None and self._digest.digest() != digest:
            self._fail(
                f"whole-stream digest mismatch (trailer {digest.hex()}, stream "
                f"{self._digest.digest().hex()})",
                at=at,
            )
        unchecked = self._check_trailer_tag(body, view[TRAILER_SIZE:])
        self.trailer = Trailer(
            data_records=data_records, zero_records=zero_records, data_bytes=data_bytes,
            zero_bytes=zero_bytes, stream_bytes=stream_bytes, digest=digest,
            digest_verified=verified, unchecked=unchecked,
        )
        self._state, self.want = "done", 0
        return self.trailer

    def _check_trailer_tag(self, body: memoryview, tag: memoryview) -> str:
        """Authenticate an encrypted stream's totals; returns what could not be checked."""
        opener = self.opener
        if opener is None or not opener.encrypted:
            return ""
        at = self._trailer_start
        # an index (payloads skipped) without the key fails later, at the first data it opens
        if (self.keyless or self._digest is None) and not opener.can_open:
            return (f"{opener.key_problem}: the AES-GCM tags of {self._unopened} data "
                    "record(s) and of the trailer were not checked (checksums, framing and "
                    "digest were)")
        try:
            opener.check_trailer(self._seq, self._trailer_framing, body, tag)
        except KeyProblem as err:
            self._fail(f"trailer: {err}", at=at)
        return ""

    def _next_record(self) -> None:
        self._pending = None
        self._state, self.want = "record", self._layout.record_size
        self._record_start = self.position

    def _fail(self, problem: str, *, at: int | None = None) -> NoReturn:
        parts = [f"disk stream {self.name}" if self.name else "disk stream"]
        if self.header is not None:
            parts.append(self.header.identity)
        where = f" at stream offset {at}" if at is not None else ""
        raise StreamFormatError(f"{': '.join(parts)}{where}: {problem}")


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class StreamReader:
    """Reads and verifies one stream from `src` (a file, a pipe, anything with `readinto()` or
    `read()`; blocking). The header is read at once; iterate for the records; after the last one
    `trailer` is set and end of input was checked. Any failure raises `StreamFormatError`.

    Data records' `data` is a view of a buffer reused for the next record.
    """

    def __init__(self, src: _Readable, *, name: str = "", keys: Keyring | None = None,
                 keyless: bool = False) -> None:
        self._src = src
        self._readinto = getattr(src, "readinto", None)
        self.decoder = Decoder(name=name, keys=keys, keyless=keyless)
        self._buf = bytearray(RECORD_SIZE)
        self._started = False
        while self.decoder.header is None:
            self._step()
        self.header: StreamHeader = self.decoder.header

    @property
    def trailer(self) -> Trailer | None:
        return self.decoder.trailer

    def __iter__(self) -> Iterator[Record]:
        if self._started:
            raise ValueError("a StreamReader can be iterated once")
        self._started = True
        dec = self.decoder
        while dec.want:
            item = self._step()
            if isinstance(item, Record):
                yield item
        if self._read_into(memoryview(bytearray(1))):
            dec.at_eof(extra=True)

    def verify(self) -> Trailer:
        """Read to the end, checking everything; returns the trailer."""
        for _ in self:
            pass
        assert self.trailer is not None
        return self.trailer

    def _step(self) -> StreamHeader | Record | Trailer | None:
        n = self.decoder.want
        if len(self._buf) < n:
            self._buf = bytearray(n)
        view = memoryview(self._buf)[:n]
        got = 0
        while got < n:
            k = self._read_into(view[got:])
            if not k:
                self.decoder.truncated_in(got)
            got += k
        return self.decoder.take(view)

    def _read_into(self, view: memoryview) -> int:
        try:
            if self._readinto is not None:
                return int(self._readinto(view) or 0)
            chunk = self._src.read(len(view))
        except OSError as err:
            raise SinkError(
                f"{self.decoder.name or 'disk stream'}: reading at stream offset "
                f"{self.decoder.position}: {err}"
            ) from err
        view[: len(chunk)] = chunk
        return len(chunk)
