"""The psk DR transport: a pre-shared key (`dr_auth_token`) proves both sides and keys
AES-256-GCM frames (the design: `framing`, docs/dr.md)."""

from __future__ import annotations

__all__ = ["PskTransport"]

from collections.abc import Awaitable, Callable

import trio

from ahvbackup.core.config import Config
from ahvbackup.core.drivers import DrTransport
from ahvbackup.core.errors import ConfigError, TransportError

from .channel import PskStream, serve_peers
from .channel import receive_exactly as _exactly
from .framing import (
    ANSWER_SIZE,
    HELLO_SIZE,
    PROOF_SIZE,
    ClientHandshake,
    FrameOpener,
    FrameSealer,
    ServerHandshake,
    SessionKeys,
    check_psk,
)


class PskTransport(DrTransport):
    name = "psk"
    summary = "pre-shared key (dr_auth_token): mutual challenge-response, AES-256-GCM frames"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        if not config.dr_auth_token:
            raise ConfigError("dr_auth_token: required by the psk DR transport but not set")
        self._psk = config.dr_auth_token.reveal().encode()
        check_psk(self._psk)

    async def connect(self) -> trio.abc.Stream:
        host, port = self.config.dr_host, self.config.dr_port
        if not host:
            raise ConfigError("dr_host: required to connect to the DR receiver but not set")
        try:
            raw = await trio.open_tcp_stream(host, port)
        except OSError as err:
            raise TransportError(f"DR receiver {host}:{port}: cannot connect "
                                 f"({err.strerror or err})") from err
        try:
            return await self._client(raw, f"{host}:{port}")
        except BaseException:
            await trio.aclose_forcefully(raw)
            raise

    async def _client(self, raw: trio.SocketStream, peer: str) -> PskStream:
        shake = ClientHandshake(self._psk)
        buf = bytearray()
        try:
            await raw.send_all(shake.hello())
            proof = shake.proof(await _exactly(raw, HELLO_SIZE, buf, what="hello"))
            await raw.send_all(proof)
            keys = shake.finish(await _exactly(raw, ANSWER_SIZE, buf, what="answer"))
        except trio.BrokenResourceError as err:
            raise TransportError(f"DR receiver {peer}: the connection broke during the "
                                 "handshake") from err
        except TransportError as err:
            raise type(err)(f"DR receiver {peer}: {err}") from None
        return _stream(raw, keys, buf, peer)

    async def serve(self, handler: Callable[[trio.abc.Stream], Awaitable[None]], *,
                    host: str | None = None,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        await serve_peers(port=self.config.dr_port, host=host, authenticate=self._server,
                          handler=handler, transport=self.name, task_status=task_status)

    async def _server(self, raw: trio.SocketStream, peer: str) -> trio.abc.Stream:
        shake = ServerHandshake(self._psk)
        buf = bytearray()
        await raw.send_all(shake.hello(await _exactly(raw, HELLO_SIZE, buf, what="hello")))
        answer, outcome = shake.answer(await _exactly(raw, PROOF_SIZE, buf, what="proof"))
        await raw.send_all(answer)
        if not isinstance(outcome, SessionKeys):
            raise outcome
        return _stream(raw, outcome, buf, peer)


def _stream(raw: trio.SocketStream, keys: SessionKeys, pending: bytearray, peer: str) -> PskStream:
    return PskStream(raw, sealer=FrameSealer(keys.send),
                     opener=FrameOpener(keys.receive, peer=peer), pending=pending)
