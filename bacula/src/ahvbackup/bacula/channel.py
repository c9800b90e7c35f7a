"""The metaplugin protocol over trio streams: receive the plugin's packets, send ours.

Sends are serialised by a lock, so tasks of one job (one per VM, one per disk) may report
progress or warnings while another task streams data: packets never interleave, and
message packets between data packets are allowed by the protocol.
"""

from __future__ import annotations

__all__ = ["MESSAGE_KINDS", "PacketChannel"]

import contextlib

import trio

from ahvbackup.core.log import mask_secrets

from .protocol import (
    HEADER_SIZE,
    PLUGIN_TO_BACKEND,
    Packet,
    PeerClosedError,
    ProtocolError,
    encode_command,
    encode_header,
    parse_header,
    split_payload,
)

#: job-message packet types: error, abort, warning, info, saved, not saved, restored,
#: skipped, operator, event, error without the error flag
MESSAGE_KINDS = frozenset("EAWISNRPOVQ")


#: the longest job message sent (Bacula's job log wants lines, and a packet holds 999999 bytes)
MESSAGE_MAX = 4000


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = "; ".join(lines) if lines else "(no message)"
    return line if len(line) <= MESSAGE_MAX else f"{line[:MESSAGE_MAX]}... (cut)"


class PacketChannel:
    """Packets from `receive_stream` (the plugin) and to `send_stream` (the plugin).

    Reads never take more bytes than the packet being read, so a channel can take over a
    stream that `FdPacketIO` used before it.
    """

    def __init__(self, receive_stream: trio.abc.ReceiveStream,
                 send_stream: trio.abc.SendStream) -> None:
        self._rx = receive_stream
        self._tx = send_stream
        self._send_lock = trio.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0

    async def _receive_exactly(self, n: int, *, what: str) -> bytearray:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = await self._rx.receive_some(n - len(buf))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
                raise PeerClosedError(f"the file daemon's pipe broke while reading {what}") \
                    from err
            if not chunk:
                raise PeerClosedError(
                    f"the file daemon closed the connection while the backend waited for {what}"
                    f" ({len(buf)} of {n} bytes read)"
                )
            buf += chunk
        self.bytes_received += n
        return buf

    async def receive(self) -> Packet:
        """The next packet from the plugin (C, D, F or T); raises `ProtocolError` on junk."""
        head = await self._receive_exactly(HEADER_SIZE, what="a packet header")
        kind, length = parse_header(head, allowed=PLUGIN_TO_BACKEND)
        payload = (await self._receive_exactly(length, what=f"a {length}-byte {kind} payload")
                   if length else b"")
        return Packet(kind, payload)

    async def receive_command(self) -> str | None:
        """The text of the next packet if it is a command, None if it is an end of data."""
        packet = await self.receive()
        if packet.kind == "C":
            return packet.text
        if packet.kind == "F":
            return None
        raise ProtocolError(f"expected a command or end of data, got a {packet.kind} packet")

    async def _write(self, *parts: bytes | bytearray | memoryview) -> None:
        async with self._send_lock:
            for part in parts:
                try:
                    await self._tx.send_all(part)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
                    raise PeerClosedError("the file daemon closed its end of the pipe") from err
                self.bytes_sent += len(part)

    async def send(self, kind: str, payload: bytes | bytearray | memoryview = b"") -> None:
        """One packet; `payload` at most 999999 bytes (see `send_data` for more)."""
        if payload:
            await self._write(encode_header(kind, len(payload)), payload)
        else:
            await self._write(encode_header(kind, 0))

    async def send_command(self, text: str) -> None:
        await self._write(encode_command(text))

    async def send_eod(self) -> None:
        await self._write(encode_header("F", 0))

    async def send_data(self, data: bytes | bytearray | memoryview) -> int:
        """`data` as as many D packets as it needs; returns the number of bytes sent."""
        n = 0
        for piece in split_payload(data):
            await self.send("D", piece)
            n += len(piece)
        return n

    async def send_message(self, kind: str, text: str) -> None:
        """A job message (E error, A abort, W warning, I info, ...), on one line, secrets masked."""
        if kind not in MESSAGE_KINDS:
            raise ValueError(f"{kind!r} is not a message packet type")
        await self._write(encode_command(mask_secrets(_one_line(text)), kind=kind))

    async def drain_input(self, *, timeout: float = 30.0) -> int:
        """Read and drop what the plugin still sends, up to its end-of-file; returns the bytes.

        The file daemon closes its end after ``T``; a backend that exits first is reported
        as failed. The timeout bounds a plugin that never closes."""
        dropped = 0
        with trio.move_on_after(timeout):
            while True:
                try:
                    chunk = await self._rx.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not chunk:
                    break
                dropped += len(chunk)
        return dropped

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for stream in (self._tx, self._rx):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                         OSError):
                    await stream.aclose()
