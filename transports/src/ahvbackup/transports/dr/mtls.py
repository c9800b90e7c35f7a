"""The mtls DR transport: TLS 1.3 only, a certificate required on both sides, each verified
against `dr_ca_cert`; the source also checks the receiver's certificate names `dr_host`.

TLS authenticates the peers and carries 32 random bytes each way; the payload then moves in
the psk channel's AES-256-GCM frames (`framing`) on the same TCP connection, keyed from those
bytes, after both sides closed TLS cleanly (`SSLStream.unwrap`). trio's `SSLStream` passes
every 16 KiB TLS record through Python (bench/dr_push.py measured it at a fifth of a raw
copy); the frames carry 512 KiB each. The receiver sends its bytes only once it accepted the
source's certificate (in TLS 1.3 a client finishes its handshake before the server judged
its certificate), so a refused source learns it in `connect`, as with psk.
"""

from __future__ import annotations

__all__ = ["MtlsTransport"]

import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from ahvbackup.core.config import Config, check_file_mode
from ahvbackup.core.drivers import DrTransport
from ahvbackup.core.errors import ConfigError, TransportError

from .channel import PskStream, receive_exactly, serve_peers
from .errors import Refused
from .framing import TLS_RANDOM_SIZE, FrameOpener, FrameSealer, SessionKeys, tls_session_keys

#: OpenSSL's reasons, as an operator would say them
_REASONS = {
    "TLSV1_ALERT_UNKNOWN_CA": "it does not trust the CA that signed our certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it finds our certificate bad",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "our certificate has expired",
    "TLSV1_ALERT_CERTIFICATE_EXPIRED": "our certificate has expired",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it requires a certificate and we sent none",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "it sent no certificate",
    "TLSV1_ALERT_PROTOCOL_VERSION": "it does not speak TLS 1.3",
    "UNSUPPORTED_PROTOCOL": "it does not speak TLS 1.3",
    "WRONG_VERSION_NUMBER": "it does not speak TLS (a psk receiver? dr_transport differs)",
}


def _why(err: BaseException) -> str:
    """The reason a TLS handshake failed, from the ssl error under trio's."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"its certificate does not verify: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        reason = str(cause.reason or "")
        return _REASONS.get(reason, reason.replace("_", " ").lower() or str(cause))
    return "the connection broke during the TLS handshake"


class MtlsTransport(DrTransport):
    name = "mtls"
    summary = "TLS 1.3 with certificates on both sides (dr_auth_cert, dr_auth_key, dr_ca_cert)"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        missing = [k for k in ("dr_auth_cert", "dr_auth_key", "dr_ca_cert")
                   if getattr(config, k) is None]
        if missing:
            raise ConfigError(f"{', '.join(missing)}: required by the mtls DR transport but "
                              "not set")
        assert config.dr_auth_cert and config.dr_auth_key and config.dr_ca_cert
        self._cert, self._key, self._ca = config.dr_auth_cert, config.dr_auth_key, config.dr_ca_cert
        check_file_mode(self._key, what="DR key (dr_auth_key)")

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if purpose is ssl.Purpose.SERVER_AUTH
                             else ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        if purpose is ssl.Purpose.CLIENT_AUTH:
            ctx.num_tickets = 0  # no session resumption: every connection shows its certificate
        _load(ctx.load_verify_locations, "dr_ca_cert", self._ca)
        try:
            ctx.load_cert_chain(self._cert, self._key)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"dr_auth_cert, dr_auth_key: cannot load {self._cert} with "
                              f"{self._key} ({_load_reason(err)})") from None
        return ctx

    async def connect(self) -> trio.abc.Stream:
        host, port = self.config.dr_host, self.config.dr_port
        if not host:
            raise ConfigError("dr_host: required to connect to the DR receiver but not set")
        ctx = self._context(ssl.Purpose.SERVER_AUTH)
        try:
            raw = await trio.open_tcp_stream(host, port)
        except OSError as err:
            raise TransportError(f"DR receiver {host}:{port}: cannot connect "
                                 f"({err.strerror or err})") from err
        tls = trio.SSLStream(raw, ctx, server_hostname=host)
        try:
            return await _client(tls, f"{host}:{port}")
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise

    async def serve(self, handler: Callable[[trio.abc.Stream], Awaitable[None]], *,
                    host: str | None = None,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        ctx = self._context(ssl.Purpose.CLIENT_AUTH)

        async def authenticate(raw: trio.SocketStream, peer: str) -> trio.abc.Stream:
            tls = trio.SSLStream(raw, ctx, server_side=True)
            mine = os.urandom(TLS_RANDOM_SIZE)
            try:
                await tls.do_handshake()
                theirs = await receive_exactly(tls, TLS_RANDOM_SIZE, bytearray(),
                                               what="session bytes")
                await tls.send_all(mine)
                plain, trailing = await tls.unwrap()
            except trio.BrokenResourceError as err:
                raise Refused(_why(err)) from None
            return _framed(plain, tls_session_keys(theirs, mine, server=True), trailing, peer)

        await serve_peers(port=self.config.dr_port, host=host, authenticate=authenticate,
                          handler=handler, transport=self.name, task_status=task_status)


async def _client(tls: trio.SSLStream[trio.SocketStream], peer: str) -> PskStream:
    """The source's side: TLS, the session bytes each way (the receiver's say it accepted
    us), TLS closed, frames from there."""
    mine = os.urandom(TLS_RANDOM_SIZE)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as err:
        raise Refused(f"DR receiver {peer} refused: {_why(err)}") from None
    try:
        await tls.send_all(mine)
        theirs = await receive_exactly(tls, TLS_RANDOM_SIZE, bytearray(),
                                       what="session bytes")
        plain, trailing = await tls.unwrap()
    except (trio.BrokenResourceError, TransportError) as err:
        raise Refused(f"DR receiver {peer} refused us: {_why(err)}") from None
    return _framed(plain, tls_session_keys(mine, theirs, server=False), trailing, peer)


def _framed(raw: trio.abc.Stream, keys: SessionKeys, pending: bytes | bytearray,
            peer: str) -> PskStream:
    assert isinstance(raw, trio.SocketStream)
    return PskStream(raw, sealer=FrameSealer(keys.send),
                     opener=FrameOpener(keys.receive, peer=peer), pending=bytearray(pending))


def _load(load: Callable[[str], None], key: str, path: Path) -> None:
    try:
        load(str(path))
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"{key}: cannot load {path} ({_load_reason(err)})") from None


def _load_reason(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        return "not found"
    if isinstance(err, ssl.SSLError):
        return str(err.reason or err).replace("_", " ").lower()
    return str(getattr(err, "strerror", None) or err)
