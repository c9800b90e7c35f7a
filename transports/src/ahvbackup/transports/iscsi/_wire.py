"""Bytes on a non-blocking TCP socket, the trio way but without trio's per-call overhead.

The session receives tens of thousands of PDUs per second; `trio.socket` costs a checkpoint per
call, so these helpers try the plain socket first and only wait (`wait_readable`/`wait_writable`)
when it would block. Callers checkpoint on their own schedule.
"""

from __future__ import annotations

import contextlib
import socket
import struct

import trio

from .errors import IscsiConnectionError, IscsiDigestError, IscsiProtocolError
from .pdu import BHS_LEN, crc32c, pad_len

_ZEROS = bytes(4)


class ConnectionClosed(Exception):
    """The peer closed the connection (EOF) or the socket was closed under us."""


async def open_socket(host: str, port: int, *, label: str) -> socket.socket:
    """A connected, non-blocking TCP socket with Nagle off."""
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as err:
        raise IscsiConnectionError(f"iSCSI: cannot connect to {label}: {err}") from err
    sock = socket.socket(fileno=stream.socket.detach())
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
    return sock


def close_socket(sock: socket.socket) -> None:
    """Close, first waking any task blocked on the socket (it sees ClosedResourceError)."""
    if sock.fileno() != -1:
        trio.lowlevel.notify_closing(sock)
        sock.close()


async def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket (recv_into, no intermediate copies)."""
    while view:
        try:
            n = sock.recv_into(view)
        except BlockingIOError:
            try:
                await trio.lowlevel.wait_readable(sock)
            except trio.ClosedResourceError as err:
                raise ConnectionClosed("connection closed locally") from err
            continue
        except OSError as err:
            raise ConnectionClosed(str(err)) from err
        if not n:
            raise ConnectionClosed("connection closed by the target")
        view = view[n:]


async def send_all(sock: socket.socket, parts: list[bytes | bytearray | memoryview]) -> None:
    """Gather-write every part (sendmsg), resuming after partial writes."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        try:
            n = sock.sendmsg(views)
        except BlockingIOError:
            try:
                await trio.lowlevel.wait_writable(sock)
            except trio.ClosedResourceError as err:
                raise ConnectionClosed("connection closed locally") from err
            continue
        except OSError as err:
            raise ConnectionClosed(str(err)) from err
        while n:
            first = len(views[0])
            if n >= first:
                n -= first
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


def frame(hdr: bytearray, data: bytes | bytearray | memoryview | None, *, header_digest: bool,
          data_digest: bool) -> list[bytes | bytearray | memoryview]:
    """The parts of one outgoing PDU: header, its digest, data, padding, data digest."""
    parts: list[bytes | bytearray | memoryview] = [hdr]
    if header_digest:
        parts.append(crc32c(hdr).to_bytes(4, "little"))
    if data is not None and len(data):
        parts.append(data)
        pad = pad_len(len(data))
        if pad:
            parts.append(_ZEROS[:pad])
        if data_digest:
            crc = crc32c(data)
            if pad:
                crc = crc32c(_ZEROS[:pad], crc)
            parts.append(crc.to_bytes(4, "little"))
    return parts


async def recv_header(sock: socket.socket, hview: memoryview, *, header_digest: bool,
                      label: str) -> None:
    """Receive one BHS into `hview` (48 bytes, +4 for the digest), skipping any AHS."""
    await recv_exact(sock, hview)
    ahs = hview[4] * 4
    if ahs:
        # An AHS sits between the BHS and its digest; none of the PDUs we handle needs one.
        rest = bytearray(ahs)
        if header_digest:
            rest[:4] = hview[BHS_LEN:]
            more = bytearray(4)
            await recv_exact(sock, memoryview(rest)[4:])
            await recv_exact(sock, memoryview(more))
            if crc32c(rest, crc32c(hview[:BHS_LEN])) != int.from_bytes(more, "little"):
                raise IscsiDigestError(f"iSCSI {label}: header digest mismatch (PDU corrupted)")
            return
        await recv_exact(sock, memoryview(rest))
        return
    if header_digest:
        want = struct.unpack_from("<I", hview, BHS_LEN)[0]
        if crc32c(hview[:BHS_LEN]) != want:
            raise IscsiDigestError(f"iSCSI {label}: header digest mismatch (PDU corrupted)")


async def recv_segment(sock: socket.socket, dsl: int, *, data_digest: bool,
                       label: str) -> bytes:
    """Receive a small data segment (text, sense, ping data) with padding and digest."""
    if not dsl:
        return b""
    total = dsl + pad_len(dsl) + (4 if data_digest else 0)
    if total > (1 << 24) + 8:
        raise IscsiProtocolError(f"iSCSI {label}: data segment of {dsl} bytes")
    buf = bytearray(total)
    await recv_exact(sock, memoryview(buf))
    if data_digest:
        body = dsl + pad_len(dsl)
        if crc32c(memoryview(buf)[:body]) != int.from_bytes(buf[body:], "little"):
            raise IscsiDigestError(f"iSCSI {label}: data digest mismatch (PDU corrupted)")
    return bytes(buf[:dsl])
