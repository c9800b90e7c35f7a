"""The DR channel without I/O: the psk handshake, and sealing and opening frames (psk and mtls).

Python 3.11's ssl has no TLS-PSK, so the psk channel is built from primitives (docs/dr.md):

Handshake (fixed sizes, so a reader needs no parser)::

    client -> server  HELLO  = MAGIC | version | client nonce (32)            41 bytes
    server -> client  HELLO  = MAGIC | version | server nonce (32)            41 bytes
    client -> server  PROOF  = HMAC-SHA256(auth_c, "client proof" | th)       32 bytes
    server -> client  ANSWER = ACCEPT | HMAC-SHA256(auth_s, "server proof" | th)   33 bytes
                            or REFUSE | 32 zero bytes

``th`` is SHA-256 of both hellos; HKDF-SHA256 (salt ``th``, key material the PSK) gives
``auth_c``, ``auth_s`` and one AES-256-GCM key per direction. The server answers only after
the client proved the key, so a client without it learns nothing; the client accepts only a
server that proved it too. Fresh nonces on both sides make every session's keys new.

Frames (each direction numbered from 0)::

    type (1) | seq (8) | length (4) | AES-256-GCM(payload) | tag (16)

The 13-byte header is the associated data and ``seq`` is the nonce, so a frame is accepted
only as the next one of its direction: a replayed, reordered, dropped, reflected or altered
frame is refused, as is one longer than `MAX_PAYLOAD`, by its header, before its payload is
read. The stream ends with a sealed CLOSE frame; an end without one is a truncation.
"""

from __future__ import annotations

__all__ = [
    "ANSWER_SIZE",
    "CLOSE",
    "DATA",
    "HEADER",
    "HELLO_SIZE",
    "MAX_PAYLOAD",
    "PROOF_SIZE",
    "TAG_SIZE",
    "TLS_RANDOM_SIZE",
    "ClientHandshake",
    "FrameOpener",
    "FrameSealer",
    "ServerHandshake",
    "SessionKeys",
    "check_psk",
    "tls_session_keys",
]

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ahvbackup.core.errors import ConfigError

from .errors import ChannelBroken, Refused

MAGIC = b"AHVDRPSK"
VERSION = 1
NONCE_SIZE = 32
HELLO = struct.Struct(f">8sB{NONCE_SIZE}s")
HELLO_SIZE = HELLO.size
PROOF_SIZE = 32
ANSWER_SIZE = 1 + PROOF_SIZE
ACCEPT, REFUSE = 1, 0
MIN_PSK_BYTES = 32

HEADER = struct.Struct(">BQI")
TAG_SIZE = 16
DATA, CLOSE = 1, 2
#: the largest payload a frame carries; a header announcing more is refused unread
MAX_PAYLOAD = 1 << 20


@dataclass(frozen=True)
class SessionKeys:
    """The keys of one session, for one side: what it seals with and what it opens with."""

    send: bytes = field(repr=False)
    receive: bytes = field(repr=False)


def _schedule(psk: bytes, transcript: bytes) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """(transcript hash, auth_c, auth_s, key client->server, key server->client)."""
    th = hashlib.sha256(transcript).digest()
    okm = HKDF(algorithm=hashes.SHA256(), length=128, salt=th,
               info=b"ahvbackup dr psk v1").derive(psk)
    return th, okm[:32], okm[32:64], okm[64:96], okm[96:]


def _proof(key: bytes, label: bytes, th: bytes) -> bytes:
    return hmac.new(key, label + th, hashlib.sha256).digest()


def _hello(nonce: bytes) -> bytes:
    return HELLO.pack(MAGIC, VERSION, nonce)


def _check_hello(data: bytes, who: str) -> None:
    magic, version, _ = HELLO.unpack(data)
    if magic != MAGIC:
        raise Refused(f"the {who} does not speak the ahvbackup psk DR channel (is it a TLS "
                      "endpoint? dr_transport differs between the two sides?)")
    if version != VERSION:
        raise Refused(f"the {who} speaks psk channel version {version}; this side speaks "
                      f"{VERSION}")


def check_psk(psk: bytes) -> None:
    """Refuse a key too short to be a key (a configuration error, raised before connecting)."""
    if len(psk) < MIN_PSK_BYTES:
        raise ConfigError(f"dr_auth_token: at least {MIN_PSK_BYTES} bytes are needed, it has "
                      f"{len(psk)}; generate one with: openssl rand -hex 32")


class ClientHandshake:
    """The client's side: `hello()`, then `proof(server_hello)`, then `finish(answer)`."""

    def __init__(self, psk: bytes) -> None:
        check_psk(psk)
        self._psk = psk
        self._hello = _hello(os.urandom(NONCE_SIZE))
        self._th = b""
        self._keys: tuple[bytes, bytes, bytes, bytes] | None = None

    def hello(self) -> bytes:
        return self._hello

    def proof(self, server_hello: bytes) -> bytes:
        _check_hello(server_hello, "receiver")
        self._th, auth_c, auth_s, c2s, s2c = _schedule(self._psk, self._hello + server_hello)
        self._keys = (auth_c, auth_s, c2s, s2c)
        return _proof(auth_c, b"client proof", self._th)

    def finish(self, answer: bytes) -> SessionKeys:
        assert self._keys is not None, "proof() first"
        _auth_c, auth_s, c2s, s2c = self._keys
        if answer[0] == REFUSE:
            raise Refused("the receiver refused our dr_auth_token (the two sides' keys differ)")
        if answer[0] != ACCEPT or not hmac.compare_digest(
                answer[1:], _proof(auth_s, b"server proof", self._th)):
            raise Refused("the receiver did not prove dr_auth_token (the two sides' keys "
                          "differ, or this is not our receiver)")
        return SessionKeys(send=c2s, receive=s2c)


class ServerHandshake:
    """The server's side: `hello(client_hello)`, then `answer(client_proof)`, which gives the
    bytes to send and the session keys, or the refusal to send and the error to raise."""

    def __init__(self, psk: bytes) -> None:
        check_psk(psk)
        self._psk = psk
        self._keys: tuple[bytes, bytes, bytes, bytes, bytes] | None = None

    def hello(self, client_hello: bytes) -> bytes:
        _check_hello(client_hello, "source")
        mine = _hello(os.urandom(NONCE_SIZE))
        self._keys = _schedule(self._psk, client_hello + mine)
        return mine

    def answer(self, client_proof: bytes) -> tuple[bytes, SessionKeys | Refused]:
        assert self._keys is not None, "hello() first"
        th, auth_c, auth_s, c2s, s2c = self._keys
        if not hmac.compare_digest(client_proof, _proof(auth_c, b"client proof", th)):
            return (bytes([REFUSE]) + bytes(PROOF_SIZE),
                    Refused("the source did not prove dr_auth_token (the two sides' keys "
                            "differ)"))
        return (bytes([ACCEPT]) + _proof(auth_s, b"server proof", th),
                SessionKeys(send=s2c, receive=c2s))


#: bytes each side of an mtls session contributes to its frame keys
TLS_RANDOM_SIZE = 32


def tls_session_keys(client_random: bytes, server_random: bytes, *,
                     server: bool) -> SessionKeys:
    """Frame keys for an mtls session, from the random bytes each side sent the other inside
    TLS 1.3 (so only the two verified peers know them)."""
    okm = HKDF(algorithm=hashes.SHA256(), length=64,
               salt=hashlib.sha256(client_random + server_random).digest(),
               info=b"ahvbackup dr mtls v1").derive(client_random + server_random)
    c2s, s2c = okm[:32], okm[32:]
    return SessionKeys(send=s2c, receive=c2s) if server else SessionKeys(send=c2s, receive=s2c)


def _nonce(seq: int) -> bytes:
    return b"\0\0\0\0" + seq.to_bytes(8, "big")


class FrameSealer:
    """Seals outgoing payloads into frames, numbered from 0. A frame is a view of one buffer
    the sealer reuses: send it before sealing the next."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._frame = bytearray(HEADER.size + MAX_PAYLOAD + TAG_SIZE)
        self.seq = 0

    def _seal(self, kind: int, payload: memoryview) -> memoryview:
        n = len(payload)
        frame = memoryview(self._frame)[: HEADER.size + n + TAG_SIZE]
        HEADER.pack_into(frame, 0, kind, self.seq, n)
        self._aead.encrypt_into(_nonce(self.seq), payload, frame[: HEADER.size],
                                frame[HEADER.size :])
        self.seq += 1
        return frame

    def data(self, payload: memoryview) -> memoryview:
        """One DATA frame of at most `MAX_PAYLOAD` bytes (the caller splits)."""
        assert 0 < len(payload) <= MAX_PAYLOAD
        return self._seal(DATA, payload)

    def close(self) -> memoryview:
        return self._seal(CLOSE, memoryview(b""))


#: the buffer that takes headers, small frames and what a read brings past a frame
_SMALL = 1 << 17


class FrameOpener:
    """Opens incoming frames. Bytes arrive straight into `space()` followed by `filled(n)`,
    or by `feed`; then `next_payload` until it says it needs more; `end_of_input` when the
    connection ends.

    A frame not whole in the small buffer once its header is read gets a buffer of its own,
    which the rest of it is received into and decrypted in place: that buffer, trimmed to
    the payload, is what `next_payload` returns, so a payload is copied only by the socket.
    """

    def __init__(self, key: bytes, *, peer: str) -> None:
        self._aead = AESGCM(key)
        self._peer = peer
        self._buf = bytearray(_SMALL)
        self._start = 0  # the frame being received starts here
        self._end = 0  # bytes received up to here
        self._frame: bytearray | None = None  # a frame received into its own buffer
        self._have = 0  # bytes of it received
        self.seq = 0  # the sequence number of the next frame
        self.closed = False  # a CLOSE frame arrived

    def _broken(self, why: str) -> ChannelBroken:
        return ChannelBroken(f"DR channel from {self._peer}: {why}; connection closed")

    def space(self) -> memoryview:
        """Where the next received bytes go (never empty while a frame is incomplete)."""
        if self._frame is not None:
            return memoryview(self._frame)[self._have :]
        if self._start:
            have = self._end - self._start
            self._buf[:have] = self._buf[self._start : self._end]
            self._start, self._end = 0, have
        return memoryview(self._buf)[self._end :]

    def filled(self, n: int) -> None:
        if self._frame is not None:
            self._have += n
        else:
            self._end += n

    def wanted(self) -> int:
        """Bytes still missing from the frame being received."""
        if self._frame is not None:
            return len(self._frame) - self._have
        have = self._end - self._start
        if have < HEADER.size:
            return HEADER.size + TAG_SIZE - have
        _, _, n = HEADER.unpack_from(self._buf, self._start)
        return max(HEADER.size + min(int(n), MAX_PAYLOAD) + TAG_SIZE - have, 0)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take `data` (at most what `space()` holds: take the payloads out in between)."""
        room = self.space()
        if len(data) > len(room):
            raise self._broken("more bytes arrived than a frame holds")
        room[: len(data)] = data
        self.filled(len(data))

    def next_payload(self) -> bytearray | None:
        """The next frame's payload, authenticated; an empty bytearray for CLOSE (and ever
        after); None when a whole frame has not arrived yet."""
        if self.closed:
            return bytearray()
        if self._frame is not None:
            return self._open_own()
        at, have = self._start, self._end - self._start
        if have < HEADER.size:
            return None
        kind, seq, n = HEADER.unpack_from(self._buf, at)
        self._check(kind, seq, n)
        size = HEADER.size + n + TAG_SIZE
        if have < size:  # the rest goes straight into the frame's own buffer
            self._frame = bytearray(size)
            self._frame[:have] = self._buf[at : self._end]
            self._have, self._start, self._end = have, 0, 0
            return None
        payload = bytearray(n)
        with memoryview(self._buf) as view:
            self._decrypt(view[at : at + size], payload)
        self._start += size
        if self._start == self._end:
            self._start = self._end = 0
        return self._opened(kind, payload)

    def _open_own(self) -> bytearray | None:
        frame = self._frame
        assert frame is not None
        if self._have < len(frame):
            return None
        with memoryview(frame) as view:
            self._decrypt(view, view[HEADER.size : len(frame) - TAG_SIZE])
        self._frame = None
        kind = frame[0]
        del frame[len(frame) - TAG_SIZE :]
        del frame[: HEADER.size]  # CPython moves the start, not the bytes
        return self._opened(kind, frame)

    def _check(self, kind: int, seq: int, n: int) -> None:
        if seq != self.seq:
            if seq < self.seq:
                raise self._broken(f"frame {seq} replayed (frames up to {self.seq - 1} "
                                   f"were received; expected {self.seq})")
            raise self._broken(f"frame {seq} out of order (expected frame {self.seq}: "
                               "reordered or dropped)")
        if kind not in (DATA, CLOSE):
            raise self._broken(f"frame {seq} has unknown type {kind}")
        if n > MAX_PAYLOAD:
            raise self._broken(f"frame {seq} announces {n} bytes, more than the "
                               f"{MAX_PAYLOAD}-byte frame limit (oversized)")
        if kind == CLOSE and n:
            raise self._broken(f"frame {seq} is a close frame with a payload")

    def _decrypt(self, frame: memoryview, out: bytearray | memoryview) -> None:
        """Authenticate and decrypt `frame` (header, ciphertext, tag) into `out`; `out` may
        be the ciphertext's own place. Nothing of a frame that fails is returned."""
        try:
            self._aead.decrypt_into(_nonce(self.seq), frame[HEADER.size :],
                                    frame[: HEADER.size], out)
        except InvalidTag:
            raise self._broken(f"frame {self.seq} failed authentication (tampered with on "
                               "the way)") from None

    def _opened(self, kind: int, payload: bytearray) -> bytearray:
        self.seq += 1
        if kind == CLOSE:
            self.closed = True
        return payload

    def end_of_input(self) -> None:
        """The connection ended: fine after CLOSE, a truncation otherwise."""
        if self.closed:
            return
        where = f"after frame {self.seq - 1}" if self.seq else "before the first frame"
        have = self._have if self._frame is not None else self._end - self._start
        part = f", {have} bytes into frame {self.seq}" if have else ""
        raise self._broken(f"connection cut {where} without a close frame{part} (truncated)")
