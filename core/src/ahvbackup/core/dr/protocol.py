"""The DR push protocol, sans-I/O: messages, their bytes, and the rules of a push session.

A push session runs over any authenticated, encrypted `trio.abc.Stream` (the DR transport's);
nothing here does I/O (model: `core/stream/encoder.py`). The source sends `Hello` (its view of
the point), the receiver answers `Welcome` (its newest complete point and, per disk, the resume
token of an interrupted push of this same point) or `Refused`. The source then sends each disk
in turn, as `Data` and `Zero` ranges in ascending order that never cross a `chunk` boundary,
closed by `DiskEnd` with the disk's chain digest, and finally `PointEnd`. The receiver answers
`Ack` for every durable offset (written and fsynced) and `Committed` once the point is listed.

Frame: type (u8), payload length (u32, big endian), payload. `Hello` and `Welcome` carry JSON;
the others fixed binary fields. docs/dr.md has the tables.

Every check a peer's message can fail raises `ProtocolError` naming the message and what was
wrong, before anything is applied.
"""

from __future__ import annotations

__all__ = [
    "CHAIN_START",
    "FRAME",
    "MAX_CHUNK",
    "MAX_DISKS",
    "PROTOCOL",
    "Ack",
    "Committed",
    "Data",
    "DigestMismatch",
    "DiskEnd",
    "FrameDecoder",
    "Hello",
    "HelloDisk",
    "Message",
    "PointEnd",
    "ProtocolError",
    "PushRules",
    "Refused",
    "ResumeToken",
    "Welcome",
    "WelcomeRules",
    "chain_next",
    "encode",
]

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from ..errors import TransportError

PROTOCOL = "ahvbackup-dr/1"
#: frame header: message type, payload length
FRAME = struct.Struct(">BI")
#: largest data range (and chunk) a session may use
MAX_CHUNK = 16 << 20
MIN_CHUNK = 4096
MAX_DISKS = 64
MAX_JSON = 64 << 10
MAX_REASON = 2048
MAX_TEXT = 128
#: the chain digest of a disk before its first range
CHAIN_START = bytes(32)

_DATA_HEAD = struct.Struct(">HQ")
_ZERO = struct.Struct(">HQQ")
_DISK_END = struct.Struct(">H32s")
_POINT = struct.Struct(">Q")
_ACK = struct.Struct(">HQ")
_CHAIN = struct.Struct(">cQQ")

T_HELLO, T_WELCOME, T_DATA, T_ZERO, T_DISK_END, T_POINT_END, T_ACK, T_COMMITTED, T_REFUSED = (
    range(1, 10))


class ProtocolError(TransportError):
    """A peer's message is malformed, oversized or out of order; nothing of it is applied."""


class DigestMismatch(ProtocolError):
    """A disk's ranges do not add up to the digest its sender gave."""


@dataclass(frozen=True)
class HelloDisk:
    """One disk of the point: `full` when its ranges build it from zeros (a seed, a new or a
    resized disk), else they apply on the same disk of the base point."""

    uuid: str
    label: str
    size: int
    full: bool


@dataclass(frozen=True)
class Hello:
    """The source's view of the point it pushes. `point` numbers the VM's points (1, 2, ...);
    `base` is the point the non-full disks are deltas against (0: none, a seed), and
    `base_snapshot_id` its snapshot (so a receiver holding another past refuses the delta)."""

    vm_uuid: str
    vm_name: str
    point: int
    snapshot_id: str
    base: int
    base_snapshot_id: str
    chunk: int
    disks: tuple[HelloDisk, ...]

    @property
    def identity(self) -> str:
        return f"VM {self.vm_name} point {self.point}"


@dataclass(frozen=True)
class ResumeToken:
    """Where a disk's push stands on the receiver: every range below `offset` is durable,
    `chain` is the chain digest up to there, `done` the disk was ended and verified."""

    offset: int = 0
    chain: bytes = CHAIN_START
    done: bool = False


@dataclass(frozen=True)
class Welcome:
    """The receiver's answer: its newest complete point (0: none) and one token per disk."""

    newest: int
    resume: tuple[ResumeToken, ...]


@dataclass(frozen=True)
class Data:
    disk: int
    offset: int
    payload: bytes | memoryview

    @property
    def length(self) -> int:
        return len(self.payload)


@dataclass(frozen=True)
class Zero:
    disk: int
    offset: int
    length: int


@dataclass(frozen=True)
class DiskEnd:
    disk: int
    digest: bytes


@dataclass(frozen=True)
class PointEnd:
    point: int


@dataclass(frozen=True)
class Ack:
    """Every range of `disk` below `offset` is durable on the receiver."""

    disk: int
    offset: int


@dataclass(frozen=True)
class Committed:
    """The point is complete and listed on the receiver."""

    point: int


@dataclass(frozen=True)
class Refused:
    """The peer will not go on; `reason` is one line for the operator."""

    reason: str


Message = Hello | Welcome | Data | Zero | DiskEnd | PointEnd | Ack | Committed | Refused

_NAMES = {T_HELLO: "hello", T_WELCOME: "welcome", T_DATA: "data", T_ZERO: "zero",
          T_DISK_END: "disk end", T_POINT_END: "point end", T_ACK: "ack",
          T_COMMITTED: "committed", T_REFUSED: "refused"}
#: the largest payload of each type
_LIMITS = {T_HELLO: MAX_JSON, T_WELCOME: MAX_JSON, T_DATA: _DATA_HEAD.size + MAX_CHUNK,
           T_ZERO: _ZERO.size, T_DISK_END: _DISK_END.size, T_POINT_END: _POINT.size,
           T_ACK: _ACK.size, T_COMMITTED: _POINT.size, T_REFUSED: MAX_REASON}
_FIXED = {T_ZERO, T_DISK_END, T_POINT_END, T_ACK, T_COMMITTED}


def chain_next(chain: bytes, *, offset: int, length: int, payload: bytes | memoryview | None
               ) -> bytes:
    """The chain digest after one range (`payload` None: a zero range). Its state is 32
    bytes, so the receiver keeps it with the durable offset and a resumed push goes on from it."""
    h = hashlib.sha256(chain)
    kind = b"Z" if payload is None else b"D"
    h.update(_CHAIN.pack(kind, offset, length))
    if payload is not None:
        h.update(hashlib.sha256(payload).digest())
    return h.digest()


# encoding -------------------------------------------------------------------------------------


def _frame(kind: int, payload: bytes) -> bytes:
    return FRAME.pack(kind, len(payload)) + payload


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def encode(msg: Message) -> bytes:
    """The frame of `msg` (one copy of a data payload; the WAN is the bottleneck)."""
    if isinstance(msg, Data):
        return (FRAME.pack(T_DATA, _DATA_HEAD.size + len(msg.payload))
                + _DATA_HEAD.pack(msg.disk, msg.offset) + msg.payload)
    if isinstance(msg, Zero):
        return _frame(T_ZERO, _ZERO.pack(msg.disk, msg.offset, msg.length))
    if isinstance(msg, Ack):
        return _frame(T_ACK, _ACK.pack(msg.disk, msg.offset))
    if isinstance(msg, DiskEnd):
        return _frame(T_DISK_END, _DISK_END.pack(msg.disk, msg.digest))
    if isinstance(msg, PointEnd):
        return _frame(T_POINT_END, _POINT.pack(msg.point))
    if isinstance(msg, Committed):
        return _frame(T_COMMITTED, _POINT.pack(msg.point))
    if isinstance(msg, Refused):
        return _frame(T_REFUSED, msg.reason.encode()[:MAX_REASON])
    if isinstance(msg, Hello):
        return _frame(T_HELLO, _json({
            "protocol": PROTOCOL, "vm_uuid": msg.vm_uuid, "vm_name": msg.vm_name,
            "point": msg.point, "snapshot_id": msg.snapshot_id, "base": msg.base,
            "base_snapshot_id": msg.base_snapshot_id, "chunk": msg.chunk,
            "disks": [{"uuid": d.uuid, "label": d.label, "size": d.size, "full": d.full}
                      for d in msg.disks]}))
    return _frame(T_WELCOME, _json({
        "protocol": PROTOCOL, "newest": msg.newest,
        "resume": [{"offset": t.offset, "chain": t.chain.hex(), "done": t.done}
                   for t in msg.resume]}))


# decoding -------------------------------------------------------------------------------------


class FrameDecoder:
    """Bytes in (`feed`), messages out (`next`), every frame checked on its own: known type,
    payload within the type's limit, fields well-formed. Order is `PushRules`' business."""

    def __init__(self, *, peer: str) -> None:
        self.peer = peer
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        """Bytes received but not yet a whole message (non-zero at EOF: truncated)."""
        return len(self._buf)

    def next(self) -> Message | None:
        """The next whole message, or None until more bytes are fed."""
        if len(self._buf) < FRAME.size:
            return None
        kind, length = FRAME.unpack_from(self._buf)
        name = _NAMES.get(kind)
        if name is None:
            raise ProtocolError(f"{self.peer}: unknown message type {kind}")
        if length > _LIMITS[kind]:
            raise ProtocolError(f"{self.peer}: {name} message of {length} bytes is oversized "
                                f"(at most {_LIMITS[kind]})")
        if kind in _FIXED and length != _LIMITS[kind]:
            raise ProtocolError(f"{self.peer}: {name} message has {length} bytes "
                                f"(want {_LIMITS[kind]})")
        if len(self._buf) < FRAME.size + length:
            return None
        payload = bytes(self._buf[FRAME.size:FRAME.size + length])
        del self._buf[:FRAME.size + length]
        return self._decode(kind, name, payload)

    def _decode(self, kind: int, name: str, payload: bytes) -> Message:
        what = f"{self.peer}: {name} message"
        if kind == T_DATA:
            if len(payload) <= _DATA_HEAD.size:
                raise ProtocolError(f"{what} carries no data")
            disk, offset = _DATA_HEAD.unpack_from(payload)
            return Data(disk, offset, memoryview(payload)[_DATA_HEAD.size:])
        if kind == T_ZERO:
            disk, offset, length = _ZERO.unpack(payload)
            return Zero(disk, offset, length)
        if kind == T_DISK_END:
            disk, digest = _DISK_END.unpack(payload)
            return DiskEnd(disk, digest)
        if kind == T_POINT_END:
            return PointEnd(*_POINT.unpack(payload))
        if kind == T_ACK:
            return Ack(*_ACK.unpack(payload))
        if kind == T_COMMITTED:
            return Committed(*_POINT.unpack(payload))
        if kind == T_REFUSED:
            return Refused(payload.decode("utf-8", "replace").splitlines()[0]
                           if payload.strip() else "(no reason given)")
        obj = _load_json(what, payload)
        if kind == T_HELLO:
            return _hello(what, obj)
        return _welcome(what, obj)


def _load_json(what: str, payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"{what} is not JSON ({err})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    if obj.get("protocol") != PROTOCOL:
        raise ProtocolError(f"{what} speaks protocol {obj.get('protocol')!r} "
                            f"(this side speaks {PROTOCOL!r})")
    return obj


def _field(what: str, obj: dict[str, Any], key: str, typ: type, *, minimum: int = 0,
           maximum: int = 1 << 63) -> Any:
    value = obj.get(key)
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int) or not (
                minimum <= value <= maximum):
            raise ProtocolError(f"{what}: {key} must be an integer from {minimum} to "
                                f"{maximum} (got {value!r})")
    elif typ is str:
        if not isinstance(value, str) or not (minimum <= len(value) <= MAX_TEXT):
            raise ProtocolError(f"{what}: {key} must be text of {minimum} to {MAX_TEXT} "
                                f"characters (got {value!r:.80})")
    elif not isinstance(value, typ):
        raise ProtocolError(f"{what}: {key} must be {typ.__name__} (got {value!r:.80})")
    return value


def _hello(what: str, obj: dict[str, Any]) -> Hello:
    disks_raw = obj.get("disks")
    if not isinstance(disks_raw, list) or not 1 <= len(disks_raw) <= MAX_DISKS:
        raise ProtocolError(f"{what}: disks must be a list of 1 to {MAX_DISKS} disks")
    disks = []
    for i, d in enumerate(disks_raw):
        if not isinstance(d, dict):
            raise ProtocolError(f"{what}: disk {i} is not an object")
        w = f"{what}: disk {i}"
        disks.append(HelloDisk(uuid=_field(w, d, "uuid", str, minimum=1),
                               label=_field(w, d, "label", str, minimum=1),
                               size=_field(w, d, "size", int, minimum=1),
                               full=_field(w, d, "full", bool)))
    if len({d.uuid for d in disks}) != len(disks):
        raise ProtocolError(f"{what}: a disk uuid is listed twice")
    hello = Hello(
        vm_uuid=_field(what, obj, "vm_uuid", str, minimum=1),
        vm_name=_field(what, obj, "vm_name", str, minimum=1),
        point=_field(what, obj, "point", int, minimum=1),
        snapshot_id=_field(what, obj, "snapshot_id", str, minimum=1),
        base=_field(what, obj, "base", int),
        base_snapshot_id=_field(what, obj, "base_snapshot_id", str),
        chunk=_field(what, obj, "chunk", int, minimum=MIN_CHUNK, maximum=MAX_CHUNK),
        disks=tuple(disks))
    if "/" in hello.vm_uuid or hello.vm_uuid.startswith("."):
        raise ProtocolError(f"{what}: vm_uuid {hello.vm_uuid!r} is not a plain name")
    if any("/" in d.uuid or d.uuid.startswith(".") for d in disks):
        raise ProtocolError(f"{what}: a disk uuid is not a plain name")
    if hello.base >= hello.point:
        raise ProtocolError(f"{what}: base point {hello.base} is not older than point "
                            f"{hello.point}")
    if hello.base == 0 and not all(d.full for d in disks):
        raise ProtocolError(f"{what}: a seed (base 0) must send every disk in full")
    if (hello.base == 0) != (hello.base_snapshot_id == ""):
        raise ProtocolError(f"{what}: base_snapshot_id must be given exactly when base is "
                            f"(base {hello.base}, base_snapshot_id {hello.base_snapshot_id!r})")
    return hello


def _welcome(what: str, obj: dict[str, Any]) -> Welcome:
    raw = obj.get("resume")
    if not isinstance(raw, list) or len(raw) > MAX_DISKS:
        raise ProtocolError(f"{what}: resume must be a list of at most {MAX_DISKS} tokens")
    tokens = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise ProtocolError(f"{what}: resume token {i} is not an object")
        w = f"{what}: resume token {i}"
        chain = _field(w, t, "chain", str)
        try:
            digest = bytes.fromhex(chain)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ProtocolError(f"{w}: chain is not 64 hex digits")
        tokens.append(ResumeToken(offset=_field(w, t, "offset", int), chain=digest,
                                  done=_field(w, t, "done", bool)))
    return Welcome(newest=_field(what, obj, "newest", int), resume=tuple(tokens))


# session rules --------------------------------------------------------------------------------


class PushRules:
    """What the receiver accepts after `Hello` and its `Welcome`: the disks in order (those
    already done skipped), ranges ascending from each resume offset, inside the disk, never
    across a chunk boundary, each disk closed by a `DiskEnd` whose digest matches, then one
    `PointEnd`. `check` raises before the caller applies anything."""

    def __init__(self, hello: Hello, welcome: Welcome) -> None:
        self.hello = hello
        self.chains = [t.chain for t in welcome.resume]
        self.ends = [t.offset for t in welcome.resume]
        self.done = [t.done for t in welcome.resume]
        self.finished = False
        self._current = self._next_disk(0)

    def _next_disk(self, start: int) -> int:
        i = start
        while i < len(self.done) and self.done[i]:
            i += 1
        return i

    def _fail(self, problem: str) -> ProtocolError:
        return ProtocolError(f"{self.hello.identity}: {problem}")

    def check(self, msg: Message) -> None:
        """Raise unless `msg` may come now; on success the rules advance past it."""
        h = self.hello
        if self.finished:
            raise self._fail(f"{type(msg).__name__} message after the point ended")
        if isinstance(msg, Data | Zero):
            self._range(msg)
            self.chains[msg.disk] = chain_next(
                self.chains[msg.disk], offset=msg.offset, length=msg.length,
                payload=msg.payload if isinstance(msg, Data) else None)
            self.ends[msg.disk] = msg.offset + msg.length
        elif isinstance(msg, DiskEnd):
            self._disk(msg.disk, "disk end")
            if msg.digest != self.chains[msg.disk]:
                raise DigestMismatch(f"{h.identity}: disk {h.disks[msg.disk].label}: digest "
                                     "mismatch (the ranges received are not the ranges sent)")
            self.done[msg.disk] = True
            self._current = self._next_disk(msg.disk + 1)
        elif isinstance(msg, PointEnd):
            if msg.point != h.point:
                raise self._fail(f"point end names point {msg.point}")
            if self._current < len(h.disks):
                raise self._fail(f"point end before disk {h.disks[self._current].label} ended")
            self.finished = True
        else:
            raise self._fail(f"unexpected {type(msg).__name__} message from the source")

    def _disk(self, disk: int, what: str) -> None:
        h = self.hello
        if disk >= len(h.disks):
            raise self._fail(f"{what} for disk {disk}, but the point has {len(h.disks)} disks")
        if disk != self._current:
            now = (h.disks[self._current].label if self._current < len(h.disks)
                   else "none (every disk ended)")
            raise self._fail(f"{what} for disk {h.disks[disk].label} out of order (the disk "
                             f"being sent is {now})")

    def _range(self, msg: Data | Zero) -> None:
        kind = "data" if isinstance(msg, Data) else "zero"
        self._disk(msg.disk, f"{kind} range")
        disk = self.hello.disks[msg.disk]
        where = f"disk {disk.label}: {kind} range at offset {msg.offset} (+{msg.length})"
        if msg.length <= 0:
            raise self._fail(f"{where} is empty")
        if msg.offset < self.ends[msg.disk]:
            raise self._fail(f"{where} is out of order or repeated (next range starts at >= "
                             f"{self.ends[msg.disk]})")
        if msg.offset + msg.length > disk.size:
            raise self._fail(f"{where} ends past the disk's size {disk.size}")
        chunk = self.hello.chunk
        if msg.offset // chunk != (msg.offset + msg.length - 1) // chunk:
            raise self._fail(f"{where} crosses a {chunk}-byte chunk boundary")


class WelcomeRules:
    """What the source accepts from the receiver: `Welcome` (or `Refused`) first, with one
    token per disk inside it; then `Ack`s that never go back and stay inside the disk, and
    `Committed` for this point."""

    def __init__(self, hello: Hello) -> None:
        self.hello = hello
        self.welcome: Welcome | None = None
        self.acked: list[int] = []

    def _fail(self, problem: str) -> ProtocolError:
        return ProtocolError(f"{self.hello.identity}: receiver: {problem}")

    def check(self, msg: Message) -> None:
        h = self.hello
        if isinstance(msg, Refused):
            return
        if self.welcome is None:
            if not isinstance(msg, Welcome):
                raise self._fail(f"{type(msg).__name__} message before its welcome")
            if len(msg.resume) != len(h.disks):
                raise self._fail(f"welcome has {len(msg.resume)} resume tokens for "
                                 f"{len(h.disks)} disks")
            for d, t in zip(h.disks, msg.resume, strict=True):
                if t.offset > d.size:
                    raise self._fail(f"disk {d.label}: resume offset {t.offset} is past the "
                                     f"disk's size {d.size}")
            self.welcome = msg
            self.acked = [t.offset for t in msg.resume]
        elif isinstance(msg, Ack):
            if msg.disk >= len(h.disks):
                raise self._fail(f"ack for disk {msg.disk} of {len(h.disks)}")
            if not self.acked[msg.disk] <= msg.offset <= h.disks[msg.disk].size:
                raise self._fail(f"disk {h.disks[msg.disk].label}: ack of offset {msg.offset} "
                                 f"goes back or past the disk (acked {self.acked[msg.disk]})")
            self.acked[msg.disk] = msg.offset
        elif isinstance(msg, Committed):
            if msg.point != h.point:
                raise self._fail(f"committed names point {msg.point}")
        else:
            raise self._fail(f"unexpected {type(msg).__name__} message")
