"""Packet framing of the Bacula metaplugin protocol, backend side (docs/bacula.md).

Every packet is an 8-byte header, ``<type><6 ASCII decimal digits>\\n``, followed by exactly
that many payload bytes (at most 999999). Commands (``C``) are text ending in a newline;
data (``D``) is binary; ``F`` (end of data) and ``T`` (terminate) carry nothing.

This module imports nothing heavy on purpose: the backend answers ``Hello`` with the blocking
`FdPacketIO` before it loads trio and the rest of ahvbackup (the file daemon expects the
answer at once). The trio side is `ahvbackup.bacula.channel`.
"""

from __future__ import annotations

__all__ = [
    "BACKEND_TO_PLUGIN",
    "EOD",
    "HEADER_SIZE",
    "MAX_PAYLOAD",
    "PLUGIN_TO_BACKEND",
    "TERMINATE",
    "FdPacketIO",
    "Packet",
    "PeerClosedError",
    "ProtocolError",
    "command_text",
    "encode_command",
    "encode_header",
    "encode_packet",
    "parse_header",
    "shown",
    "split_payload",
]

import os
from collections.abc import Iterator
from typing import NamedTuple

from ahvbackup.core.errors import AhvBackupError

HEADER_SIZE = 8
MAX_PAYLOAD = 999_999

#: packet types the file daemon's plugin sends to a backend
PLUGIN_TO_BACKEND = frozenset("CDFT")
#: packet types a backend may send: C D F T, errors (E, A), messages (W I S N R P O V Q)
BACKEND_TO_PLUGIN = frozenset("CDFTEAWISNRPOVQ")
_NO_PAYLOAD = frozenset("FT")
_KNOWN = BACKEND_TO_PLUGIN

#: how much of a bad command an error message quotes (a command can be 999999 bytes)
SHOWN = 120

EOD = b"F000000\n"
TERMINATE = b"T000000\n"


class ProtocolError(AhvBackupError):
    """The other side broke the metaplugin protocol (a malformed header, an unexpected packet)."""


class PeerClosedError(ProtocolError):
    """The file daemon closed the pipe (end of file where a packet was due)."""


class Packet(NamedTuple):
    """One received packet: its type letter and its payload."""

    kind: str
    payload: bytes | bytearray

    @property
    def text(self) -> str:
        """The payload of a command, without its trailing newline (see `command_text`)."""
        return command_text(self.payload)


def shown(text: str) -> str:
    """`text` quoted for an error message, cut to `SHOWN` characters (a bad command may be a
    whole data packet read as text)."""
    if len(text) <= SHOWN:
        return repr(text)
    return f"{text[:SHOWN]!r}... ({len(text)} characters)"


def encode_header(kind: str, length: int) -> bytes:
    """The 8-byte header of a packet of type `kind` with a payload of `length` bytes."""
    if len(kind) != 1 or kind not in _KNOWN:
        raise ValueError(f"unknown packet type {kind!r}")
    if not 0 <= length <= MAX_PAYLOAD:
        raise ValueError(f"packet payload of {length} bytes is outside 0..{MAX_PAYLOAD}")
    if kind in _NO_PAYLOAD and length:
        raise ValueError(f"a {kind} packet carries no payload (got {length} bytes)")
    return b"%c%06d\n" % (ord(kind), length)


def parse_header(raw: bytes | bytearray | memoryview, *, allowed: frozenset[str] = _KNOWN
                 ) -> tuple[str, int]:
    """Check an 8-byte header and return (type, payload length).

    Strict: the type must be one of `allowed`, the length exactly six ASCII digits, the
    eighth byte a newline, and ``F``/``T`` must have length 0. The error quotes the bytes.
    """
    raw = bytes(raw)
    if len(raw) != HEADER_SIZE:
        raise ProtocolError(f"bad packet header {raw!r}: {len(raw)} bytes, expected 8")
    kind = chr(raw[0])
    if kind not in allowed:
        raise ProtocolError(f"bad packet header {raw!r}: unknown packet type {kind!r}")
    digits = raw[1:7]
    if not (digits.isdigit() and digits.isascii()):
        raise ProtocolError(f"bad packet header {raw!r}: length {digits!r} is not 6 digits")
    if raw[7:8] != b"\n":
        raise ProtocolError(f"bad packet header {raw!r}: does not end with a newline")
    length = int(digits)
    if kind in _NO_PAYLOAD and length:
        raise ProtocolError(f"bad packet header {raw!r}: a {kind} packet carries no payload")
    return kind, length


def encode_packet(kind: str, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """Header and payload as one bytes object (for small packets: commands and messages)."""
    return encode_header(kind, len(payload)) + bytes(payload)


def encode_command(text: str, *, kind: str = "C") -> bytes:
    """A text packet: `text` plus the newline the plugin expects (and counts in the length).

    Raises ValueError for text with an inner newline or longer than a packet.
    """
    body = text.rstrip("\n")
    if "\n" in body:
        raise ValueError(f"a {kind} packet holds one line; got {body!r}")
    return encode_packet(kind, os.fsencode(body) + b"\n")


def command_text(payload: bytes | bytearray | memoryview) -> str:
    """Decode a command payload; the plugin ends commands with a newline, which is removed.

    Bytes that are not UTF-8 (file names) are kept as surrogate escapes, so names
    round-trip with `os.fsencode`.
    """
    data = bytes(payload)
    if data.endswith(b"\n"):
        data = data[:-1]
    return os.fsdecode(data)


def split_payload(data: bytes | bytearray | memoryview, *, limit: int = MAX_PAYLOAD
                  ) -> Iterator[memoryview]:
    """`data` in slices of at most `limit` bytes (no copies); nothing for empty data.

    An empty ``D`` packet would read as end of data on the plugin side, so none is made.
    """
    view = memoryview(data).cast("B")
    for start in range(0, len(view), limit):
        yield view[start : start + limit]


class FdPacketIO:
    """Blocking packet I/O on two file descriptors; never reads past the packet it returns.

    Used for the ``Hello`` exchange before trio starts, and for the last-resort abort packet
    when the backend dies of a bug.
    """

    def __init__(self, *, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd

    def _read_exactly(self, n: int, *, what: str) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            chunk = os.read(self.read_fd, n - got)
            if not chunk:
                raise PeerClosedError(
                    f"the file daemon closed the connection while the backend waited for {what}"
                    f" ({got} of {n} bytes read)"
                )
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def read_packet(self) -> Packet:
        """Read one packet sent by the plugin (types C, D, F, T)."""
        head = self._read_exactly(HEADER_SIZE, what="a packet header")
        kind, length = parse_header(head, allowed=PLUGIN_TO_BACKEND)
        payload = self._read_exactly(length, what=f"a {length}-byte {kind} payload") if length \
            else b""
        return Packet(kind, payload)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self.write_fd, view)
            view = view[n:]

    def send(self, kind: str, payload: bytes | bytearray | memoryview = b"") -> None:
        self.write(encode_header(kind, len(payload)))
        if payload:
            self.write(payload)

    def send_command(self, text: str, *, kind: str = "C") -> None:
        self.write(encode_command(text, kind=kind))
