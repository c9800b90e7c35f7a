"""What the psk and mtls drivers share: the listener loop, exact reads, the psk stream.

`PskStream` is the thin I/O side of `framing`: it seals what `send_all` gets into frames of
at most `MAX_PAYLOAD` bytes and returns only payloads `FrameOpener` authenticated.
"""

from __future__ import annotations

__all__ = ["HANDSHAKE_SECONDS", "PskStream", "peer_name", "receive_exactly", "serve_peers"]

import logging
import operator
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import trio

from ahvbackup.core.errors import TransportError

from .errors import ChannelBroken
from .framing import FrameOpener, FrameSealer

log = logging.getLogger("ahvbackup.dr")

#: how long a peer may take to authenticate before it is dropped (a silent peer holds nothing)
HANDSHAKE_SECONDS = 10.0
#: how long a graceful close waits to hand over its close frame
CLOSE_SECONDS = 5.0
#: payload per frame sent: large enough that the per-frame cost (29 bytes, one Python round
#: each side) is noise; 256 KiB measured slower, 1 MiB no faster (bench/dr_push.py)
SEND_PAYLOAD = 512 << 10
#: read size of the handshake's exact reads
_READ = 1 << 16


def peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return "a peer that already left"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int, buf: bytearray, *,
                          what: str) -> bytes:
    """The next `n` bytes, read through `buf` (which keeps what came after them)."""
    while len(buf) < n:
        data = await stream.receive_some(max(n - len(buf), _READ))
        if not data:
            raise TransportError(f"the connection closed during the handshake ({what})")
        buf += data
    out = bytes(buf[:n])
    del buf[:n]
    return out


Authenticate = Callable[[trio.SocketStream, str], Awaitable[trio.abc.Stream]]


async def serve_peers(*, port: int, host: str | None, authenticate: Authenticate,
                      handler: Callable[[trio.abc.Stream], Awaitable[None]], transport: str,
                      task_status: trio.TaskStatus[int]) -> None:
    """`DrTransport.serve`, given how one accepted connection authenticates."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    if port == 0 and len(listeners) > 1:
        for listener in listeners:
            await listener.aclose()
        raise TransportError("dr_port=0 (any free port) binds one address only: give the "
                             "host to listen on")
    bound = listeners[0].socket.getsockname()[1]
    log.info("DR receiver listening on port %d (%s)", bound, transport)

    async def one(raw: trio.SocketStream) -> None:
        peer = peer_name(raw)
        try:
            with trio.fail_after(HANDSHAKE_SECONDS):
                stream = await authenticate(raw, peer)
        except trio.TooSlowError:
            log.warning("DR peer %s refused: no handshake within %g s", peer, HANDSHAKE_SECONDS)
            await trio.aclose_forcefully(raw)
            return
        except (TransportError, trio.BrokenResourceError) as err:
            log.warning("DR peer %s refused: %s", peer, err)
            await trio.aclose_forcefully(raw)
            return
        log.info("DR peer %s authenticated (%s)", peer, transport)
        try:
            async with stream:
                await handler(stream)
        except* (TransportError, trio.BrokenResourceError) as group:  # also from its nurseries
            why = "; ".join(str(e) or type(e).__name__ for e in _leaves(group))
            log.warning("DR peer %s: %s", peer, why)

    task_status.started(bound)
    await trio.serve_listeners(one, listeners)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


class _OneAtATime:
    """trio's rule for a stream: one sender and one receiver at a time."""

    def __init__(self, what: str) -> None:
        self._what = what
        self.busy = False

    @contextmanager
    def __call__(self) -> Iterator[None]:
        if self.busy:
            raise trio.BusyResourceError(f"another task is already {self._what} this stream")
        self.busy = True
        try:
            yield
        finally:
            self.busy = False


class PskStream(trio.abc.Stream):
    """An authenticated, encrypted stream over the TCP stream `raw` with the session's frame
    sealer and opener; `pending` is what the handshake read past its end."""

    def __init__(self, raw: trio.SocketStream, *, sealer: FrameSealer, opener: FrameOpener,
                 pending: bytearray) -> None:
        self._raw = raw
        self._sealer = sealer
        self._opener = opener
        if pending:
            opener.feed(pending)
        self._sending = _OneAtATime("sending on")
        self._receiving = _OneAtATime("receiving from")
        self._left = bytearray()  # a payload not yet returned whole, from _at
        self._at = 0
        self._closed = False
        self._send_broken: BaseException | None = None
        self._receive_broken: BaseException | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._sending():
            if self._closed:
                raise trio.ClosedResourceError("this DR stream was closed")
            if self._send_broken is not None:
                raise trio.BrokenResourceError("this DR stream broke earlier") \
                    from self._send_broken
            with memoryview(data) as view:
                flat = view.cast("B")
                if not flat:
                    await trio.lowlevel.checkpoint()
                    return
                # nothing is sealed until we may run, so a cancelled call leaves no gap
                await trio.lowlevel.checkpoint_if_cancelled()
                for at in range(0, len(flat), SEND_PAYLOAD):
                    frame = self._sealer.data(flat[at : at + SEND_PAYLOAD])
                    try:
                        await self._raw.send_all(frame)
                    except BaseException as err:  # a frame may be half sent: no way on
                        self._send_broken = err
                        raise

    async def wait_send_all_might_not_block(self) -> None:
        with self._sending():
            if self._closed:
                raise trio.ClosedResourceError("this DR stream was closed")
            await self._raw.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be at least 1")
        with self._receiving():
            if self._closed:
                raise trio.ClosedResourceError("this DR stream was closed")
            if self._receive_broken is not None:
                raise trio.BrokenResourceError("this DR stream broke earlier") \
                    from self._receive_broken
            await trio.lowlevel.checkpoint()
            while self._at >= len(self._left):
                try:
                    payload = self._opener.next_payload()
                except ChannelBroken as err:
                    self._receive_broken = err
                    raise
                if payload is None:
                    await self._fill()
                    continue
                if not payload:  # the peer closed
                    return b""
                self._left, self._at = payload, 0
            at, left = self._at, self._left
            if at == 0 and (max_bytes is None or max_bytes >= len(left)):
                self._left, self._at = bytearray(), 0
                return left  # the whole payload, uncopied
            end = len(left) if max_bytes is None else min(len(left), at + max_bytes)
            self._at = end
            return left[at:end]

    async def _fill(self) -> None:
        # straight into the opener's buffer: one copy less than receive_some, at 1 MiB frames
        # the difference between keeping up with the wire and not
        room = self._opener.space()
        try:
            n = await self._raw.socket.recv_into(room, min(len(room), max(self._opener.wanted(),
                                                                           _READ)))
        except OSError as err:
            self._receive_broken = err
            raise trio.BrokenResourceError(f"DR channel: {err.strerror or err}") from err
        finally:
            room.release()
        if not n:
            try:
                self._opener.end_of_input()
            except ChannelBroken as err:
                self._receive_broken = err
                raise
        self._opener.filled(n)

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            # a close frame only on a stream in good order: a peer must not take a broken
            # or half-sent stream for a finished one
            if (self._send_broken is None and self._receive_broken is None
                    and not self._sending.busy):
                with trio.move_on_after(CLOSE_SECONDS):
                    await self._raw.send_all(self._sealer.close())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await self._raw.aclose()
