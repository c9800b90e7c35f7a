"""How a record's payload is stored in format 2.x: compressed with zstd and/or encrypted with
AES-256-GCM under a per-stream data key (docs/stream-format.md section 7).

The writer's side is `PayloadSealer`, the reader's `PayloadOpener`; both are built from the
stream header, so a record can only be opened in the stream, at the place, it was sealed for:
the nonce is the record's tag and seq, and the associated data is a SHA-256 of the stream
header followed by the record's framing (tag, flags, seq, offset, length, stored length).
A data key is used for one stream only, so a nonce never repeats under a key.
"""

from __future__ import annotations

__all__ = [
    "ENCRYPTION",
    "KeyProblem",
    "Keyring",
    "PayloadOpener",
    "PayloadSealer",
    "StreamCodec",
    "StreamKey",
    "parse_compression",
]

import hashlib
import os
import struct
import threading
from dataclasses import dataclass, field
from typing import Final

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._layout import FLAG_ZSTD, TAG_SIZE, Buffer

ENCRYPTION: Final = "aes-256-gcm"
KEY_BYTES: Final = 32
ZSTD_LEVELS: Final = range(1, 20)
_KEY_ID_CONTEXT = b"ahvbackup stream key id\0"
_WRAP_CONTEXT = b"ahvbackup stream data key\0"


def _key_id(secret: bytes) -> str:
    # a hash of the key names it in headers and errors without saying anything about it
    return hashlib.sha256(_KEY_ID_CONTEXT + secret).hexdigest()[:16]


@dataclass(frozen=True)
class StreamKey:
    """A tenant's key (256 bits): it wraps each stream's data key. `source` says where it
    came from (a key file's path) for messages; the secret is never in a repr."""

    secret: bytes = field(repr=False)
    source: str = ""
    key_id: str = field(init=False)

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise ValueError(f"a stream key has {KEY_BYTES} bytes")
        object.__setattr__(self, "key_id", _key_id(self.secret))

    def wrap(self, data_key: bytes, stream_id: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + AESGCM(self.secret).encrypt(nonce, data_key, self._context(stream_id))

    def unwrap(self, wrapped: bytes, stream_id: str) -> bytes | None:
        """The data key, or None when `wrapped` was not made by this key for this stream."""
        try:
            return AESGCM(self.secret).decrypt(wrapped[:12], wrapped[12:],
                                               self._context(stream_id))
        except (InvalidTag, ValueError):
            return None

    def _context(self, stream_id: str) -> bytes:
        return _WRAP_CONTEXT + self.key_id.encode() + b"\0" + stream_id.encode()


@dataclass(frozen=True)
class Keyring:
    """The keys a reader may open streams with (the current one and older ones); `hint` says,
    in a missing-key message, where keys are configured."""

    keys: tuple[StreamKey, ...] = ()
    hint: str = ""

    def find(self, key_id: str) -> StreamKey | None:
        return next((k for k in self.keys if k.key_id == key_id), None)

    def missing(self, key_id: str) -> str:
        """Why a stream encrypted with `key_id` cannot be opened, in one phrase."""
        if not self.keys:
            return f"encrypted with key id {key_id} and no key is configured{self._hint()}"
        have = ", ".join(f"{k.key_id} ({k.source})" for k in self.keys)
        return f"encrypted with key id {key_id}, which none of the keys has: {have}{self._hint()}"

    def _hint(self) -> str:
        return f" ({self.hint})" if self.hint else ""


class KeyProblem(Exception):
    """A payload cannot be opened: no key, a wrong key, or sealed data that does not
    authenticate. The decoder turns it into a StreamFormatError naming the place."""


def parse_compression(text: str) -> tuple[str, int]:
    """`none`, `zstd` or `zstd:LEVEL` (1-19) as (algorithm, level); ValueError says why."""
    name, _, level = text.strip().lower().partition(":")
    if name == "none" and not level:
        return "none", 0
    if name == "zstd":
        if not level:
            return "zstd", StreamCodec.ZSTD_DEFAULT
        if level.isdigit() and int(level) in ZSTD_LEVELS:
            return "zstd", int(level)
        raise ValueError(f"zstd level {level!r} is not 1 to 19")
    raise ValueError(f"{text!r} is not none, zstd or zstd:LEVEL")


@dataclass(frozen=True)
class StreamCodec:
    """How a writer stores payloads: `compression` none or zstd (at `level`), and encrypted
    when `key` is set. The default stores them as they are (format 1.0)."""

    ZSTD_DEFAULT = 1  # docs/stream-format.md section 7.3: the measurement behind it

    compression: str = "none"
    level: int = 0
    key: StreamKey | None = None

    @property
    def transforms(self) -> bool:
        return self.compression != "none" or self.key is not None

    def describe(self) -> str:
        """For logs: what is done to payloads (never key material)."""
        comp = f"zstd:{self.level}" if self.compression == "zstd" else "none"
        enc = f"{ENCRYPTION} key id {self.key.key_id}" if self.key else "none"
        return f"compression {comp}, encryption {enc}"


def _nonce(tag: bytes, seq: int) -> bytes:
    return tag + struct.pack("<Q", seq)


class PayloadSealer:
    """One stream's writer side: compress (kept only when it shrinks), then encrypt.
    `compress` may run in several threads at once (one zstd context each); `seal` runs in
    record order."""

    def __init__(self, codec: StreamCodec, data_key: bytes | None, header_auth: bytes) -> None:
        self._level = codec.level if codec.compression == "zstd" else 0
        self._contexts = threading.local()
        self._aead = AESGCM(data_key) if data_key is not None else None
        self._auth = header_auth
        self.overhead = TAG_SIZE if data_key is not None else 0

    def compress(self, view: memoryview) -> tuple[int, Buffer]:
        """(flags, body): the zstd frame when it is smaller, else the bytes as they are."""
        if self._level:
            zstd = getattr(self._contexts, "zstd", None)
            if zstd is None:
                zstd = self._contexts.zstd = zstandard.ZstdCompressor(level=self._level)
            packed = zstd.compress(view)
            if len(packed) < len(view):
                return FLAG_ZSTD, packed
        return 0, view

    def seal(self, tag: bytes, seq: int, framing: bytes, body: Buffer) -> Buffer:
        if self._aead is None:
            return body
        return self._aead.encrypt(_nonce(tag, seq), body, self._auth + framing)


class PayloadOpener:
    """One stream's reader side. The data key is unwrapped on first use, so a stream whose
    key is not configured still has its header and framing read (and checked)."""

    def __init__(self, *, compression: str, encrypted: bool, key_id: str, wrapped: bytes,
                 stream_id: str, header_auth: bytes, keys: Keyring | None) -> None:
        self.compression = compression
        self.encrypted = encrypted
        self.key_id = key_id
        self._wrapped = wrapped
        self._stream_id = stream_id
        self._auth = header_auth
        self._keys = keys or Keyring()
        self._aead: AESGCM | None = None
        self.key_problem = ""  # why the data key cannot be had, once that was tried
        self._zstd = zstandard.ZstdDecompressor()

    @property
    def can_open(self) -> bool:
        """False when the stream is encrypted and none of the keys opens its data key."""
        if not self.encrypted or self._aead is not None:
            return True
        if self.key_problem:
            return False
        try:
            self._cipher()
        except KeyProblem:
            return False
        return True

    def open(self, seq: int, flags: int, length: int, framing: bytes,
             stored: memoryview) -> memoryview:
        """The record's `length` bytes from its stored payload; KeyProblem or ValueError say
        what is wrong."""
        body: Buffer = stored
        if self.encrypted:
            try:
                body = self._cipher().decrypt(_nonce(b"DATA", seq), stored, self._auth + framing)
            except InvalidTag:
                raise KeyProblem(self._not_authentic()) from None
        if flags & FLAG_ZSTD:
            try:
                body = self._zstd.decompress(body, max_output_size=length)
            except zstandard.ZstdError as err:
                raise ValueError(f"zstd payload does not decompress ({err})") from None
        if len(body) != length:
            raise ValueError(f"payload holds {len(body)} bytes, the record says {length}")
        return memoryview(body)

    def check_trailer(self, seq: int, framing: bytes, body: memoryview, tag: memoryview) -> None:
        try:
            self._cipher().decrypt(_nonce(b"TRLR", seq), bytes(tag), self._auth + framing
                                   + bytes(body))
        except InvalidTag:
            raise KeyProblem(self._not_authentic()) from None

    def _cipher(self) -> AESGCM:
        if self._aead is None:
            if not self.key_problem:
                key = self._keys.find(self.key_id)
                data_key = key.unwrap(self._wrapped, self._stream_id) if key else None
                if data_key is not None:
                    self._aead = AESGCM(data_key)
                    return self._aead
                self.key_problem = self._keys.missing(self.key_id) if key is None else (
                    f"the data key wrapped for key id {self.key_id} does not open with "
                    f"{key.source or 'that key'} (header damaged)")
            raise KeyProblem(self.key_problem)
        return self._aead

    def _not_authentic(self) -> str:
        return (f"authentication failed (key id {self.key_id}): the record was changed, "
                "moved, or comes from another stream")
