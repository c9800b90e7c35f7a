"""Messages over a `trio.abc.Stream`: the I/O half of the DR protocol, for both sides."""

from __future__ import annotations

__all__ = ["ConnectionLost", "Wire"]

import trio

from ..errors import TransportError
from .protocol import FrameDecoder, Message, encode
from .throttle import TokenBucket

RECEIVE_SIZE = 1 << 18


class ConnectionLost(TransportError):
    """The stream broke or ended early; a push reconnects and resumes after it."""


class Wire:
    """Sends and receives whole messages on `stream`; `peer` names the other side in errors.
    `sent` counts the bytes put on the stream (what `throttle`, if any, caps)."""

    def __init__(self, stream: trio.abc.Stream, *, peer: str,
                 throttle: TokenBucket | None = None) -> None:
        self.stream = stream
        self.peer = peer
        self.throttle = throttle
        self.sent = 0
        self._decoder = FrameDecoder(peer=peer)

    async def send(self, msg: Message) -> None:
        frame = encode(msg)
        if self.throttle is not None:
            await self.throttle.take(len(frame))
        try:
            await self.stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
            raise ConnectionLost(f"connection to the {self.peer} lost while sending "
                                 f"({err or type(err).__name__})") from err
        self.sent += len(frame)

    async def receive(self) -> Message | None:
        """The next message; None when the peer closed the stream between messages."""
        while True:
            msg = self._decoder.next()
            if msg is not None:
                return msg
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
                raise ConnectionLost(f"connection to the {self.peer} lost while receiving "
                                     f"({err or type(err).__name__})") from err
            if not data:
                if self._decoder.pending:
                    raise ConnectionLost(f"the {self.peer} closed the connection inside a "
                                         f"message ({self._decoder.pending} bytes of it came)")
                return None
            self._decoder.feed(data)

    async def expect(self) -> Message:
        """The next message; the peer closing the stream here is a lost connection."""
        msg = await self.receive()
        if msg is None:
            raise ConnectionLost(f"the {self.peer} closed the connection")
        return msg

    async def aclose(self) -> None:
        await self.stream.aclose()

