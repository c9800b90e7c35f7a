"""A small trio NBD client: what writing a disk image through `qemu-nbd` needs.

The fixed newstyle handshake with ``NBD_OPT_GO`` (asking for the export's block-size limits),
then ``WRITE``, ``WRITE_ZEROES`` when the server offers it, ``READ``, ``FLUSH`` and ``DISC``.
Requests are pipelined up to `depth` in flight; replies are collected as the window fills, so
the client needs no task of its own and can be called from whichever task the caller is in
(one call at a time). The wire format is the NBD protocol document's (``doc/proto.md`` of the
NBD project).

Asked for the allocation map (``connect(allocation=True)``, what ``ahvbackup import`` reads
foreign images with), the handshake also negotiates structured replies and the
``base:allocation`` metadata context, and `block_status` answers which extents hold data.
Replies are then simple or structured, whichever the server sends.
"""

from __future__ import annotations

__all__ = ["Export", "Extent", "NbdClient", "NbdError"]

import errno
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import trio

from ahvbackup.core.errors import TargetError

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10
REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_WRITE_ZEROES = 1 << 6

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_WRITE_ZEROES = 0, 1, 2, 3, 6
CMD_BLOCK_STATUS = 7
_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_FLUSH: "flush",
          CMD_WRITE_ZEROES: "write-zeroes", CMD_BLOCK_STATUS: "block-status"}

#: structured reply chunks; an error chunk has the high bit of its type set
REPLY_FLAG_DONE = 1
CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS = 0, 1, 2, 5
CHUNK_ERROR_BIT = 1 << 15
#: the base:allocation flags of an extent
STATE_HOLE, STATE_ZERO = 1, 2
BASE_ALLOCATION = "base:allocation"
#: the most one BLOCK_STATUS asks about (its length is 32 bits)
STATUS_SPAN = 1 << 30

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IQ")  # after the magic: error, cookie
_CHUNK = struct.Struct(">HHQI")  # after the magic: flags, type, cookie, length
_OPT_REPLY = struct.Struct(">QIII")


class NbdError(TargetError):
    """The NBD server refused a request or the connection ended. `errno` is the server's
    error number (0 when the connection itself failed)."""

    def __init__(self, message: str, *, errno_: int = 0) -> None:
        super().__init__(message)
        self.errno = errno_


@dataclass(frozen=True)
class Extent:
    """A run of the export with one allocation state: data unless `zero` (it reads as
    zeros) or `hole` (nothing is allocated there)."""

    offset: int
    length: int
    flags: int

    @property
    def zero(self) -> bool:
        return bool(self.flags & STATE_ZERO)

    @property
    def hole(self) -> bool:
        return bool(self.flags & STATE_HOLE)


@dataclass(frozen=True)
class Export:
    """What the server said about the export: its `size`, transmission flags and block-size
    limits (`minimum`, `preferred`, `maximum` bytes per request)."""

    size: int
    flags: int
    minimum: int = 1
    preferred: int = 4096
    maximum: int = 32 << 20
    #: the id of the base:allocation context, when it was negotiated
    allocation: int | None = None

    @property
    def writable(self) -> bool:
        return not self.flags & TFLAG_READ_ONLY

    @property
    def write_zeroes(self) -> bool:
        return bool(self.flags & TFLAG_SEND_WRITE_ZEROES)

    @property
    def flush(self) -> bool:
        return bool(self.flags & TFLAG_SEND_FLUSH)


class _Wire:
    """Exact-length reads and writes over a trio stream; an ended stream is an `NbdError`."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def send(self, *parts: bytes | memoryview) -> None:
        try:
            for part in parts:
                await self.stream.send_all(part)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
            raise NbdError(f"the NBD connection ended ({err or 'closed'})") from err

    async def receive(self, n: int) -> bytes:
        while len(self.buf) < n:
            try:
                got = await self.stream.receive_some(max(65536, n - len(self.buf)))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
                raise NbdError(f"the NBD connection ended ({err or 'closed'})") from err
            if not got:
                raise NbdError("the NBD server closed the connection")
            self.buf += got
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


async def _option(wire: _Wire, option: int, data: bytes, *,
                  refused: str) -> list[tuple[int, bytes]]:
    """Send one option; its replies up to the ACK, as (kind, body). An error reply is an
    `NbdError` starting with `refused`."""
    await wire.send(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)
    out: list[tuple[int, bytes]] = []
    while True:
        magic, _opt, kind, length = _OPT_REPLY.unpack(await wire.receive(_OPT_REPLY.size))
        body = await wire.receive(length) if length else b""
        if magic != REPLY_MAGIC:
            raise NbdError("the NBD server sent a malformed option reply")
        if kind & 0x80000000:
            text = body.decode("utf-8", "replace") or f"error {kind & 0x7FFFFFFF}"
            raise NbdError(f"{refused}: {text}")
        if kind == REP_ACK:
            return out
        out.append((kind, body))


async def _allocation_context(wire: _Wire, raw: bytes) -> int:
    """Negotiate structured replies and base:allocation; returns the context's id."""
    await _option(wire, OPT_STRUCTURED_REPLY, b"",
                  refused="the NBD server cannot send structured replies (block status needs "
                          "them)")
    query = BASE_ALLOCATION.encode()
    data = struct.pack(">I", len(raw)) + raw + struct.pack(">II", 1, len(query)) + query
    for kind, body in await _option(wire, OPT_SET_META_CONTEXT, data,
                                    refused="the NBD server refused base:allocation"):
        if kind == REP_META_CONTEXT and body[4:] == query:
            return int(struct.unpack(">I", body[:4])[0])
    raise NbdError("the NBD server does not report allocation (base:allocation)")


async def _handshake(wire: _Wire, name: str, *, allocation: bool = False) -> Export:
    magic, opt, flags = struct.unpack(">QQH", await wire.receive(18))
    if magic != NBDMAGIC or opt != IHAVEOPT or not flags & FLAG_FIXED_NEWSTYLE:
        raise NbdError("not an NBD server speaking the fixed newstyle handshake")
    client = FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)
    await wire.send(struct.pack(">I", client))
    raw = name.encode()
    context = await _allocation_context(wire, raw) if allocation else None
    data = struct.pack(">I", len(raw)) + raw + struct.pack(">HH", 1, INFO_BLOCK_SIZE)
    size = tflags = -1
    limits = (1, 4096, 32 << 20)
    for kind, body in await _option(wire, OPT_GO, data,
                                    refused=f"the NBD server refused export {name!r}"):
        if kind == REP_INFO and len(body) >= 2:
            (info,) = struct.unpack(">H", body[:2])
            if info == INFO_EXPORT:
                size, tflags = struct.unpack(">QH", body[2:12])
            elif info == INFO_BLOCK_SIZE:
                limits = struct.unpack(">III", body[2:14])
    if size < 0:
        raise NbdError("the NBD server did not describe its export")
    return Export(size=size, flags=tflags, minimum=limits[0], preferred=limits[1],
                  maximum=limits[2], allocation=context)


class NbdClient:
    """One connection to one export (see the module docstring)."""

    def __init__(self, stream: trio.abc.Stream, export: Export, *, depth: int = 8) -> None:
        self._wire = _Wire(stream)
        self.export = export
        self.depth = max(1, depth)
        self._cookie = 0
        self._pending: dict[int, tuple[int, int, int]] = {}  # cookie -> (command, offset, n)
        self._closed = False

    @classmethod
    async def connect(cls, socket: Path, *, name: str = "", depth: int = 8,
                      allocation: bool = False) -> NbdClient:
        """Connect to export `name` at `socket`; with `allocation`, negotiate what
        `block_status` needs (a server without it is an `NbdError`)."""
        try:
            stream = await trio.open_unix_socket(os.fspath(socket))
        except OSError as err:
            raise NbdError(f"cannot connect to the NBD socket {socket} "
                           f"({err.strerror or err})") from err
        try:
            export = await _handshake(_Wire(stream), name, allocation=allocation)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return cls(stream, export, depth=depth)

    async def _request(self, command: int, offset: int, length: int,
                       data: bytes | memoryview | None = None) -> int:
        if self._closed:
            raise NbdError("the NBD connection is closed")
        self._cookie += 1
        header = _REQUEST.pack(REQUEST_MAGIC, 0, command, self._cookie, offset, length)
        self._pending[self._cookie] = (command, offset, length)
        if data is None:
            await self._wire.send(header)
        else:
            await self._wire.send(header, data)
        return self._cookie

    @staticmethod
    def _refused(request: tuple[int, int, int], error: int, said: str = "") -> NbdError:
        command, offset, length = request
        what = os.strerror(error) if error in errno.errorcode else f"error {error}"
        return NbdError(f"NBD {_NAMES.get(command, command)} of {length} bytes at {offset} "
                        f"failed: {said or what}", errno_=error)

    async def _reply(self, into: memoryview | None = None) -> list[Extent]:
        """Collect one reply, simple or structured (every chunk up to the last). A READ's
        data goes into `into`; a BLOCK_STATUS's extents are returned."""
        wire = self._wire
        (magic,) = struct.unpack(">I", await wire.receive(4))
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = _SIMPLE.unpack(await wire.receive(_SIMPLE.size))
            if cookie not in self._pending:
                raise NbdError("the NBD server sent a malformed reply")
            request = self._pending.pop(cookie)
            if error:
                raise self._refused(request, error)
            if request[0] == CMD_READ and into is not None:
                into[:] = await wire.receive(request[2])
            return []
        extents: list[Extent] = []
        failure: NbdError | None = None
        covered = 0  # bytes of a READ the chunks filled
        while True:
            if magic != STRUCTURED_REPLY_MAGIC:
                raise NbdError("the NBD server sent a malformed reply")
            flags, kind, cookie, length = _CHUNK.unpack(await wire.receive(_CHUNK.size))
            if cookie not in self._pending:
                raise NbdError("the NBD server sent a malformed reply")
            request = self._pending[cookie]
            error, filled = await self._chunk(kind, length, request, into, extents)
            failure, covered = failure or error, covered + filled
            if flags & REPLY_FLAG_DONE:
                break
            (magic,) = struct.unpack(">I", await wire.receive(4))
        del self._pending[cookie]
        if failure is not None:
            raise failure
        if request[0] == CMD_READ and covered != request[2]:
            raise NbdError(f"the NBD server's reply to a read of {request[2]} bytes filled "
                           f"{covered}")
        return extents

    async def _chunk(self, kind: int, length: int, request: tuple[int, int, int],
                     into: memoryview | None,
                     extents: list[Extent]) -> tuple[NbdError | None, int]:
        """Take one structured chunk's payload; returns an error chunk's error (raised once
        the reply is complete) and the bytes of a read it filled."""
        wire = self._wire
        _command, start, span = request
        if kind & CHUNK_ERROR_BIT:
            body = await wire.receive(length)
            if length < 6:
                raise NbdError("the NBD server sent a malformed error chunk")
            error, n = struct.unpack(">IH", body[:6])
            return self._refused(request, error,
                                 body[6 : 6 + n].decode("utf-8", "replace")), 0
        if kind == CHUNK_OFFSET_DATA and into is not None and length >= 8:
            (at,) = struct.unpack(">Q", await wire.receive(8))
            if not start <= at <= at + length - 8 <= start + span:
                raise NbdError("the NBD server sent data outside the read")
            into[at - start : at - start + length - 8] = await wire.receive(length - 8)
            return None, length - 8
        elif kind == CHUNK_OFFSET_HOLE and into is not None and length == 12:
            at, n = struct.unpack(">QI", await wire.receive(12))
            if not start <= at <= at + n <= start + span:
                raise NbdError("the NBD server sent a hole outside the read")
            into[at - start : at - start + n] = bytes(n)
            return None, n
        elif kind == CHUNK_BLOCK_STATUS and length >= 4:
            body = await wire.receive(length)
            (context,) = struct.unpack(">I", body[:4])
            at = start
            for pos in range(4, length - 7, 8):
                n, state = struct.unpack(">II", body[pos : pos + 8])
                if context == self.export.allocation and n:
                    extents.append(Extent(at, n, state))
                at += n
        elif kind == CHUNK_NONE or length == 0:
            pass
        else:
            raise NbdError(f"the NBD server sent an unexpected reply chunk (type {kind})")
        return None, 0

    async def _window(self, room: int) -> None:
        while len(self._pending) > self.depth - room:
            await self._reply()

    async def drain(self) -> None:
        """Wait for every request in flight; the first that failed raises."""
        while self._pending:
            await self._reply()

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        """Send `data` to be written at `offset` (acknowledged later, by `drain`, `flush` or
        as the window fills)."""
        if not self.export.writable:  # the protocol forbids sending it
            raise NbdError("the NBD export is read-only", errno_=errno.EROFS)
        view = memoryview(data).cast("B")
        step = self.export.maximum
        for pos in range(0, len(view), step):
            piece = view[pos : pos + step]
            await self._window(1)
            await self._request(CMD_WRITE, offset + pos, len(piece), piece)

    async def write_zeroes(self, offset: int, length: int) -> None:
        if not self.export.write_zeroes:
            raise NbdError("the NBD server does not offer WRITE_ZEROES")
        step = self.export.maximum
        for pos in range(0, length, step):
            await self._window(1)
            await self._request(CMD_WRITE_ZEROES, offset + pos, min(step, length - pos))

    async def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill `buf` from `offset` (after everything in flight)."""
        await self.drain()
        view = buf.cast("B")
        step = self.export.maximum
        for pos in range(0, len(view), step):
            n = min(step, len(view) - pos)
            await self._request(CMD_READ, offset + pos, n)
            await self._reply(view[pos : pos + n])

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """The allocation of [offset, offset + length) as the server reports it, in order:
        at least one extent, possibly covering less than asked (ask again from where it
        ends), never past the export's end."""
        if self.export.allocation is None:
            raise NbdError("block status was not negotiated (connect with allocation=True)")
        await self.drain()
        end = min(offset + length, self.export.size)
        span = min(end - offset, STATUS_SPAN)
        await self._request(CMD_BLOCK_STATUS, offset, span)
        extents = [Extent(e.offset, min(e.length, end - e.offset), e.flags)
                   for e in await self._reply() if e.offset < end]
        if not extents:
            raise NbdError(f"the NBD server reported no extent at {offset}")
        return extents

    async def flush(self) -> None:
        """Everything written is durable once this returns."""
        await self.drain()
        if self.export.flush:
            await self._request(CMD_FLUSH, 0, 0)
            await self.drain()

    async def close(self) -> None:
        """Drain, say goodbye (``DISC``) and close the connection."""
        if self._closed:
            return
        try:
            await self.drain()
            await self._request(CMD_DISC, 0, 0)
            self._pending.clear()  # DISC has no reply
        finally:
            self._closed = True
            await trio.aclose_forcefully(self._wire.stream)

    async def abandon(self) -> None:
        """Close the connection at once, whatever is in flight."""
        self._closed = True
        self._pending.clear()
        await trio.aclose_forcefully(self._wire.stream)
