"""A userspace iSCSI target on trio: serves LUNs backed by any object with a size and blocking
`read_into` / `write`, to real initiators (libiscsi, qemu, ours).

    target = IscsiTarget(exports=lambda: {iqn: Export(iqn=iqn, luns=[backend])})
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(target.serve, "127.0.0.1", 3260)

`exports` is asked afresh at every login and discovery, so the owner (the Prism simulator) changes
what is served by changing its own state: a volume group created, an initiator attached. Each
`Export` says who may log in (`allowed`, the ACL) and whether CHAP is required. The command set
is an SBC-3 direct-access device's without protection information or thin provisioning: INQUIRY
(standard, VPD 0x00/0x80/0x83/0xB0/0xB1/0xB2), REPORT LUNS, READ CAPACITY(10/16), TEST UNIT
READY, REQUEST SENSE, MODE SENSE(6/10), READ/WRITE(6/10/12/16), WRITE AND VERIFY, VERIFY, WRITE
SAME, ORWRITE, PRE-FETCH, SYNCHRONIZE CACHE, GET LBA STATUS, REPORT SUPPORTED OPERATION CODES,
RESERVE/RELEASE and persistent reservations; immediate data, unsolicited Data-Out and R2T.
ErrorRecoveryLevel 0, one connection per session, several sessions at once. The rules of RFC 7143
it keeps (CmdSN window and order, DataSN order, residuals, task management) and libiscsi's
conformance suite run against it are in docs/iscsi-target.md.
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
# PDUs that carry a CmdSN the window applies to (Data-Out and SNACK do not)
_ORDERED = frozenset({Op.SCSI_COMMAND, Op.TEXT, Op.NOP_OUT, Op.TASK_MGMT, Op.LOGOUT})
# Task Management Function Response codes (RFC 7143 11.6.1)
_TMF_COMPLETE, _TMF_NO_TASK, _TMF_NO_LUN = 0, 1, 2
_TMF_NO_REASSIGN, _TMF_NOT_SUPPORTED = 4, 5


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
    """The data-out side of one write task. Data arrives in order (DataPDUInOrder=Yes):
    `received` is where the next Data-Out must start; `data_sn` is the DataSN it must carry,
    counted from 0 in each sequence (the unsolicited one, then one per R2T, RFC 7143 11.7.5)
    and `ttt` the Target Transfer Tag it must echo (NO_TAG for unsolicited data)."""

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
        # reservations by (target IQN, LUN): they outlive sessions, as on a real target
        self._reservations: dict[tuple[str, int], _Reservations] = {}

    def _lun_reservations(self, iqn: str, lun: int) -> _Reservations:
        return self._reservations.setdefault((iqn, lun), _Reservations())

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
            for state in self._reservations.values():  # I_T nexus loss (SPC-2)
                if state.reserved_by == conn.nexus:
                    state.reserved_by = None
            if conn.rejected:
                await _drain(sock)
            close_socket(sock)

    def _new_tsih(self) -> int:
        self._next_tsih = self._next_tsih % 0xFFFE + 1
        return self._next_tsih


async def _drain(sock: socket.socket) -> None:
    """After a Reject that ends the connection: stop sending and read what the initiator still
    sends for a moment, so the close does not reset the connection and lose the Reject."""
    try:
        sock.shutdown(socket.SHUT_WR)
        with trio.move_on_after(1):
            while True:
                try:
                    if not sock.recv(65536):
                        return
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
    except (OSError, trio.ClosedResourceError):
        pass


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
        # running SCSI tasks by ITT: (LUN, cancel scope), for ABORT TASK and the resets
        self.tasks: dict[int, tuple[int, trio.CancelScope]] = {}
        # tasks ignored (CmdSN outside the window) or aborted: their Data-Out is discarded
        self.discard: set[int] = set()
        # non-immediate PDUs that arrived ahead of ExpCmdSN, delivered in CmdSN order
        self.held: dict[int, tuple[bytearray, bytearray]] = {}
        self.closing = False
        self.rejected = False  # a protocol error was answered with Reject
        self.isid = b""
        self._state = "security"
        self._chap_ident = 0
        self._chap_challenge = b""

    @property
    def nexus(self) -> tuple[str, bytes]:
        """The I_T nexus: initiator name and ISID (one target portal group)."""
        return (self.initiator, self.isid)

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
        # an aborted task sends nothing more; once sending, it is shielded, so that no half
        # PDU is left on the wire
        await trio.lowlevel.checkpoint_if_cancelled()
        with trio.CancelScope(shield=True):
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
            self.isid = isid
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
                    if op in _ORDERED and not immediate:
                        cmd_sn = struct.unpack_from(">I", hbuf, 24)[0]
                        if not self._accept_cmd_sn(hbuf, data, cmd_sn):
                            continue
                        self.exp_cmd_sn = (self.exp_cmd_sn + 1) & _MASK
                        await self._dispatch(nursery, hbuf, data)
                        # what arrived ahead of its turn, now in CmdSN order
                        while not self.closing and self.exp_cmd_sn in self.held:
                            held = self.held.pop(self.exp_cmd_sn)
                            self.exp_cmd_sn = (self.exp_cmd_sn + 1) & _MASK
                            await self._dispatch(nursery, *held)
                    else:
                        await self._dispatch(nursery, hbuf, data)
            finally:
                nursery.cancel_scope.cancel()

    def _accept_cmd_sn(self, hbuf: bytearray, data: bytearray, cmd_sn: int) -> bool:
        """RFC 7143 4.2.2.1: a non-immediate command is delivered in CmdSN order; one outside
        [ExpCmdSN, MaxCmdSN] is silently ignored (its Data-Out too). True: deliver it now."""
        if cmd_sn == self.exp_cmd_sn:
            return True
        ahead = (cmd_sn - self.exp_cmd_sn) & _MASK
        itt = struct.unpack_from(">I", hbuf, 16)[0]
        if ahead < _WINDOW and len(self.held) < _WINDOW:
            self.held[cmd_sn] = (hbuf, data)
            if hbuf[0] & 0x3F == Op.SCSI_COMMAND and not self.discovery:
                self._write_buffer(hbuf, data)  # its unsolicited Data-Out may come first
            return False
        log.debug("%s: %s sent CmdSN %d outside the window [%d, %d]: ignored", self.target.name,
                  self.peer, cmd_sn, self.exp_cmd_sn, (self.exp_cmd_sn + _WINDOW - 1) & _MASK)
        if hbuf[0] & 0x3F == Op.SCSI_COMMAND:
            self.discard.add(itt)
        return False

    async def _dispatch(self, nursery: trio.Nursery, hbuf: bytearray, data: bytearray) -> None:
        op = hbuf[0] & 0x3F
        itt = struct.unpack_from(">I", hbuf, 16)[0]
        if op == Op.SCSI_COMMAND:
            if self.discovery:
                await self._reject(hbuf, 0x05)
                return
            self.discard.discard(itt)
            self._command(nursery, hbuf, data)
        elif op == Op.DATA_OUT:
            await self._data_out(hbuf, data)
        elif op == Op.NOP_OUT:
            if itt != NO_TAG:
                h = self._hdr(Op.NOP_IN, 0x80, len(data), itt=itt)
                h[8:16] = hbuf[8:16]
                await self._send(h, data)
        elif op == Op.TEXT:
            await self._text(hbuf, data)
        elif op == Op.TASK_MGMT:
            await self._task_management(hbuf)
        elif op == Op.LOGOUT:
            self.closing = True
            # let commands still running finish before the answer
            with trio.move_on_after(10):
                while self.tasks:
                    await trio.sleep(0.005)
            await self._send(self._hdr(Op.LOGOUT_RESPONSE, 0x80, itt=itt))
        else:
            await self._reject(hbuf, 0x04)

    async def _task_management(self, hbuf: bytearray) -> None:
        """RFC 7143 11.5/11.6: ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET,
        TARGET WARM/COLD RESET. Aborted tasks get no response (the TMF response says they are
        gone); the response is sent only once they have stopped."""
        function = hbuf[1] & 0x7F
        itt, ref_itt = struct.unpack_from(">II", hbuf, 16)
        lun = decode_lun(bytes(hbuf[8:16]))
        export = self.export
        response = _TMF_COMPLETE
        victims: list[int] = []
        if export is None:
            response = _TMF_NOT_SUPPORTED
        elif function == 1:  # ABORT TASK
            if ref_itt in self.tasks:
                victims = [ref_itt]
            else:
                ref_cmd_sn = struct.unpack_from(">I", hbuf, 32)[0]
                # 11.5.1 b/c: an unknown task whose RefCmdSN is already in the window counts as
                # received (function complete); otherwise the task does not exist
                behind = (self.exp_cmd_sn - ref_cmd_sn) & _MASK
                response = _TMF_COMPLETE if 0 < behind <= _WINDOW else _TMF_NO_TASK
        elif function in (2, 3, 5):  # ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET
            if not 0 <= lun < len(export.luns):
                response = _TMF_NO_LUN
            else:
                victims = [t for t, (task_lun, _) in self.tasks.items() if task_lun == lun]
                if function == 5:  # a LUN reset ends an SPC-2 reservation (not a persistent one)
                    self.target._lun_reservations(export.iqn, lun).reserved_by = None
        elif function in (6, 7):  # TARGET WARM RESET, TARGET COLD RESET
            victims = list(self.tasks)
            for (iqn, _lun), state in self.target._reservations.items():
                if iqn == export.iqn:
                    state.reserved_by = None
        elif function == 8:  # TASK REASSIGN: needs ErrorRecoveryLevel 2
            response = _TMF_NO_REASSIGN
        else:  # CLEAR ACA and anything unknown
            response = _TMF_NOT_SUPPORTED
        for victim in victims:
            self.discard.add(victim)
            self.tasks[victim][1].cancel()
        with trio.move_on_after(10):
            while any(v in self.tasks for v in victims):
                await trio.sleep(0.002)
        h = self._hdr(Op.TASK_MGMT_RESPONSE, 0x80, itt=itt)
        h[2] = response
        await self._send(h)
        if function == 7 and response == _TMF_COMPLETE:
            self.closing = True  # a cold reset ends the connection after its response

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
        lun = decode_lun(bytes(hbuf[8:16]))
        itt, edtl = struct.unpack_from(">II", hbuf, 16)
        cdb = bytes(hbuf[32:48])
        # a command held for its CmdSN turn had its write buffer set up on arrival
        write = self.writes.get(itt) or self._write_buffer(hbuf, data)
        scope = trio.CancelScope()
        self.tasks[itt] = (lun, scope)
        nursery.start_soon(self._execute, lun, itt, edtl, cdb, bytes(hbuf[8:16]), write, scope)

    def _write_buffer(self, hbuf: bytearray, data: bytearray) -> _Write | None:
        """The Data-Out side of a write command, with its immediate data, in `writes` so that
        its Data-Out PDUs find it."""
        flags = hbuf[1]
        itt, edtl = struct.unpack_from(">II", hbuf, 16)
        write: _Write | None = None
        if flags & 0x20 and edtl:
            if edtl > _MAX_IO:
                self.discard.add(itt)  # refused below; what it sends is dropped
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
        return write

    async def _data_out(self, hbuf: bytearray, data: bytearray) -> None:
        itt, ttt = struct.unpack_from(">II", hbuf, 16)
        data_sn, offset = struct.unpack_from(">II", hbuf, 36)
        write = self.writes.get(itt)
        if write is None:
            if itt in self.discard:  # its command was ignored or aborted
                return
            raise IscsiProtocolError(f"iSCSI target: Data-Out for unknown task 0x{itt:08x}")
        # RFC 7143 11.7.5: DataSN counts the PDUs of one sequence from 0; with
        # DataPDUInOrder=Yes each starts where the last ended. At ErrorRecoveryLevel 0 a
        # sequence error is a protocol error: Reject (11.17.1, reason 0x04), then the
        # connection is dropped; recovery at that level is the initiator's new session.
        why = ""
        if ttt != write.ttt:
            why = f"Target Transfer Tag 0x{ttt:08x}, expected 0x{write.ttt:08x}"
        elif data_sn != write.data_sn:
            why = f"DataSN {data_sn}, expected {write.data_sn}"
        elif offset != write.received:
            why = f"buffer offset {offset}, expected {write.received}"
        elif offset + len(data) > len(write.buf):
            why = "data past the expected data transfer length"
        if why:
            await self._reject(hbuf, 0x04)
            self.rejected = True
            raise IscsiProtocolError(f"iSCSI target: Data-Out for task 0x{itt:08x} out of "
                                     f"order: {why}")
        end = offset + len(data)
        write.buf[offset:end] = data
        write.received = end
        write.data_sn += 1
        if hbuf[1] & 0x80:
            write.done.set()

    async def _execute(self, lun: int, itt: int, edtl: int, cdb: bytes, lun_raw: bytes,
                       write: _Write | None, scope: trio.CancelScope) -> None:
        try:
            try:
                with scope:  # cancelled by ABORT TASK or a reset: no response at all
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
            self.tasks.pop(itt, None)

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
        if total:
            await trio.lowlevel.checkpoint_if_cancelled()  # aborted: nothing is sent
            with trio.CancelScope(shield=True):  # no half PDU on the wire
                async with self.send_lock:
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
            await self._data_in(itt, edtl, _inquiry(export, lun, cdb, exists), lun_raw)
            return
        if op == 0xA0:  # REPORT LUNS
            body = b"".join(encode_lun(n) for n in range(len(export.luns)))
            report = len(body).to_bytes(4, "big") + bytes(4) + body
            alloc = struct.unpack_from(">I", cdb, 6)[0]
            await self._data_in(itt, edtl, report[:alloc], lun_raw)
            return
        if op == 0x03:  # REQUEST SENSE
            await self._data_in(itt, edtl, _sense_data(0, 0, 0)[2:][: cdb[4]], lun_raw)
            return
        if op == 0xA3 and cdb[1] & 0x1F == 0x0C:  # REPORT SUPPORTED OPERATION CODES
            await self._data_in(itt, edtl, _supported_opcodes(cdb), lun_raw)
            return
        if not exists:
            raise _Check(SenseKey.ILLEGAL_REQUEST, 0x25)
        backend = export.luns[lun]
        bs = export.block_size
        blocks = backend.size // bs
        state = self.target._lun_reservations(export.iqn, lun)
        if state.conflicts(self.nexus, cdb):
            if write is not None:
                await write.done.wait()
            await self._status(itt, Status.RESERVATION_CONFLICT)
            return
        if op in (0x16, 0x56):  # RESERVE(6/10), SPC-2
            state.reserved_by = self.nexus
            await self._status(itt, Status.GOOD)
        elif op in (0x17, 0x57):  # RELEASE(6/10): only the holder's releases
            if state.reserved_by == self.nexus:
                state.reserved_by = None
            await self._status(itt, Status.GOOD)
        elif op == 0x5E:  # PERSISTENT RESERVE IN
            alloc = struct.unpack_from(">H", cdb, 7)[0]
            await self._data_in(itt, edtl, state.pr_in(cdb[1] & 0x1F)[:alloc], lun_raw)
        elif op == 0x5F:  # PERSISTENT RESERVE OUT
            length = struct.unpack_from(">I", cdb, 5)[0]
            if write is None or edtl < length or length > 4096:
                if write is not None:
                    await write.done.wait()
                raise _Check(SenseKey.ILLEGAL_REQUEST, 0x1A)  # PARAMETER LIST LENGTH ERROR
            params = bytes(await self._receive(itt, write, length, lun_raw))
            if state.pr_out(self.nexus, cdb, params):
                await self._status(itt, Status.GOOD)
            else:
                await self._status(itt, Status.RESERVATION_CONFLICT)
        elif op == 0x00:  # TEST UNIT READY
            await self._status(itt, Status.GOOD)
        elif op == 0x25:  # READ CAPACITY(10)
            last = min(blocks - 1, 0xFFFFFFFF)
            await self._data_in(itt, edtl, struct.pack(">II", last, bs), lun_raw)
        elif op == 0x9E and cdb[1] & 0x1F == 0x10:  # READ CAPACITY(16)
            cap = bytearray(32)
            struct.pack_into(">QI", cap, 0, blocks - 1, bs)
            alloc = struct.unpack_from(">I", cdb, 10)[0]
            await self._data_in(itt, edtl, cap[:alloc], lun_raw)
        elif op == 0x9E and cdb[1] & 0x1F == 0x12:  # GET LBA STATUS: every block mapped
            lba, alloc = struct.unpack_from(">QI", cdb, 2)
            if lba >= blocks:
                raise _Check(SenseKey.ILLEGAL_REQUEST, 0x21)
            status = struct.pack(">I4xQIB3x", 20, lba, min(blocks - lba, _MASK), 0)
            await self._data_in(itt, edtl, status[:alloc], lun_raw)
        elif op in (0x1A, 0x5A):  # MODE SENSE(6/10)
            alloc = cdb[4] if op == 0x1A else struct.unpack_from(">H", cdb, 7)[0]
            await self._data_in(itt, edtl, _mode_sense(export, blocks, cdb)[:alloc], lun_raw)
        elif op in (0x35, 0x91, 0x34, 0x90):  # SYNCHRONIZE CACHE, PRE-FETCH (10/16)
            if op in (0x35, 0x34):
                lba, count = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(
                    ">H", cdb, 7)[0]
            else:
                lba, count = struct.unpack_from(">QI", cdb, 2)
            if lba + count > blocks:
                raise _Check(SenseKey.ILLEGAL_REQUEST, 0x21)
            await self._status(itt, Status.GOOD)
        elif op in (0x41, 0x93):  # WRITE SAME(10/16)
            await self._write_same(export, backend, itt, edtl, cdb, blocks, write, lun_raw)
        elif op == 0x8B:  # ORWRITE(16)
            await self._or_write(export, backend, itt, edtl, cdb, blocks, write, lun_raw)
        elif op in _BLOCK_IO:
            kind, size = _BLOCK_IO[op]
            if size == 6:
                lba = int.from_bytes(cdb[1:4], "big") & 0x1FFFFF
                count = cdb[4] or 256
            else:
                # SBC-3: RDPROTECT/WRPROTECT/VRPROTECT (byte 1, bits 7-5) ask for
                # protection information; this LUN has none (PROTECT=0 in INQUIRY), so a
                # nonzero value is INVALID FIELD IN CDB
                if cdb[1] >> 5:
                    raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
                if size == 10:
                    lba, count = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(
                        ">H", cdb, 7)[0]
                elif size == 12:
                    lba, count = struct.unpack_from(">II", cdb, 2)
                else:
                    lba, count = struct.unpack_from(">QI", cdb, 2)
            if lba + count > blocks:
                raise _Check(SenseKey.ILLEGAL_REQUEST, 0x21)
            length = count * bs
            if length > _MAX_IO:
                raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
            if kind == "read":
                buf = bytearray(length)
                if length:
                    await trio.to_thread.run_sync(backend.read_into, lba * bs, memoryview(buf))
                await self._data_in(itt, edtl, buf, lun_raw)
            elif kind == "verify":
                await self._verify(backend, itt, edtl, lba * bs, length, cdb, write, lun_raw)
            else:
                await self._write(export, backend, itt, edtl, lba * bs, length, write, lun_raw)
        else:
            raise _Check(SenseKey.ILLEGAL_REQUEST, 0x20)

    async def _receive(self, itt: int, write: _Write | None, need: int,
                       lun_raw: bytes) -> memoryview:
        """The first `need` bytes of the task's Data-Out: what came unsolicited, the rest asked
        for with R2Ts of at most MaxBurstLength."""
        if write is None or not need:
            return memoryview(b"")
        await write.done.wait()
        pos = write.received
        r2t_sn = 0
        while pos < need:
            burst = min(self.p.max_burst, need - pos)
            write.done = trio.Event()
            write.ttt = secrets.randbelow(_MASK)
            write.data_sn = 0
            h = self._hdr(Op.R2T, 0x80, itt=itt)
            h[8:16] = lun_raw
            struct.pack_into(">I", h, 20, write.ttt)
            struct.pack_into(">III", h, 36, r2t_sn, pos, burst)
            r2t_sn += 1
            await self._send(h, status=False)
            await write.done.wait()
            pos = write.received
        return memoryview(write.buf)[:need]

    async def _write(self, export: Export, backend: LunBackend, itt: int, edtl: int,
                     offset: int, length: int, write: _Write | None, lun_raw: bytes) -> None:
        if export.read_only:
            # drain what the initiator sends unsolicited, then refuse
            if write is not None:
                await write.done.wait()
            raise _Check(SenseKey.DATA_PROTECT, 0x27)
        # RFC 7143 11.4.5: when the Expected Data Transfer Length and the CDB's transfer length
        # disagree, only the smaller amount moves and is written; the residual says the rest
        if write is None and edtl:
            raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)  # more than we buffer
        need = min(edtl, length)
        data = await self._receive(itt, write, need, lun_raw)
        if need:
            await trio.to_thread.run_sync(backend.write, offset, data)
        await self._status(itt, Status.GOOD, **_residual(edtl, length))

    async def _write_same(self, export: Export, backend: LunBackend, itt: int, edtl: int,
                          cdb: bytes, blocks: int, write: _Write | None,
                          lun_raw: bytes) -> None:
        """WRITE SAME(10/16) (SBC-3) without UNMAP (the LUN is fully provisioned):
        one block of Data-Out (zeros with NDOB) written to every block of the range."""
        bs = export.block_size
        if cdb[0] == 0x41:
            lba, count = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
            ndob = False
        else:
            lba, count = struct.unpack_from(">QI", cdb, 2)
            ndob = bool(cdb[1] & 0x01)
        if lba + count > blocks or lba >= blocks:
            raise _Check(SenseKey.ILLEGAL_REQUEST, 0x21)
        # WRPROTECT, ANCHOR, UNMAP: no protection information, no thin provisioning
        if cdb[1] & 0xF8:
            if write is not None:
                await write.done.wait()
            raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
        if export.read_only:
            if write is not None:
                await write.done.wait()
            raise _Check(SenseKey.DATA_PROTECT, 0x27)
        if ndob:
            block = bytes(bs)
        else:
            if write is None or edtl < bs:
                raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
            block = bytes(await self._receive(itt, write, bs, lun_raw))
        # NUMBER OF LOGICAL BLOCKS 0: up to the last block (WSNZ=0, no length limit)
        count = count or blocks - lba
        chunk = block * min(count, max(1, (1 << 20) // bs))
        done = 0
        while done < count:
            n = min(count - done, len(chunk) // bs)
            await trio.to_thread.run_sync(backend.write, (lba + done) * bs,
                                          memoryview(chunk)[: n * bs])
            done += n
        await self._status(itt, Status.GOOD, **_residual(edtl, 0 if ndob else bs))

    async def _or_write(self, export: Export, backend: LunBackend, itt: int, edtl: int,
                        cdb: bytes, blocks: int, write: _Write | None, lun_raw: bytes) -> None:
        """ORWRITE(16) (SBC-3): each block becomes itself OR the Data-Out."""
        lba, count = struct.unpack_from(">QI", cdb, 2)
        bs = export.block_size
        if lba + count > blocks:
            raise _Check(SenseKey.ILLEGAL_REQUEST, 0x21)
        if cdb[1] >> 5 or count * bs > _MAX_IO:  # ORPROTECT
            raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
        if export.read_only:
            if write is not None:
                await write.done.wait()
            raise _Check(SenseKey.DATA_PROTECT, 0x27)
        length = count * bs
        if write is None and edtl:
            raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
        need = min(edtl, length)
        data = await self._receive(itt, write, need, lun_raw)
        if need:
            have = bytearray(need)
            await trio.to_thread.run_sync(backend.read_into, lba * bs, memoryview(have))
            merged = (int.from_bytes(have, "big") | int.from_bytes(data, "big")).to_bytes(
                need, "big")
            await trio.to_thread.run_sync(backend.write, lba * bs, memoryview(merged))
        await self._status(itt, Status.GOOD, **_residual(edtl, length))

    async def _verify(self, backend: LunBackend, itt: int, edtl: int, offset: int, length: int,
                      cdb: bytes, write: _Write | None, lun_raw: bytes) -> None:
        """VERIFY(10/12/16): BYTCHK 0 checks the range only; 1 compares the Data-Out with the
        medium (MISCOMPARE on a difference)."""
        bytchk = (cdb[1] >> 1) & 3
        if bytchk == 0:
            await self._status(itt, Status.GOOD)
            return
        if bytchk != 1:
            raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
        need = min(edtl, length) if write is not None else 0
        data = await self._receive(itt, write, need, lun_raw)
        have = bytearray(need)
        if need:
            await trio.to_thread.run_sync(backend.read_into, offset, memoryview(have))
        if data != have:
            raise _Check(0x0E, 0x1D)  # MISCOMPARE DURING VERIFY OPERATION
        await self._status(itt, Status.GOOD, **_residual(edtl, length))


# commands any I_T nexus may send whatever the reservation (SPC-4 persistent reservations)
_ALWAYS = frozenset({0x00, 0x03, 0x12, 0x25, 0xA0, 0xA3, 0x5E, 0x5F, 0x17, 0x57})
_READS = frozenset({0x08, 0x28, 0xA8, 0x88, 0x2F, 0xAF, 0x8F, 0x34, 0x90, 0x1A, 0x5A, 0x9E})
_WR_EX, _EX_AC, _WR_EX_RO, _EX_AC_RO, _WR_EX_AR, _EX_AC_AR = 1, 3, 5, 6, 7, 8
_PR_TYPES = frozenset({_WR_EX, _EX_AC, _WR_EX_RO, _EX_AC_RO, _WR_EX_AR, _EX_AC_AR})

Nexus = tuple[str, bytes]


@dataclass
class _Reservations:
    """One LUN's reservations: an SPC-2 RESERVE holder, and persistent reservations (SPC-4
    5.9: registered keys, a generation, the reservation's holder and type). Not persisted
    across a target restart (PTPL_C=0)."""

    reserved_by: Nexus | None = None
    keys: dict[Nexus, int] = field(default_factory=dict)
    generation: int = 0
    holder: Nexus | None = None
    type: int = 0

    def _holds(self, nexus: Nexus) -> bool:
        if self.holder is None:
            return False
        if self.type in (_WR_EX_AR, _EX_AC_AR):
            return nexus in self.keys  # every registrant is a holder
        return self.holder == nexus

    def conflicts(self, nexus: Nexus, cdb: bytes) -> bool:
        op = cdb[0]
        if op in (0x16, 0x56):  # RESERVE: against the other kind, or another holder
            if self.holder is not None and not self._holds(nexus):
                return True
            return self.reserved_by not in (None, nexus)
        if self.reserved_by is not None and self.reserved_by != nexus:
            return op not in _ALWAYS or op in (0x5E, 0x5F)
        if self.holder is None or op in _ALWAYS or self._holds(nexus):
            return False
        registered = nexus in self.keys
        if self.type in (_WR_EX, _WR_EX_RO, _WR_EX_AR):
            if op in _READS:
                return False
            return not (registered and self.type != _WR_EX)
        # exclusive access: registrants only for the RO/AR types, nobody else
        return not (registered and self.type != _EX_AC)

    def pr_in(self, action: int) -> bytes:
        if action == 0:  # READ KEYS
            keys = b"".join(k.to_bytes(8, "big") for k in self.keys.values())
            return struct.pack(">II", self.generation, len(keys)) + keys
        if action == 1:  # READ RESERVATION
            if self.holder is None:
                return struct.pack(">II", self.generation, 0)
            key = 0 if self.type in (_WR_EX_AR, _EX_AC_AR) else self.keys.get(self.holder, 0)
            return struct.pack(">IIQ4xxB2x", self.generation, 16, key, self.type)
        if action == 2:  # REPORT CAPABILITIES: CRH, TMV, the six types; no PTPL
            return bytes([0, 8, 0x10, 0x80, 0xEA, 0x01, 0, 0])
        if action == 3:  # READ FULL STATUS: each registration, with its iSCSI TransportID
            body = bytearray()
            for (name, isid), key in self.keys.items():
                port = f"{name},i,0x{isid.hex()}".encode() + b"\0"
                port += bytes(-len(port) & 3)
                transport_id = bytes([0x45, 0]) + len(port).to_bytes(2, "big") + port
                holder = self._holds((name, isid))
                body += struct.pack(">Q4xBBxxxxHI", key, 0x01 if holder else 0,
                                    self.type if holder else 0, 1, len(transport_id))
                body += transport_id
            return struct.pack(">II", self.generation, len(body)) + bytes(body)
        raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)

    def pr_out(self, nexus: Nexus, cdb: bytes, params: bytes) -> bool:
        """Apply a PERSISTENT RESERVE OUT; False means RESERVATION CONFLICT."""
        action, kind = cdb[1] & 0x1F, cdb[2] & 0x0F
        if len(params) != 24:
            raise _Check(SenseKey.ILLEGAL_REQUEST, 0x1A)
        key, sa_key = struct.unpack_from(">QQ", params, 0)
        if params[20] & 0x0D:  # SPEC_I_PT, APTPL: not supported
            raise _Check(SenseKey.ILLEGAL_REQUEST, 0x26)
        mine = self.keys.get(nexus)
        if action in (0, 6):  # REGISTER, REGISTER AND IGNORE EXISTING KEY
            if action == 0 and key != (mine or 0):
                return False
            if sa_key:
                self.keys[nexus] = sa_key
            elif mine is not None:
                self._unregister(nexus)
            self.generation = (self.generation + 1) & _MASK
            return True
        if action == 7:  # REGISTER AND MOVE
            raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
        if mine is None or key != mine:
            return False
        if action == 1:  # RESERVE
            if kind not in _PR_TYPES:
                raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
            if self.holder is None:
                self.holder, self.type = nexus, kind
                return True
            return self._holds(nexus) and self.type == kind
        if action == 2:  # RELEASE
            if self.holder is None or not self._holds(nexus):
                return True
            if self.type != kind:
                raise _Check(SenseKey.ILLEGAL_REQUEST, 0x26, 0x04)  # INVALID RELEASE
            self.holder, self.type = None, 0
            return True
        if action == 3:  # CLEAR
            self.keys.clear()
            self.holder, self.type = None, 0
            self.generation = (self.generation + 1) & _MASK
            return True
        if action in (4, 5):  # PREEMPT, PREEMPT AND ABORT
            all_registrants = self.type in (_WR_EX_AR, _EX_AC_AR)
            if self.holder is not None and (
                    (all_registrants and sa_key == 0)
                    or (not all_registrants and sa_key == self.keys.get(self.holder))):
                if kind not in _PR_TYPES:
                    raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
                for other in [n for n, k in self.keys.items()
                              if n != nexus and (sa_key == 0 or k == sa_key)]:
                    del self.keys[other]
                self.holder, self.type = nexus, kind
            else:
                if sa_key == 0:
                    raise _Check(SenseKey.ILLEGAL_REQUEST, 0x26)
                gone = [n for n, k in self.keys.items() if k == sa_key]
                if not gone:
                    return False
                for other in gone:
                    self._unregister(other)
            self.generation = (self.generation + 1) & _MASK
            return True
        raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)

    def _unregister(self, nexus: Nexus) -> None:
        self.keys.pop(nexus, None)
        all_registrants = self.type in (_WR_EX_AR, _EX_AC_AR)
        if (self.holder == nexus and not all_registrants) or (all_registrants
                                                              and not self.keys):
            self.holder, self.type = None, 0
        elif self.holder == nexus and self.keys:
            self.holder = next(iter(self.keys))  # all registrants: another one holds it


# opcode -> (what, CDB size): READ, WRITE, WRITE AND VERIFY, VERIFY in their 6/10/12/16 forms
_BLOCK_IO = {
    0x08: ("read", 6), 0x28: ("read", 10), 0xA8: ("read", 12), 0x88: ("read", 16),
    0x0A: ("write", 6), 0x2A: ("write", 10), 0xAA: ("write", 12), 0x8A: ("write", 16),
    0x2E: ("write", 10), 0xAE: ("write", 12), 0x8E: ("write", 16),
    0x2F: ("verify", 10), 0xAF: ("verify", 12), 0x8F: ("verify", 16),
}


def _residual(edtl: int, length: int) -> dict[str, int | bool]:
    if length > edtl:
        return {"residual": length - edtl, "over": True}
    if edtl > length:
        return {"residual": edtl - length, "under": True}
    return {}


def _vpd_designators(export: Export, lun: int) -> bytes:
    """Device identification (SPC-4): an NAA 6 name for the LUN, a T10 vendor id, the
    target's iSCSI name and the relative port."""
    import hashlib

    digest = hashlib.sha256(f"{export.iqn}:{lun}:{export.serial}".encode()).digest()
    naa = bytearray(16)
    naa[0] = 0x60 | (digest[0] & 0x0F)  # NAA 6 (IEEE Registered Extended), locally derived
    naa[1:] = digest[1:16]
    t10 = _padded("AHVBKUP", 8) + f"{export.iqn}:{lun}".encode()[-200:]
    name = export.iqn.encode()[:251] + b"\0"
    name += bytes(-len(name) & 3)
    out = bytearray()
    out += bytes([0x01, 0x03, 0x00, len(naa)]) + naa  # binary, LU, NAA
    out += bytes([0x02, 0x01, 0x00, len(t10)]) + t10  # ASCII, LU, T10 vendor id
    out += bytes([0x53, 0xA8, 0x00, len(name)]) + name  # iSCSI, UTF-8, target, SCSI name
    out += bytes([0x51, 0x94, 0x00, 4, 0, 0, 0, 1])  # iSCSI, binary, port, relative port 1
    return bytes(out)


_VPD_PAGES = bytes([0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])


def _inquiry(export: Export, lun: int, cdb: bytes, exists: bool) -> bytes:
    alloc = struct.unpack_from(">H", cdb, 3)[0]
    qualifier = 0x00 if exists else 0x7F
    if cdb[1] & 0x02:  # CmdDt is obsolete
        raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
    if cdb[1] & 0x01:
        page = cdb[2]
        bs = export.block_size
        if page == 0x00:
            body = _VPD_PAGES
        elif page == 0x80:
            body = (export.serial or export.iqn)[-32:].encode()
        elif page == 0x83:
            body = _vpd_designators(export, lun)
        elif page == 0xB0:  # Block Limits (SBC-3)
            limits = bytearray(0x3C)
            struct.pack_into(">HII", limits, 2, 1, _MAX_IO // bs, (1 << 20) // bs)
            body = bytes(limits)
        elif page == 0xB1:  # Block Device Characteristics: not rotating
            chars = bytearray(0x3C)
            struct.pack_into(">H", chars, 0, 1)
            body = bytes(chars)
        elif page == 0xB2:  # Logical Block Provisioning: fully provisioned, no UNMAP
            body = bytes(4)
        else:
            raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
        out = bytes([qualifier, page]) + len(body).to_bytes(2, "big") + body
    else:
        if cdb[2]:
            raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
        std = bytearray(96)
        std[0:8] = bytes([qualifier, 0, 0x06, 0x12, len(std) - 5, 0, 0, 0x02])
        std[8:36] = _padded("AHVBKUP", 8) + _padded("SIMULATED VDISK", 16) + _padded("0001", 4)
        # version descriptors: SAM-5, iSCSI, SPC-4, SBC-3
        struct.pack_into(">HHHH", std, 58, 0x00A0, 0x0960, 0x0460, 0x04C0)
        out = bytes(std)
    return out[:alloc]


def _mode_sense(export: Export, blocks: int, cdb: bytes) -> bytes:
    """MODE SENSE(6/10) (SPC-4): the read-write error recovery, caching, control and
    informational exceptions pages; all of them for page 0x3F."""
    six = cdb[0] == 0x1A
    dbd = bool(cdb[1] & 0x08)
    control, code, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    if control == 3:
        raise _Check(SenseKey.ILLEGAL_REQUEST, 0x39)  # SAVING PARAMETERS NOT SUPPORTED
    if subpage not in (0, 0xFF) or (subpage == 0xFF and code != 0x3F):
        raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
    pages = {
        0x01: bytes([0x01, 0x0A]) + bytes(10),
        0x08: bytes([0x08, 0x12]) + bytes(18),
        0x0A: bytes([0x0A, 0x0A, 0, 0x10]) + bytes(8),
        0x1C: bytes([0x1C, 0x0A]) + bytes(10),
    }
    if control == 1:  # changeable values: nothing is
        pages = {k: v[:2] + bytes(len(v) - 2) for k, v in pages.items()}
    if code == 0x3F:
        body = b"".join(pages.values())
    elif code in pages:
        body = pages[code]
    else:
        raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
    descriptor = b"" if dbd else struct.pack(">II", min(blocks, 0xFFFFFFFF), export.block_size)
    wp = 0x80 if export.read_only else 0
    if six:
        head = bytes([3 + len(descriptor) + len(body), 0, wp | 0x10, len(descriptor)])
    else:
        head = struct.pack(">HBBBBH", 6 + len(descriptor) + len(body), 0, wp | 0x10, 0, 0,
                           len(descriptor))
    return head + descriptor + body


# REPORT SUPPORTED OPERATION CODES: (opcode, service action or None) -> CDB usage data (the
# bits of each CDB byte this target evaluates, SPC-4)
_FF4 = b"\xff" * 4
_OPCODES: dict[tuple[int, int | None], bytes] = {
    (0x00, None): bytes([0x00, 0, 0, 0, 0, 0x07]),
    (0x03, None): bytes([0x03, 0, 0, 0, 0xFF, 0x07]),
    (0x08, None): bytes([0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0x07]),
    (0x0A, None): bytes([0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0x07]),
    (0x12, None): bytes([0x12, 0x01, 0xFF, 0xFF, 0xFF, 0x07]),
    (0x1A, None): bytes([0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0x07]),
    (0x25, None): bytes([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0x07]),
    (0x28, None): bytes([0x28, 0x18]) + _FF4 + bytes([0, 0xFF, 0xFF, 0x07]),
    (0x2A, None): bytes([0x2A, 0x18]) + _FF4 + bytes([0, 0xFF, 0xFF, 0x07]),
    (0x2E, None): bytes([0x2E, 0x12]) + _FF4 + bytes([0, 0xFF, 0xFF, 0x07]),
    (0x2F, None): bytes([0x2F, 0x12]) + _FF4 + bytes([0, 0xFF, 0xFF, 0x07]),
    (0x34, None): bytes([0x34, 0]) + _FF4 + bytes([0, 0xFF, 0xFF, 0x07]),
    (0x35, None): bytes([0x35, 0]) + _FF4 + bytes([0, 0xFF, 0xFF, 0x07]),
    (0x41, None): bytes([0x41, 0]) + _FF4 + bytes([0, 0xFF, 0xFF, 0x07]),
    (0x5A, None): bytes([0x5A, 0x08, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0x07]),
    (0x88, None): bytes([0x88, 0x18]) + _FF4 * 3 + bytes([0, 0x07]),
    (0x8A, None): bytes([0x8A, 0x18]) + _FF4 * 3 + bytes([0, 0x07]),
    (0x8B, None): bytes([0x8B, 0x18]) + _FF4 * 3 + bytes([0, 0x07]),
    (0x8E, None): bytes([0x8E, 0x12]) + _FF4 * 3 + bytes([0, 0x07]),
    (0x8F, None): bytes([0x8F, 0x12]) + _FF4 * 3 + bytes([0, 0x07]),
    (0x90, None): bytes([0x90, 0]) + _FF4 * 3 + bytes([0, 0x07]),
    (0x91, None): bytes([0x91, 0]) + _FF4 * 3 + bytes([0, 0x07]),
    (0x93, None): bytes([0x93, 0x01]) + _FF4 * 3 + bytes([0, 0x07]),
    (0x9E, 0x10): bytes([0x9E, 0x10]) + bytes(8) + _FF4 + bytes([0, 0x07]),
    (0x9E, 0x12): bytes([0x9E, 0x12]) + _FF4 * 3 + bytes([0, 0x07]),
    (0xA0, None): bytes([0xA0, 0, 0xFF, 0, 0, 0]) + _FF4 + bytes([0, 0x07]),
    (0xA3, 0x0C): bytes([0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF]) + _FF4 + bytes([0, 0x07]),
    (0xA8, None): bytes([0xA8, 0x18]) + _FF4 * 2 + bytes([0, 0x07]),
    (0xAA, None): bytes([0xAA, 0x18]) + _FF4 * 2 + bytes([0, 0x07]),
    (0xAE, None): bytes([0xAE, 0x12]) + _FF4 * 2 + bytes([0, 0x07]),
    (0xAF, None): bytes([0xAF, 0x12]) + _FF4 * 2 + bytes([0, 0x07]),
    (0x16, None): bytes([0x16, 0, 0, 0, 0, 0x07]),
    (0x17, None): bytes([0x17, 0, 0, 0, 0, 0x07]),
    **{(0x5E, sa): bytes([0x5E, sa, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07]) for sa in range(4)},
    **{(0x5F, sa): bytes([0x5F, sa, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x07])
       for sa in (0, 1, 2, 3, 4, 5, 6)},
}
_TIMEOUTS = bytes([0, 10]) + bytes(10)  # command timeouts descriptor: none advertised


def _supported_opcodes(cdb: bytes) -> bytes:
    """REPORT SUPPORTED OPERATION CODES (SPC-4): all commands, or one."""
    rctd = bool(cdb[2] & 0x80)
    options = cdb[2] & 0x07
    opcode = cdb[3]
    action = struct.unpack_from(">H", cdb, 4)[0]
    alloc = struct.unpack_from(">I", cdb, 6)[0]
    with_actions = {op for op, sa in _OPCODES if sa is not None}
    if options == 0:
        body = bytearray()
        for (op, sa), usage in sorted(_OPCODES.items(), key=lambda kv: (kv[0][0],
                                                                        kv[0][1] or 0)):
            flags = (0x02 if rctd else 0) | (0x01 if sa is not None else 0)
            body += struct.pack(">BxHxBH", op, sa or 0, flags, len(usage))
            if rctd:
                body += _TIMEOUTS
        out = len(body).to_bytes(4, "big") + bytes(body)
    else:
        if options == 1:
            if opcode in with_actions:
                raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
            key: tuple[int, int | None] = (opcode, None)
        elif options == 2:
            if opcode not in with_actions:
                raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
            key = (opcode, action)
        elif options == 3:
            key = (opcode, action if opcode in with_actions else None)
        else:
            raise _Check(SenseKey.ILLEGAL_REQUEST, 0x24)
        usage = _OPCODES.get(key)
        if usage is None:
            out = bytes([0, 0x01, 0, 0])  # SUPPORT 001b: not supported
        else:
            out = (bytes([0, (0x80 if rctd else 0) | 0x03]) + len(usage).to_bytes(2, "big")
                   + usage + (_TIMEOUTS if rctd else b""))
    return out[:alloc]
