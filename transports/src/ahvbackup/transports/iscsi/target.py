"""A userspace iSCSI target on trio: serves LUNs backed by any object with a size and blocking
`read_into` / `write`, to real initiators (libiscsi, qemu, ours).

    target = IscsiTarget(exports=lambda: {iqn: Export(iqn=iqn, luns=[backend])})
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(target.serve, "127.0.0.1", 3260)

`exports` is asked afresh at every login and discovery, so the owner (the Prism simulator) changes
what is served by changing its own state: a volume group created, an initiator attached. Each
`Export` says who may log in (`allowed`, the ACL) and whether CHAP is required. The command set
is the one our initiator uses plus what libiscsi and qemu ask for when they open a disk: INQUIRY
(standard, VPD 0x00/0x80/0x83), REPORT LUNS, READ CAPACITY(10/16), TEST UNIT READY, MODE
SENSE(6/10), READ/WRITE(10/16) with immediate data, unsolicited Data-Out and R2T, SYNCHRONIZE
CACHE. ErrorRecoveryLevel 0, one connection per session, several sessions at once.
"""

from __future__ import annotations

__all__ = ["Export", "IscsiTarget", "LunBackend", "MemoryLun"]

import hmac
import logging
import secrets
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from ._wire import ConnectionClosed, close_socket, frame, recv_exact, send_all
from .errors import IscsiDigestError, IscsiProtocolError
from .login import CHAP_MD5, ChapCredentials, _chap_binary, chap_response
from .pdu import (
    BHS_LEN,
    NO_TAG,
    Op,
    crc32c,
    decode_lun,
    decode_text,
    encode_lun,
    encode_text,
    pad_len,
)
from .scsi import SenseKey, Status

log = logging.getLogger("ahvbackup.iscsi.target")

_MASK = 0xFFFFFFFF
_WINDOW = 64
_OUR_MAX_RECV = 262144
_OUR_MAX_BURST = 16 << 20
_MAX_IO = 32 << 20


class LunBackend(Protocol):
    """What a LUN reads from and writes to. Calls are blocking; the target runs them in worker
    threads, so an implementation must be thread-safe."""

    @property
    def size(self) -> int: ...

    def read_into(self, offset: int, buf: memoryview) -> None: ...

    def write(self, offset: int, data: memoryview) -> None: ...


class MemoryLun:
    """A LUN in a bytearray (tests, small demos)."""

    def __init__(self, data: bytes | bytearray | int) -> None:
        self.data = bytearray(data)

    @property
    def size(self) -> int:
        return len(self.data)

    def read_into(self, offset: int, buf: memoryview) -> None:
        buf[:] = memoryview(self.data)[offset : offset + len(buf)]

    def write(self, offset: int, data: memoryview) -> None:
        self.data[offset : offset + len(data)] = data


@dataclass(frozen=True)
class Export:
    """One target: its IQN, LUNs (LUN 0, 1, ...), and who may log in.

    `allowed(initiator_iqn)` is the ACL (None: anyone). `chap` is the account an initiator must
    prove (one-way CHAP), `mutual` the target's own account it answers with when the initiator
    challenges it back.
    """

    iqn: str
    luns: Sequence[LunBackend]
    read_only: bool = True
    allowed: Callable[[str], bool] | None = field(default=None, repr=False)
    chap: ChapCredentials | None = None
    mutual: ChapCredentials | None = None
    block_size: int = 512
    serial: str = ""

    def permits(self, initiator_iqn: str) -> bool:
        return self.allowed is None or self.allowed(initiator_iqn)


class _Refused(Exception):
    def __init__(self, status_class: int, status_detail: int, why: str) -> None:
        super().__init__(why)
        self.status = (status_class, status_detail)


class _Check(Exception):
    """A SCSI command ends in CHECK CONDITION with this sense."""

    def __init__(self, key: int, asc: int, ascq: int = 0) -> None:
        super().__init__(f"sense {key:x}/{asc:02x}/{ascq:02x}")
        self.sense = (key, asc, ascq)


def _sense_data(key: int, asc: int, ascq: int) -> bytes:
    sense = bytearray(18)
    sense[0] = 0x70
    sense[2] = key
    sense[7] = 10
    sense[12] = asc
    sense[13] = ascq
    return len(sense).to_bytes(2, "big") + bytes(sense)


def _padded(text: str, n: int) -> bytes:
    return text.encode("ascii", "replace")[:n].ljust(n)


@dataclass
class _Params:
    header_digest: bool = False
    data_digest: bool = False
    max_xmit: int = 8192  # the initiator's MaxRecvDataSegmentLength
    max_burst: int = 262144
    first_burst: int = 65536
    immediate_data: bool = True
    initial_r2t: bool = True


@dataclass(eq=False)
class _Write:
    buf: bytearray
    received: int = 0
    expected_end: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    ttt: int = NO_TAG
    data_sn: int = 0


class IscsiTarget:
    """Serves the exports `exports()` returns (a mapping IQN -> Export) on one portal or more.

    `name` labels log lines. Statistics: `logins`, `refused_logins`, `sessions` (open now).
    """

    def __init__(self, *, exports: Callable[[], Mapping[str, Export]] | Mapping[str, Export],
                 name: str = "iscsi-target") -> None:
        self._exports = exports if callable(exports) else (lambda: exports)
        self.name = name
        self.logins = 0
        self.refused_logins = 0
        self._sessions: dict[int, tuple[str, str, socket.socket]] = {}
        self._next_tsih = secrets.randbelow(0x7FFF) + 1

    @property
    def sessions(self) -> list[tuple[str, str]]:
        """(target IQN or "discovery", initiator IQN) of every session logged in now."""
        return [(t, i) for t, i, _ in self._sessions.values()]

    def exports(self) -> Mapping[str, Export]:
        return self._exports()

    def drop_sessions(self, target_iqn: str, initiator_iqn: str | None = None) -> int:
        """Close the connections of `target_iqn` (of one initiator if given): what a real
        cluster does when a volume group is detached or deleted. Returns how many."""
        n = 0
        for key, (target, initiator, sock) in list(self._sessions.items()):
            if target == target_iqn and initiator_iqn in (None, initiator):
                close_socket(sock)
                self._sessions.pop(key, None)
                n += 1
        return n

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Listen on host:port (0 picks a free port) until cancelled; `started` gets the
        bound (host, port)."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()
        log.debug("%s: listening on %s:%d", self.name, bound[0], bound[1])
        await trio.serve_listeners(self._handle, listeners,
                                   task_status=_Adapter(task_status, (bound[0], bound[1])))

    async def _handle(self, stream: trio.SocketStream) -> None:
        sock = socket.socket(fileno=stream.socket.detach())
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection(self, sock)
        try:
            await conn.run()
        except* (ConnectionClosed, IscsiProtocolError, OSError, trio.BrokenResourceError) as err:
            log.debug("%s: connection from %s ended: %s", self.name, conn.peer,
                      err.exceptions[0])
        except* Exception as err:  # a bug or a misbehaving backend ends this session only
            log.error("%s: session from %s failed: %r", self.name, conn.peer,
                      err.exceptions[0], exc_info=err.exceptions[0])
        finally:
            self._sessions.pop(id(conn), None)
            close_socket(sock)

    def _new_tsih(self) -> int:
        self._next_tsih = self._next_tsih % 0xFFFE + 1
        return self._next_tsih


class _Adapter:
    """Hands `serve_listeners`' started() our (host, port) instead of its listener list."""

    def __init__(self, status: trio.TaskStatus[tuple[str, int]], value: tuple[str, int]) -> None:
        self._status = status
        self._value = value

    def started(self, _value: object = None) -> None:
        self._status.started(self._value)


class _Connection:
    """One TCP connection: login, then full feature phase until logout or loss."""

    def __init__(self, target: IscsiTarget, sock: socket.socket) -> None:
        self.target = target
        self.sock = sock
        try:
            peer = sock.getpeername()
            self.peer = f"{peer[0]}:{peer[1]}"
        except OSError:
            self.peer = "?"
        self.p = _Params()
        self.stat_sn = 0
        self.exp_cmd_sn = 0
        self.export: Export | None = None
        self.discovery = False
        self.initiator = ""
        self.send_lock = trio.StrictFIFOLock()
        self.writes: dict[int, _Write] = {}
        self.closing = False
        self._state = "security"
        self._chap_ident = 0
        self._chap_challenge = b""

    # -- sending --------------------------------------------------------------------------------

    def _sn_fields(self, hdr: bytearray, *, status: bool) -> None:
        if status:
            struct.pack_into(">I", hdr, 24, self.stat_sn)
            self.stat_sn = (self.stat_sn + 1) & _MASK
        else:
            struct.pack_into(">I", hdr, 24, self.stat_sn)
        struct.pack_into(">II", hdr, 28, self.exp_cmd_sn,
                         (self.exp_cmd_sn + _WINDOW - 1) & _MASK)

    async def _send(self, hdr: bytearray, data: bytes | bytearray | memoryview | None = None, *,
                    status: bool = True) -> None:
        async with self.send_lock:
            self._sn_fields(hdr, status=status)
            await send_all(self.sock, frame(hdr, data, header_digest=self.p.header_digest,
                                            data_digest=self.p.data_digest))

    @staticmethod
    def _hdr(op: int, flags: int, dsl: int = 0, *, itt: int = NO_TAG) -> bytearray:
        h = bytearray(BHS_LEN)
        h[0] = op
        h[1] = flags
        h[5:8] = dsl.to_bytes(3, "big")
        struct.pack_into(">II", h, 16, itt, NO_TAG)
        return h

    # -- receiving ------------------------------------------------------------------------------

    async def _recv_pdu(self, *, digests: bool) -> tuple[bytearray, bytearray]:
        hd = digests and self.p.header_digest
        dd = digests and self.p.data_digest
        hbuf = bytearray(BHS_LEN)
        await recv_exact(self.sock, memoryview(hbuf))
        ahs = hbuf[4] * 4
        ahs_buf = bytearray(ahs)
        if ahs:
            await recv_exact(self.sock, memoryview(ahs_buf))
        if hd:
            d = bytearray(4)
            await recv_exact(self.sock, memoryview(d))
            if crc32c(hbuf + ahs_buf) != int.from_bytes(d, "little"):
                raise IscsiDigestError(f"iSCSI target: header digest mismatch from {self.peer}")
        dsl = int.from_bytes(hbuf[5:8], "big")
        data = bytearray()
        if dsl:
            if dsl > max(_OUR_MAX_RECV, 65536) + 4096:
                raise IscsiProtocolError(f"iSCSI target: {dsl}-byte data segment from "
                                         f"{self.peer}")
            total = dsl + pad_len(dsl) + (4 if dd else 0)
            data = bytearray(total)
            await recv_exact(self.sock, memoryview(data))
            if dd:
                body = dsl + pad_len(dsl)
                if crc32c(memoryview(data)[:body]) != int.from_bytes(data[body:], "little"):
                    raise IscsiDigestError(f"iSCSI target: data digest mismatch from "
                                           f"{self.peer}")
            del data[dsl:]
        return hbuf, data

    async def run(self) -> None:
        if not await self._login():
            return
        await self._full_feature()

    # -- login ----------------------------------------------------------------------------------

    async def _login(self) -> bool:
        pending: dict[str, str] = {}
        first = True
        while True:
            hbuf, data = await self._recv_pdu(digests=False)
            op = hbuf[0] & 0x3F
            if op != Op.LOGIN:
                raise IscsiProtocolError(f"iSCSI target: {self.peer} sent opcode 0x{op:02x} "
                                         "before logging in")
            flags = hbuf[1]
            transit, cont = bool(flags & 0x80), bool(flags & 0x40)
            csg, nsg = (flags >> 2) & 3, flags & 3
            isid = bytes(hbuf[8:14])
            itt = struct.unpack_from(">I", hbuf, 16)[0]
            cmd_sn, exp_stat_sn = struct.unpack_from(">II", hbuf, 24)
            if first:
                self.stat_sn = exp_stat_sn
                first = False
            self.exp_cmd_sn = cmd_sn
            try:
                pending.update(decode_text(data))
            except ValueError:
                await self._send_login(itt, isid, [], csg=csg, status=(0x02, 0x00))
                return False
            if cont:
                await self._send_login(itt, isid, [], csg=csg)
                continue
            got, pending = pending, {}
            try:
                out, ready = self._negotiate(csg, got)
            except _Refused as refused:
                self.target.refused_logins += 1
                log.info("%s: login from %s (%s) to %s refused: %s", self.target.name, self.peer,
                         self.initiator or "?", self.export.iqn if self.export else "discovery",
                         refused)
                await self._send_login(itt, isid, [], csg=csg, status=refused.status)
                return False
            if not (transit and ready):
                await self._send_login(itt, isid, out, csg=csg)
            elif nsg != 3:
                await self._send_login(itt, isid, out, csg=csg, nsg=nsg)
            else:
                await self._send_login(itt, isid, out, csg=csg, nsg=3,
                                       tsih=self.target._new_tsih())
                self.target.logins += 1
                self.target._sessions[id(self)] = (
                    self.export.iqn if self.export else "discovery", self.initiator, self.sock)
                return True

    async def _send_login(self, itt: int, isid: bytes, out: list[tuple[str, str]], *, csg: int,
                          nsg: int | None = None, status: tuple[int, int] = (0, 0),
                          tsih: int = 0) -> None:
        """A Login Response; `nsg` None means no transit (stay in this stage)."""
        body = encode_text(out)
        flags = (csg << 2) | (0 if nsg is None else 0x80 | nsg)
        h = self._hdr(Op.LOGIN_RESPONSE, flags, len(body), itt=itt)
        h[8:14] = isid
        struct.pack_into(">H", h, 14, tsih)
        h[36], h[37] = status
        async with self.send_lock:
            self._sn_fields(h, status=True)
            await send_all(self.sock, frame(h, body, header_digest=False, data_digest=False))

    def _negotiate(self, csg: int, got: dict[str, str]) -> tuple[list[tuple[str, str]], bool]:
        """Keys to answer one login request with, and whether we may leave this stage."""
        state = self._state
        if csg == 1:
            if state == "security":
                if "InitiatorName" in got:
                    self._identify(got)
                if not self.initiator:
                    raise _Refused(0x02, 0x07, "no InitiatorName")
                self._check_access()
            if self._needs_chap() and state not in ("auth-done", "operational"):
                raise _Refused(0x02, 0x01, "CHAP is required")
            self._state = "operational"
            return self._operational(got), True
        if csg != 0:
            raise _Refused(0x02, 0x0B, f"login stage {csg}")
        if state == "security":
            if "InitiatorName" in got:
                self._identify(got)
            out, done = self._security_first(got)
            self._state = "chap-a" if self._needs_chap() else "auth-done" if done else state
        elif state == "chap-a":
            algorithms = [x.strip() for x in got.get("CHAP_A", "").split(",")]
            if str(CHAP_MD5) not in algorithms:
                raise _Refused(0x02, 0x01, "no supported CHAP_A (need 5, MD5)")
            self._chap_ident = secrets.randbelow(256)
            self._chap_challenge = secrets.token_bytes(16)
            out = [("CHAP_A", str(CHAP_MD5)), ("CHAP_I", str(self._chap_ident)),
                   ("CHAP_C", "0x" + self._chap_challenge.hex())]
            self._state = "chap-r"
        elif state == "chap-r":
            out = self._chap_check(got, self._chap_ident, self._chap_challenge)
            self._state = "auth-done"
        else:
            raise _Refused(0x02, 0x0B, f"unexpected security keys in state {state}")
        return out, self._state == "auth-done"

    def _identify(self, got: dict[str, str]) -> None:
        self.initiator = got["InitiatorName"]
        kind = got.get("SessionType", "Normal")
        if kind == "Discovery":
            self.discovery = True
            return
        if kind != "Normal":
            raise _Refused(0x02, 0x09, f"SessionType={kind}")
        name = got.get("TargetName")
        if not name:
            raise _Refused(0x02, 0x07, "no TargetName")
        export = self.target.exports().get(name)
        if export is None:
            raise _Refused(0x02, 0x03, f"no target {name}")
        self.export = export

    def _check_access(self) -> None:
        if self.export is not None and not self.export.permits(self.initiator):
            raise _Refused(0x02, 0x02, f"initiator {self.initiator} is not attached to "
                           f"{self.export.iqn}")

    def _needs_chap(self) -> bool:
        return self.export is not None and self.export.chap is not None

    def _security_first(self, got: dict[str, str]) -> tuple[list[tuple[str, str]], bool]:
        if not self.initiator:
            raise _Refused(0x02, 0x07, "no InitiatorName")
        self._check_access()
        out: list[tuple[str, str]] = []
        if not self.discovery:
            out.append(("TargetPortalGroupTag", "1"))
        offered = [m.strip() for m in got.get("AuthMethod", "None").split(",")]
        if self._needs_chap():
            if "CHAP" not in offered:
                raise _Refused(0x02, 0x01, "CHAP is required and the initiator did not offer "
                               "it")
            out.append(("AuthMethod", "CHAP"))
            return out, False
        if "None" not in offered:
            raise _Refused(0x02, 0x01, f"AuthMethod {got.get('AuthMethod')} but this target "
                           "has no CHAP account")
        out.append(("AuthMethod", "None"))
        return out, True

    def _chap_check(self, got: dict[str, str], ident: int,
                    challenge: bytes) -> list[tuple[str, str]]:
        assert self.export is not None
        chap = self.export.chap
        assert chap is not None
        name, resp = got.get("CHAP_N"), got.get("CHAP_R")
        if name is None or resp is None:
            raise _Refused(0x02, 0x01, "no CHAP_N/CHAP_R")
        try:
            their = _chap_binary(resp)
        except ValueError:
            raise _Refused(0x02, 0x01, "malformed CHAP_R") from None
        want = chap_response(ident, chap.secret.reveal().encode(), challenge)
        if name != chap.user or not hmac.compare_digest(their, want):
            raise _Refused(0x02, 0x01, f"CHAP: wrong user name or secret (user {name!r})")
        if "CHAP_I" not in got:
            return []
        mutual = self.export.mutual
        if mutual is None:
            raise _Refused(0x02, 0x01, "mutual CHAP asked for, but the target has no account "
                           "to answer with")
        try:
            their_ident = int(got["CHAP_I"], 0)
            their_challenge = _chap_binary(got.get("CHAP_C", ""))
        except ValueError:
            raise _Refused(0x02, 0x01, "malformed CHAP_I/CHAP_C") from None
        if their_challenge == challenge:
            raise _Refused(0x02, 0x01, "initiator reflected our CHAP challenge")
        answer = chap_response(their_ident, mutual.secret.reveal().encode(), their_challenge)
        return [("CHAP_N", mutual.user), ("CHAP_R", "0x" + answer.hex())]

    def _operational(self, got: dict[str, str]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        p = self.p
        for key, value in got.items():
            if key in ("InitiatorName", "SessionType", "TargetName", "InitiatorAlias",
                       "AuthMethod"):
                continue
            if key in ("HeaderDigest", "DataDigest"):
                choice = next((v for v in (x.strip() for x in value.split(","))
                               if v in ("CRC32C", "None")), "None")
                setattr(p, "header_digest" if key == "HeaderDigest" else "data_digest",
                        choice == "CRC32C")
                out.append((key, choice))
            elif key == "MaxRecvDataSegmentLength":
                p.max_xmit = max(512, min(int(value), (1 << 24) - 1))
            elif key == "MaxBurstLength":
                p.max_burst = min(int(value), _OUR_MAX_BURST)
                out.append((key, str(p.max_burst)))
            elif key == "FirstBurstLength":
                p.first_burst = min(int(value), _OUR_MAX_BURST)
                out.append((key, str(p.first_burst)))
            elif key == "InitialR2T":
                p.initial_r2t = value == "Yes"
                out.append((key, value))
            elif key == "ImmediateData":
                p.immediate_data = value == "Yes"
                out.append((key, value))
            elif key in ("DataPDUInOrder", "DataSequenceInOrder"):
                out.append((key, "Yes"))
            elif key in ("MaxOutstandingR2T", "MaxConnections"):
                out.append((key, "1"))
            elif key == "ErrorRecoveryLevel":
                out.append((key, "0"))
            elif key == "DefaultTime2Wait":
                out.append((key, value))
            elif key == "DefaultTime2Retain":
                out.append((key, "0"))
            elif key in ("IFMarker", "OFMarker"):
                out.append((key, "No"))
            elif key in ("IFMarkInt", "OFMarkInt"):
                out.append((key, "Irrelevant"))
            elif key.startswith("X-") or key.startswith("X#"):
                out.append((key, "NotUnderstood"))
            else:
                out.append((key, "NotUnderstood"))
        out.append(("MaxRecvDataSegmentLength", str(_OUR_MAX_RECV)))
        if p.first_burst > p.max_burst:
            p.first_burst = p.max_burst
        return out

    # -- full feature phase ---------------------------------------------------------------------

    async def _full_feature(self) -> None:
        async with trio.open_nursery() as nursery:
            try:
                while not self.closing:
                    hbuf, data = await self._recv_pdu(digests=True)
                    op = hbuf[0] & 0x3F
                    immediate = bool(hbuf[0] & 0x40)
                    if op in (Op.SCSI_COMMAND, Op.TEXT, Op.NOP_OUT, Op.TASK_MGMT,
                              Op.LOGOUT) and not immediate:
                        cmd_sn = struct.unpack_from(">I", hbuf, 24)[0]
                        if cmd_sn == self.exp_cmd_sn:
                            self.exp_cmd_sn = (self.exp_cmd_sn + 1) & _MASK
                    if op == Op.SCSI_COMMAND:
                        if self.discovery:
                            await self._reject(hbuf, 0x05)
                            continue
                        self._command(nursery, hbuf, data)
                    elif op == Op.DATA_OUT:
                        self._data_out(hbuf, data)
                    elif op == Op.NOP_OUT:
                        itt = struct.unpack_from(">I", hbuf, 16)[0]
                        if itt != NO_TAG:
                            h = self._hdr(Op.NOP_IN, 0x80, len(data), itt=itt)
                            h[8:16] = hbuf[8:16]
                            await self._send(h, data)
                    elif op == Op.TEXT:
                        await self._text(hbuf, data)
                    elif op == Op.TASK_MGMT:
                        itt = struct.unpack_from(">I", hbuf, 16)[0]
                        await self._send(self._hdr(Op.TASK_MGMT_RESPONSE, 0x80, itt=itt))
                    elif op == Op.LOGOUT:
                        itt = struct.unpack_from(">I", hbuf, 16)[0]
                        self.closing = True
                        # let commands still running finish before the answer
                        with trio.move_on_after(10):
                            while len(nursery.child_tasks):
                                await trio.sleep(0.005)
                        await self._send(self._hdr(Op.LOGOUT_RESPONSE, 0x80, itt=itt))
                    else:
                        await self._reject(hbuf, 0x04)
            finally:
                nursery.cancel_scope.cancel()

    async def _reject(self, hbuf: bytearray, reason: int) -> None:
        h = self._hdr(Op.REJECT, 0x80, BHS_LEN)
        h[2] = reason
        await self._send(h, bytes(hbuf[:BHS_LEN]))

    async def _text(self, hbuf: bytearray, data: bytearray) -> None:
        itt = struct.unpack_from(">I", hbuf, 16)[0]
        out: list[tuple[str, str]] = []
        keys = dict(decode_text(data)) if data else {}
        if "SendTargets" in keys:
            here = self.sock.getsockname()
            host = f"[{here[0]}]" if ":" in here[0] else here[0]
            want = keys["SendTargets"]
            current = self.export.iqn if self.export else None
            for iqn, export in sorted(self.target.exports().items()):
                # RFC 7143 13.3: All lists every target in a discovery session and the current
                # one in a normal session; an empty value means the current one; else that name
                if want == "All":
                    shown = self.discovery or iqn == current
                else:
                    shown = iqn == (want or current)
                if shown and export.permits(self.initiator):
                    out += [("TargetName", iqn), ("TargetAddress", f"{host}:{here[1]},1")]
        body = encode_text(out)
        await self._send(self._hdr(Op.TEXT_RESPONSE, 0x80, len(body), itt=itt), body)

    # -- SCSI -----------------------------------------------------------------------------------

    def _command(self, nursery: trio.Nursery, hbuf: bytearray, data: bytearray) -> None:
        flags = hbuf[1]
        lun = decode_lun(bytes(hbuf[8:16]))
        itt, edtl = struct.unpack_from(">II", hbuf, 16)
        cdb = bytes(hbuf[32:48])
        write: _Write | None = None
        if flags & 0x20 and edtl:
            if edtl > _MAX_IO:
                write = None
            else:
                write = _Write(buf=bytearray(edtl))
                n = min(len(data), edtl)
                write.buf[:n] = data[:n]
                write.received = n
                unsolicited = 0 if flags & 0x80 else min(self.p.first_burst, edtl)
                write.expected_end = max(n, unsolicited)
                if write.received >= write.expected_end:
                    write.done.set()
                self.writes[itt] = write
        nursery.start_soon(self._execute, lun, itt, edtl, cdb, bytes(hbuf[8:16]), write)

    def _data_out(self, hbuf: bytearray, data: bytearray) -> None:
        itt = struct.unpack_from(">I", hbuf, 16)[0]
        offset = struct.unpack_from(">I", hbuf, 40)[0]
        write = self.writes.get(itt)
        if write is None:
            raise IscsiProtocolError(f"iSCSI target: Data-Out for unknown task 0x{itt:08x}")
        end = offset + len(data)
        if end > len(write.buf):
            raise IscsiProtocolError(f"iSCSI target: Data-Out past the end of task 0x{itt:08x}")
        write.buf[offset:end] = data
        write.received += len(data)
        if hbuf[1] & 0x80:
            write.done.set()

    async def _execute(self, lun: int, itt: int, edtl: int, cdb: bytes, lun_raw: bytes,
                       write: _Write | None) -> None:
        try:
            try:
                await self._scsi(lun, itt, edtl, cdb, lun_raw, write)
            except _Check as check:
                await self._status(itt, Status.CHECK_CONDITION, sense=_sense_data(*check.sense))
        except ConnectionClosed:
            self.closing = True
        except OSError as err:  # the backend failed: tell the initiator, keep the session
            log.warning("%s: I/O error on %s LUN %d: %s", self.target.name,
                        self.export.iqn if self.export else "?", lun, err)
            try:
                await self._status(itt, Status.CHECK_CONDITION,
                                   sense=_sense_data(SenseKey.MEDIUM_ERROR, 0x11, 0))
            except ConnectionClosed:
                self.closing = True
        finally:
            self.writes.pop(itt, None)

    async def _status(self, itt: int, status: int, *, sense: bytes = b"",
                      residual: int = 0, under: bool = False, over: bool = False) -> None:
        h = self._hdr(Op.SCSI_RESPONSE, 0x80 | (0x04 if over else 0) | (0x02 if under else 0),
                      len(sense), itt=itt)
        h[3] = status
        struct.pack_into(">I", h, 20, 0)
        struct.pack_into(">I", h, 44, residual)
        await self._send(h, sense)

    async def _data_in(self, itt: int, edtl: int, payload: bytes | bytearray | memoryview,
                       lun_raw: bytes) -> None:
        """Send `payload` (cut to EDTL) as Data-In PDUs, status in the last (phase collapse)."""
        view = memoryview(payload)[:edtl]
        total = len(view)
        residual = edtl - total if total < edtl else len(payload) - edtl
        under, over = total < edtl, len(payload) > edtl
        seg = self.p.max_xmit
        hd, dd = self.p.header_digest, self.p.data_digest
        parts: list[bytes | bytearray | memoryview] = []
        async with self.send_lock:
            if total == 0:
                pass
            else:
                for data_sn, pos in enumerate(range(0, total, seg)):
                    piece = view[pos : pos + seg]
                    last = pos + seg >= total
                    flags = 0x80 | (0x01 if last else 0)
                    if last:
                        flags |= (0x02 if under else 0) | (0x04 if over else 0)
                    h = self._hdr(Op.DATA_IN, flags, len(piece), itt=itt)
                    h[8:16] = lun_raw
                    self._sn_fields(h, status=last)
                    if last:
                        h[3] = Status.GOOD
                        struct.pack_into(">I", h, 44, residual)
                    struct.pack_into(">II", h, 36, data_sn, pos)
                    parts += frame(h, piece, header_digest=hd, data_digest=dd)
                await send_all(self.sock, parts)
                return
        await self._status(itt, Status.GOOD, residual=residual, under=under, over=over)

    async def _scsi(self, lun: int, itt: int, edtl: int, cdb: bytes, lun_raw: bytes,
                    write: _Write | None) -> None:
        export = self.export
        assert export is not None
        op = cdb[0]
        exists = 0 <= lun < len(export.luns)
        if op == 0x12:  # INQUIRY
            await self._data_in(itt, edtl, self._inquiry(export, lun, cdb, exists), lun_raw)
            return
        if op == 0xA0:  # REPORT LUNS
            body = b"".join(encode_lun(n) for n in range(len(export.luns)))
            await self._data_in(itt, edtl, len(body).to_bytes(4, "big") + bytes(4) + body,
                                lun_raw)
            return
        if op == 0x03:  # REQUEST SENSE
            await self._data_in(itt, edtl, _sense_data(0, 0, 0)[2:], lun_raw)
            return
        if not exists:
            raise _Check(SenseKey.ILLEGAL_REQUEST, 0x25)
        backend = export.luns[lun]
        bs = export.block_size
        blocks = backend.size // bs
        if op == 0x00:  # TEST UNIT READY
            await self._status(itt, Status.GOOD)
        elif op == 0x25:  # READ CAPACITY(10)
            last = min(blocks - 1, 0xFFFFFFFF)
            await self._data_in(itt, edtl, struct.pack(">II", last, bs), lun_raw)
        elif op == 0x9E and cdb[1] & 0x1F == 0x10:  # READ CAPACITY(16)
            cap = bytearray(32)
            struct.pack_into(">QI", cap, 0, blocks - 1, bs)
            await self._data_in(itt, edtl, cap, lun_raw)
        elif op in (0x1A, 0x5A):  # MODE SENSE(6/10): no pages, just the WP bit
            wp = 0x80 if export.read_only else 0
            body = bytes([3, 0, wp, 0]) if op == 0x1A else bytes([0, 6, 0, wp, 0, 0, 0, 0])
            await self._data_in(itt, edtl, body, lun_raw)
        elif op in (0x35, 0x91):  # SYNCHRONIZE CACHE(10/16)
            await self._status(itt, Status.GOOD)
        elif op in (0x28, 0x88, 0x2A, 0x8A):
            if op in (0x28, 0x2A):
                lba, count = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb,
                                                                                       7)[0]
            else:
                lba, count = struct.unpack_from(">QI", cdb, 2)
            if lba + count > blocks:
                raise _Check(SenseKey.ILLEGAL_REQUEST, 0x21)
            length = count * bs
            if length > _MAX_IO:
                raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
            if op in (0x28, 0x88):
                buf = bytearray(length)
                if length:
                    await trio.to_thread.run_sync(backend.read_into, lba * bs, memoryview(buf))
                await self._data_in(itt, edtl, buf, lun_raw)
            else:
                await self._write(export, backend, itt, edtl, lba * bs, length, write, lun_raw)
        else:
            raise _Check(SenseKey.ILLEGAL_REQUEST, 0x20)

    @staticmethod
    def _inquiry(export: Export, lun: int, cdb: bytes, exists: bool) -> bytes:
        alloc = struct.unpack_from(">H", cdb, 3)[0]
        qualifier = 0x00 if exists else 0x7F
        if cdb[1] & 0x01:
            page = cdb[2]
            serial = (export.serial or export.iqn)[-32:].encode()
            if page == 0x00:
                body = bytes([0x00, 0x80, 0x83])
            elif page == 0x80:
                body = serial
            elif page == 0x83:
                # one T10 vendor designator: vendor id + the target IQN and LUN
                ident = _padded("AHVBKUP", 8) + f"{export.iqn}:{lun}".encode()[-200:]
                body = bytes([0x02, 0x01, 0x00, len(ident)]) + ident
            else:
                raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
            out = bytes([qualifier, page]) + len(body).to_bytes(2, "big") + body
        else:
            if cdb[2]:
                raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
            out = (bytes([qualifier, 0, 0x05, 0x02, 31, 0, 0, 0x02])
                   + _padded("AHVBKUP", 8) + _padded("SIMULATED VDISK", 16) + _padded("0001", 4))
        return out[:alloc]

    async def _write(self, export: Export, backend: LunBackend, itt: int, edtl: int,
                     offset: int, length: int, write: _Write | None, lun_raw: bytes) -> None:
        if export.read_only:
            # drain what the initiator sends unsolicited, then refuse
            if write is not None:
                await write.done.wait()
            raise _Check(SenseKey.DATA_PROTECT, 0x27)
        if length == 0:
            await self._status(itt, Status.GOOD)
            return
        if write is None or edtl != length:
            raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
        await write.done.wait()
        pos = write.received
        r2t_sn = 0
        while pos < length:
            burst = min(self.p.max_burst, length - pos)
            write.done = trio.Event()
            write.ttt = secrets.randbelow(_MASK)
            h = self._hdr(Op.R2T, 0x80, itt=itt)
            h[8:16] = lun_raw
            struct.pack_into(">I", h, 20, write.ttt)
            struct.pack_into(">III", h, 36, r2t_sn, pos, burst)
            r2t_sn += 1
            await self._send(h, status=False)
            await write.done.wait()
            pos += burst
        await trio.to_thread.run_sync(backend.write, offset, memoryview(write.buf))
        await self._status(itt, Status.GOOD)

