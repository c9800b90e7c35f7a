"""The iSCSI session: login, SCSI commands in flight, reconnect on loss (ErrorRecoveryLevel 0).

One TCP connection at a time. A receive task per connection reads each PDU header into a reused
buffer and each Data-In segment straight into the caller's memoryview at its BufferOffset. Every
command runs within the target's CmdSN window and a queue-depth limit. When the connection dies
(reset, EOF, digest error, protocol error, a command timeout), the commands on it fail over to a
new connection that reinstates the session (same ISID, TSIH 0), and are sent again: a READ is
repeated whole into the same buffer, so what the caller gets is byte-exact or an error.
"""

from __future__ import annotations

__all__ = ["DiscoveredTarget", "IscsiSession", "discover"]

import logging
import secrets
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import trio

from ahvbackup.core.plugins import Hooks

from . import scsi
from ._wire import (
    ConnectionClosed,
    close_socket,
    frame,
    open_socket,
    recv_exact,
    recv_header,
    recv_segment,
    send_all,
)
from .errors import (
    IscsiCommandError,
    IscsiConnectionError,
    IscsiDigestError,
    IscsiError,
    IscsiLoginError,
    IscsiProtocolError,
)
from .login import ChapCredentials, LoginExchange, Offer, SessionParams
from .pdu import (
    BHS_LEN,
    NO_TAG,
    Op,
    crc32c,
    data_out,
    decode_text,
    encode_text,
    login_request,
    logout_request,
    nop_out,
    scsi_command,
    serial_lt,
    text_request,
)

log = logging.getLogger("ahvbackup.datapath.iscsi")

_MASK = 0xFFFFFFFF
_REDIRECTS = 4
_UA_RETRIES = 8
_BUSY_RETRIES = 20


def _portal_label(portal: tuple[str, int]) -> str:
    host, port = portal
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_address(value: str, default_port: int = 3260) -> tuple[str, int, int | None]:
    """TargetAddress (`host[:port][,tpgt]`, IPv6 in brackets) -> (host, port, tpgt)."""
    addr, _, tpgt = value.partition(",")
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
    else:
        host, _, p = addr.rpartition(":")
        if not host:
            host, p = p, ""
        port = int(p) if p else default_port
    return host, port, int(tpgt) if tpgt.isdigit() else None


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one error to raise from a nursery's exception group: its only member, or the first
    IscsiError when all members are (sibling pieces failing for the same cause)."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(reversed(exc.exceptions))
        else:
            leaves.append(exc)
    if len(leaves) == 1:
        return leaves[0]
    if leaves and all(isinstance(e, IscsiError) for e in leaves):
        return leaves[0]
    return None


class _Lost(Exception):
    """Internal: the connection a command ran on died; the command may run again elsewhere."""

    def __init__(self, error: IscsiError) -> None:
        super().__init__(str(error))
        self.error = error


class _Redirect(Exception):
    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"{host}:{port}")
        self.portal = (host, port)


@dataclass(eq=False, slots=True)
class _Task:
    itt: int
    buf: memoryview | None = None
    done: trio.Event = field(default_factory=trio.Event)
    error: IscsiError | None = None
    status: int = 0
    response: int = 0
    flags: int = 0
    residual: int = 0
    received: int = 0
    data_sn: int = 0
    sense: bytes = b""
    sent: bool = False
    r2t_send: trio.MemorySendChannel[tuple[int, int, int]] | None = None
    r2t_sn: int = 0


@dataclass(frozen=True, slots=True)
class _LoginResult:
    sock: socket.socket
    params: SessionParams
    tsih: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    cmd_sn: int
    portal: tuple[str, int]


async def _login(
    portal: tuple[str, int], *, isid: bytes, exchange: LoginExchange,
) -> _LoginResult:
    """Connect and log in, following redirects; returns the socket in Full Feature Phase."""
    for _hop in range(_REDIRECTS + 1):
        label = _portal_label(portal)
        exchange.portal = label
        sock = await open_socket(portal[0], portal[1], label=label)
        try:
            return await _login_on(sock, portal, isid=isid, exchange=exchange)
        except _Redirect as moved:
            close_socket(sock)
            log.info("iscsi: %s redirected from %s to %s", exchange.label, label,
                     _portal_label(moved.portal))
            portal = moved.portal
        except BaseException:
            close_socket(sock)
            raise
    raise IscsiLoginError(
        f"iSCSI login to {exchange.label}: more than {_REDIRECTS} redirects",
        target=exchange.label, portal=_portal_label(portal), step="redirect")


async def _login_on(
    sock: socket.socket, portal: tuple[str, int], *, isid: bytes, exchange: LoginExchange,
) -> _LoginResult:
    label = _portal_label(portal)
    itt = secrets.randbelow(_MASK)
    cmd_sn = 1
    exp_stat_sn = 0
    hbuf = bytearray(BHS_LEN)
    step = exchange.first()
    tsih = 0
    while True:
        body = encode_text(step.keys)
        hdr = login_request(transit=step.transit, csg=step.csg, nsg=step.nsg, isid=isid, tsih=0,
                            itt=itt, cid=0, cmd_sn=cmd_sn, exp_stat_sn=exp_stat_sn,
                            dsl=len(body))
        data = bytearray()
        try:
            await send_all(sock, frame(hdr, body, header_digest=False, data_digest=False))
            while True:
                await recv_header(sock, memoryview(hbuf), header_digest=False, label=label)
                op = hbuf[0] & 0x3F
                dsl = int.from_bytes(hbuf[5:8], "big")
                if op != Op.LOGIN_RESPONSE:
                    raise IscsiProtocolError(
                        f"iSCSI login to {exchange.label} at {label}: target sent "
                        f"{Op.NAMES.get(op, hex(op))} during {exchange.step_name()}")
                data += await recv_segment(sock, dsl, data_digest=False, label=label)
                status_class, status_detail = hbuf[36], hbuf[37]
                stat_sn = struct.unpack_from(">I", hbuf, 24)[0]
                exp_stat_sn = (stat_sn + 1) & _MASK
                if status_class or not hbuf[1] & 0x40:
                    break
                more = login_request(transit=False, csg=step.csg, nsg=step.nsg, isid=isid,
                                     tsih=0, itt=itt, cid=0, cmd_sn=cmd_sn,
                                     exp_stat_sn=exp_stat_sn, dsl=0)
                await send_all(sock, [more])
        except ConnectionClosed as err:
            raise IscsiConnectionError(
                f"iSCSI login to {exchange.label} at {label}: connection lost during "
                f"{exchange.step_name()}: {err}") from err
        if status_class == 0x01:
            address = dict(decode_text(data)).get("TargetAddress")
            if not address:
                raise exchange.refused(status_class, status_detail)
            host, port, _ = _parse_address(address)
            raise _Redirect(host, port)
        if status_class:
            raise exchange.refused(status_class, status_detail)
        try:
            keys = decode_text(data)
        except ValueError as err:
            raise IscsiProtocolError(
                f"iSCSI login to {exchange.label} at {label}: unreadable keys: {err}") from err
        flags = hbuf[1]
        tsih = struct.unpack_from(">H", hbuf, 14)[0]
        nxt = exchange.feed(csg=(flags >> 2) & 3, nsg=flags & 3, transit=bool(flags & 0x80),
                            keys=keys)
        if nxt is None:
            exp_cmd_sn, max_cmd_sn = struct.unpack_from(">II", hbuf, 28)
            return _LoginResult(sock=sock, params=exchange.params, tsih=tsih,
                                stat_sn=exp_stat_sn, exp_cmd_sn=exp_cmd_sn,
                                max_cmd_sn=max_cmd_sn, cmd_sn=exp_cmd_sn, portal=portal)
        step = nxt


class _Connection:
    """One logged-in TCP connection in Full Feature Phase and the commands running on it."""

    def __init__(self, result: _LoginResult, *, label: str, nursery: trio.Nursery) -> None:
        self.sock = result.sock
        self.params = result.params
        self.label = label
        self.nursery = nursery
        self.hd = result.params.header_digest
        self.dd = result.params.data_digest
        self.exp_stat_sn = result.stat_sn
        self.cmd_sn = result.cmd_sn
        self.exp_cmd_sn = result.exp_cmd_sn
        self.max_cmd_sn = result.max_cmd_sn
        self.tasks: dict[int, _Task] = {}
        self.error: IscsiError | None = None
        self.receiving: _Task | None = None
        self.send_lock = trio.StrictFIFOLock()
        self.cmd_lock = trio.StrictFIFOLock()
        self._window = trio.Event()
        self._itt = secrets.randbelow(1 << 30)
        self._scratch = bytearray(max(result.params.max_recv_data_segment_length, 8192))
        self.unit_attention_sense: list[bytes] = []
        self.closed = trio.Event()

    # -- bookkeeping ----------------------------------------------------------------------------

    def new_task(self, buf: memoryview | None = None) -> _Task:
        self._itt = (self._itt + 1) & _MASK
        if self._itt == NO_TAG:
            self._itt = 0
        task = _Task(itt=self._itt, buf=buf)
        self.tasks[task.itt] = task
        return task

    def fail(self, error: IscsiError) -> None:
        """Mark the connection dead: close it and wake every command on it with `error`."""
        if self.error is not None:
            return
        self.error = error
        close_socket(self.sock)
        for task in self.tasks.values():
            task.error = error
            task.done.set()
            if task.r2t_send is not None:
                task.r2t_send.close()
        self.tasks.clear()
        self._window.set()

    def _advance(self, exp_cmd_sn: int, max_cmd_sn: int) -> None:
        # RFC 7143 §4.2.2.1: ignore a MaxCmdSN below ExpCmdSN-1; only ever move forward
        if serial_lt(max_cmd_sn, (exp_cmd_sn - 1) & _MASK):
            return
        if serial_lt(self.exp_cmd_sn, exp_cmd_sn):
            self.exp_cmd_sn = exp_cmd_sn
        if serial_lt(self.max_cmd_sn, max_cmd_sn):
            self.max_cmd_sn = max_cmd_sn
            self._window.set()

    def _status_seen(self, stat_sn: int) -> None:
        nxt = (stat_sn + 1) & _MASK
        if serial_lt(self.exp_stat_sn, nxt):
            self.exp_stat_sn = nxt

    async def wait_window(self) -> None:
        """Block until our next CmdSN is inside [ExpCmdSN, MaxCmdSN]."""
        while serial_lt(self.max_cmd_sn, self.cmd_sn):
            if self.error is not None:
                raise _Lost(self.error)
            self._window = trio.Event()
            await self._window.wait()
        if self.error is not None:
            raise _Lost(self.error)

    async def send(self, hdr: bytearray, data: bytes | bytearray | memoryview | None = None) \
            -> None:
        async with self.send_lock:
            if self.error is not None:
                raise _Lost(self.error)
            struct.pack_into(">I", hdr, 28, self.exp_stat_sn)
            try:
                await send_all(self.sock, frame(hdr, data, header_digest=self.hd,
                                                data_digest=self.dd))
            except ConnectionClosed as err:
                self.fail(IscsiConnectionError(
                    f"iSCSI {self.label}: connection lost while sending: {err}"))
                raise _Lost(self.error or IscsiConnectionError(str(err))) from err

    async def send_command(self, task: _Task, hdr: bytearray,
                           data: memoryview | None = None) -> None:
        """Send a non-immediate command in CmdSN order, within the window."""
        async with self.cmd_lock:
            await self.wait_window()
            struct.pack_into(">I", hdr, 24, self.cmd_sn)
            self.cmd_sn = (self.cmd_sn + 1) & _MASK
            task.sent = True
            await self.send(hdr, data)

    # -- receiving ------------------------------------------------------------------------------

    async def receive_loop(self) -> None:
        try:
            await self._receive()
        except ConnectionClosed as err:
            self.fail(IscsiConnectionError(f"iSCSI {self.label}: connection lost: {err}"))
        except IscsiError as err:
            self.fail(err)
        finally:
            self.closed.set()

    def _protocol(self, why: str) -> IscsiProtocolError:
        return IscsiProtocolError(f"iSCSI {self.label}: {why}")

    async def _receive(self) -> None:
        sock = self.sock
        hd, dd = self.hd, self.dd
        hbuf = bytearray(BHS_LEN + (4 if hd else 0))
        hview = memoryview(hbuf)
        tail = bytearray(8)
        tview = memoryview(tail)
        scratch = memoryview(self._scratch)
        max_seg = len(self._scratch)
        unpack_sn = struct.Struct(">IIIII").unpack_from
        unpack_data = struct.Struct(">III").unpack_from
        since_checkpoint = 0
        while True:
            await recv_header(sock, hview, header_digest=hd, label=self.label)
            op = hbuf[0] & 0x3F
            dsl = (hbuf[5] << 16) | (hbuf[6] << 8) | hbuf[7]
            itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn = unpack_sn(hbuf, 16)
            self._advance(exp_cmd_sn, max_cmd_sn)
            if op == Op.DATA_IN:
                task = self.tasks.get(itt)
                if task is None:
                    raise self._protocol(f"Data-In for unknown task 0x{itt:08x}")
                data_sn, offset, residual = unpack_data(hbuf, 36)
                if data_sn != task.data_sn:
                    raise self._protocol(f"Data-In DataSN {data_sn}, expected {task.data_sn}")
                task.data_sn += 1
                if dsl:
                    if dsl > max_seg:
                        raise self._protocol(f"Data-In segment of {dsl} bytes exceeds our "
                                             f"MaxRecvDataSegmentLength {max_seg}")
                    buf = task.buf
                    if buf is None:
                        seg = scratch[:dsl]
                    elif offset + dsl > len(buf):
                        raise self._protocol(
                            f"Data-In of {dsl} bytes at offset {offset} overruns the "
                            f"{len(buf)}-byte buffer")
                    else:
                        seg = buf[offset : offset + dsl]
                    self.receiving = task
                    await recv_exact(sock, seg)
                    self.receiving = None
                    pad = -dsl & 3
                    extra = pad + (4 if dd else 0)
                    if extra:
                        await recv_exact(sock, tview[:extra])
                        if dd:
                            crc = crc32c(seg)
                            if pad:
                                crc = crc32c(tview[:pad], crc)
                            if crc != int.from_bytes(tview[pad:extra], "little"):
                                raise IscsiDigestError(
                                    f"iSCSI {self.label}: data digest mismatch in Data-In "
                                    f"(PDU corrupted)")
                    task.received += dsl
                flags = hbuf[1]
                if flags & 0x01:
                    self._status_seen(stat_sn)
                    task.flags = flags
                    task.status = hbuf[3]
                    task.residual = residual
                    self._complete(task)
                    since_checkpoint = 99
            else:
                data = await recv_segment(sock, dsl, data_digest=dd, label=self.label)
                self._dispatch(op, hbuf, itt, ttt, stat_sn, data)
                since_checkpoint = 99
            since_checkpoint += 1
            if since_checkpoint >= 8:
                since_checkpoint = 0
                await trio.lowlevel.checkpoint()

    def _complete(self, task: _Task) -> None:
        self.tasks.pop(task.itt, None)
        task.done.set()
        if task.r2t_send is not None:
            task.r2t_send.close()

    def _dispatch(self, op: int, hbuf: bytearray, itt: int, ttt: int, stat_sn: int,
                  data: bytes) -> None:
        if op == Op.SCSI_RESPONSE:
            self._status_seen(stat_sn)
            task = self.tasks.get(itt)
            if task is None:
                raise self._protocol(f"SCSI Response for unknown task 0x{itt:08x}")
            task.flags, task.response, task.status = hbuf[1], hbuf[2], hbuf[3]
            task.residual = struct.unpack_from(">I", hbuf, 44)[0]
            if len(data) >= 2:
                n = int.from_bytes(data[:2], "big")
                task.sense = data[2 : 2 + n]
            self._complete(task)
        elif op == Op.R2T:
            task = self.tasks.get(itt)
            if task is None or task.r2t_send is None:
                raise self._protocol(f"R2T for unknown or non-write task 0x{itt:08x}")
            r2t_sn, offset, length = struct.unpack_from(">III", hbuf, 36)
            if r2t_sn != task.r2t_sn:
                raise self._protocol(f"R2TSN {r2t_sn}, expected {task.r2t_sn}")
            task.r2t_sn += 1
            try:
                task.r2t_send.send_nowait((ttt, offset, length))
            except trio.WouldBlock:
                raise self._protocol("more outstanding R2Ts than MaxOutstandingR2T") from None
        elif op == Op.NOP_IN:
            if itt != NO_TAG:
                self._status_seen(stat_sn)
                task = self.tasks.get(itt)
                if task is not None:
                    self._complete(task)
            if ttt != NO_TAG:
                self.nursery.start_soon(self._answer_ping, ttt, bytes(hbuf[8:16]), data)
        elif op in (Op.LOGOUT_RESPONSE, Op.TEXT_RESPONSE, Op.TASK_MGMT_RESPONSE):
            self._status_seen(stat_sn)
            task = self.tasks.get(itt)
            if task is not None:
                task.response = hbuf[2]
                task.sense = data
                self._complete(task)
        elif op == Op.ASYNC:
            self._status_seen(stat_sn)
            event = hbuf[36]
            if event == 0:
                if len(data) >= 2:
                    n = int.from_bytes(data[:2], "big")
                    self.unit_attention_sense.append(data[2 : 2 + n])
            elif event in (1, 2, 3):
                raise IscsiConnectionError(
                    f"iSCSI {self.label}: target asked us to leave (async event {event})")
            else:
                log.debug("iscsi: %s: ignoring async event %d", self.label, event)
        elif op == Op.REJECT:
            self._status_seen(stat_sn)
            reason = hbuf[2]
            bad_itt = struct.unpack_from(">I", data, 16)[0] if len(data) >= BHS_LEN else None
            task = self.tasks.get(bad_itt) if bad_itt is not None else None
            which = f", task 0x{bad_itt:08x}" if task is not None and bad_itt is not None else ""
            raise self._protocol(f"target rejected a PDU (reason 0x{reason:02x}{which})")
        else:
            raise self._protocol(f"unexpected {Op.NAMES.get(op, hex(op))}")

    async def _answer_ping(self, ttt: int, lun: bytes, data: bytes) -> None:
        hdr = nop_out(itt=NO_TAG, ttt=ttt, cmd_sn=self.cmd_sn, exp_stat_sn=0, lun=lun,
                      dsl=len(data))
        with suppress(_Lost):
            await self.send(hdr, data)


@dataclass(frozen=True, slots=True)
class DiscoveredTarget:
    """One target a portal reported to SendTargets, with its portals (host, port, tpgt)."""

    iqn: str
    portals: tuple[tuple[str, int, int | None], ...]


async def discover(
    portal: tuple[str, int], *, initiator_iqn: str, chap: ChapCredentials | None = None,
    mutual: ChapCredentials | None = None, timeout: float = 30.0,
) -> list[DiscoveredTarget]:
    """SendTargets discovery (RFC 7143 §13.3): which targets does this portal offer?"""
    label = _portal_label(portal)
    exchange = LoginExchange(initiator_iqn=initiator_iqn, target_iqn=None, portal=label,
                             chap=chap, mutual=mutual)
    try:
        with trio.fail_after(timeout):
            result = await _login(portal, isid=_new_isid(), exchange=exchange)
            try:
                return await _send_targets(result, label=label)
            finally:
                close_socket(result.sock)
    except trio.TooSlowError:
        raise IscsiConnectionError(
            f"iSCSI discovery at {label}: no answer within {timeout:g} s") from None


async def _send_targets(result: _LoginResult, *, label: str) -> list[DiscoveredTarget]:
    sock = result.sock
    hd, dd = result.params.header_digest, result.params.data_digest
    cmd_sn = result.cmd_sn
    exp_stat_sn = result.stat_sn
    itt = 1
    ttt = NO_TAG
    body: bytes = encode_text([("SendTargets", "All")])
    text = bytearray()
    hbuf = bytearray(BHS_LEN + (4 if hd else 0))
    try:
        while True:
            hdr = text_request(itt=itt, ttt=ttt, cmd_sn=cmd_sn, exp_stat_sn=exp_stat_sn,
                               dsl=len(body))
            await send_all(sock, frame(hdr, body, header_digest=hd, data_digest=dd))
            cmd_sn = (cmd_sn + 1) & _MASK
            await recv_header(sock, memoryview(hbuf), header_digest=hd, label=label)
            dsl = int.from_bytes(hbuf[5:8], "big")
            data = await recv_segment(sock, dsl, data_digest=dd, label=label)
            op = hbuf[0] & 0x3F
            if op == Op.REJECT:
                raise IscsiProtocolError(f"iSCSI discovery at {label}: SendTargets rejected "
                                         f"(reason 0x{hbuf[2]:02x})")
            if op != Op.TEXT_RESPONSE:
                raise IscsiProtocolError(f"iSCSI discovery at {label}: target sent "
                                         f"{Op.NAMES.get(op, hex(op))} to SendTargets")
            exp_stat_sn = (struct.unpack_from(">I", hbuf, 24)[0] + 1) & _MASK
            text += data
            if not hbuf[1] & 0x40:  # C bit clear: the answer is complete
                break
            ttt = struct.unpack_from(">I", hbuf, 20)[0]
            body = b""
        logout = logout_request(itt=itt + 1, cid=0, cmd_sn=cmd_sn, exp_stat_sn=exp_stat_sn)
        await send_all(sock, frame(logout, None, header_digest=hd, data_digest=dd))
        await recv_header(sock, memoryview(hbuf), header_digest=hd, label=label)
        await recv_segment(sock, int.from_bytes(hbuf[5:8], "big"), data_digest=dd, label=label)
    except ConnectionClosed as err:
        raise IscsiConnectionError(f"iSCSI discovery at {label}: connection lost: {err}") \
            from err
    targets: list[DiscoveredTarget] = []
    current: str | None = None
    portals: list[tuple[str, int, int | None]] = []
    for key, value in decode_text(text):
        if key == "TargetName":
            if current is not None:
                targets.append(DiscoveredTarget(current, tuple(portals)))
            current, portals = value, []
        elif key == "TargetAddress" and current is not None:
            portals.append(_parse_address(value, result.portal[1]))
    if current is not None:
        targets.append(DiscoveredTarget(current, tuple(portals)))
    return targets


def _new_isid() -> bytes:
    """ISID of type 'random' (RFC 7143 §11.12.5): 0x80, three random bytes, qualifier 0."""
    return bytes([0x80]) + secrets.token_bytes(3) + bytes(2)


class IscsiSession:
    """A logged-in session to one LUN of one target. Create it with `IscsiSession.connect`.

    `read_into` and `write` take byte offsets and lengths that are multiples of the block size;
    they split large requests into `max_transfer` pieces and keep up to `queue_depth` commands
    in flight, so a caller may simply ask for many MiB at once or run many reads concurrently.
    """

    def __init__(
        self,
        *,
        portal: tuple[str, int],
        target_iqn: str,
        initiator_iqn: str,
        chap: ChapCredentials | None,
        mutual: ChapCredentials | None,
        digests: bool,
        lun: int | None,
        queue_depth: int,
        max_transfer: int,
        max_recv_segment: int,
        reconnect_attempts: int,
        command_timeout: float,
        login_timeout: float,
        nursery: trio.Nursery,
    ) -> None:
        if queue_depth < 1:
            raise ValueError("queue_depth must be at least 1")
        self.portal = portal
        self.target_iqn = target_iqn
        self.initiator_iqn = initiator_iqn
        self.label = f"{target_iqn} at {_portal_label(portal)}"
        self._chap = chap
        self._mutual = mutual
        self._offer = Offer(digests=digests, max_recv_data_segment_length=max_recv_segment)
        self.lun = lun if lun is not None else -1
        self.queue_depth = queue_depth
        self.max_transfer = max_transfer
        self.reconnect_attempts = reconnect_attempts
        self.command_timeout = command_timeout
        self.login_timeout = login_timeout
        self._nursery = nursery
        self._isid = _new_isid()
        self._slots = trio.Semaphore(queue_depth)
        self._reconnect_lock = trio.Lock()
        self._conn: _Connection | None = None
        self._broken: IscsiError | None = None
        self.reconnects = 0
        self.connection_errors: list[str] = []
        self.unit_attentions: list[scsi.Sense] = []
        self.capacity: scsi.Capacity | None = None

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        *,
        portal: tuple[str, int],
        target_iqn: str,
        initiator_iqn: str,
        chap: ChapCredentials | None = None,
        mutual: ChapCredentials | None = None,
        digests: bool = False,
        lun: int | None = None,
        queue_depth: int = 4,
        max_transfer: int = 1 << 20,
        max_recv_segment: int = 1 << 18,
        reconnect_attempts: int = 4,
        command_timeout: float = 60.0,
        login_timeout: float = 30.0,
    ) -> AsyncIterator[IscsiSession]:
        """Log in, find the LUN (the first disk LUN unless `lun` is given), read its capacity;
        log out on exit. `mutual` is the target's own CHAP account, checked by us."""
        try:
            async with trio.open_nursery() as nursery:
                session = cls(
                    portal=portal, target_iqn=target_iqn, initiator_iqn=initiator_iqn, chap=chap,
                    mutual=mutual, digests=digests, lun=lun, queue_depth=queue_depth,
                    max_transfer=max_transfer, max_recv_segment=max_recv_segment,
                    reconnect_attempts=reconnect_attempts, command_timeout=command_timeout,
                    login_timeout=login_timeout, nursery=nursery,
                )
                try:
                    try:
                        session._conn = await session._open()
                        if session.lun < 0:
                            session.lun = await session._find_disk_lun()
                        await session.test_unit_ready()
                        await session.read_capacity()
                    except IscsiError:
                        Hooks.current().metric(name="iscsi_attach_failures", value=1, labels={})
                        raise
                    yield session
                finally:
                    with trio.CancelScope(shield=True):
                        await session._logout()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            inner = _unwrap(group)
            if inner is None:
                raise
            raise inner from None

    # -- connection management ------------------------------------------------------------------

    @property
    def params(self) -> SessionParams:
        """The values negotiated at the last login."""
        if self._conn is None:
            raise IscsiConnectionError(f"iSCSI {self.label}: not connected")
        return self._conn.params

    async def _open(self) -> _Connection:
        exchange = LoginExchange(initiator_iqn=self.initiator_iqn, target_iqn=self.target_iqn,
                                 portal=_portal_label(self.portal), chap=self._chap,
                                 mutual=self._mutual, offer=self._offer)
        try:
            with trio.fail_after(self.login_timeout):
                result = await _login(self.portal, isid=self._isid, exchange=exchange)
        except (IscsiError, trio.TooSlowError) as err:
            Hooks.current().metric(name="iscsi_logins", value=1, labels={"outcome": "failed"})
            if isinstance(err, IscsiError):
                raise
            raise IscsiConnectionError(
                f"iSCSI login to {self.label}: no answer within {self.login_timeout:g} s "
                f"({exchange.step_name()})") from None
        Hooks.current().metric(name="iscsi_logins", value=1, labels={"outcome": "ok"})
        conn = _Connection(result, label=self.label, nursery=self._nursery)
        self._nursery.start_soon(conn.receive_loop)
        log.debug("iscsi: logged in to %s (tsih %d, %s)", self.label, result.tsih, result.params)
        return conn

    async def _current(self) -> _Connection:
        if self._broken is not None:
            raise self._broken
        conn = self._conn
        if conn is None:
            raise IscsiConnectionError(f"iSCSI {self.label}: session is closed")
        if conn.error is not None:
            await self._reconnect(conn)
            return await self._current()
        return conn

    async def _reconnect(self, dead: _Connection) -> None:
        """Replace a dead connection by a fresh login (session reinstatement); once per loss."""
        async with self._reconnect_lock:
            if self._broken is not None:
                raise self._broken
            if self._conn is not dead and self._conn is not None and self._conn.error is None:
                return
            if dead.error is None:
                dead.fail(IscsiConnectionError(f"iSCSI {self.label}: connection abandoned"))
            cause = dead.error
            delay = 0.2
            last: IscsiError | None = cause
            for attempt in range(1, self.reconnect_attempts + 1):
                log.warning("iscsi: %s: reconnecting (attempt %d) after: %s", self.label,
                            attempt, last)
                try:
                    self._conn = await self._open()
                except IscsiLoginError as err:
                    if err.status_class == 0x03:  # target error: may be transient
                        last = err
                    else:
                        self._broken = err
                        raise
                except IscsiConnectionError as err:
                    last = err
                else:
                    self.reconnects += 1
                    Hooks.current().metric(name="iscsi_reconnects", value=1, labels={})
                    self.connection_errors.append(str(cause))
                    return
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
            self._broken = IscsiConnectionError(
                f"iSCSI {self.label}: could not reconnect after {self.reconnect_attempts} "
                f"attempts; last error: {last}")
            raise self._broken

    async def _logout(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or conn.error is not None:
            return
        with trio.move_on_after(5):
            task = conn.new_task()
            hdr = logout_request(itt=task.itt, cid=0, cmd_sn=conn.cmd_sn, exp_stat_sn=0)
            try:
                await conn.send(hdr)
                await task.done.wait()
            except _Lost:
                pass
        conn.fail(IscsiConnectionError(f"iSCSI {self.label}: logged out"))

    # -- commands -------------------------------------------------------------------------------

    async def _run(self, conn: _Connection, cdb: bytes, *, lun: int, what: str,
                   into: memoryview | None, write: memoryview | None) -> _Task:
        """One attempt of one command on one connection."""
        task = conn.new_task(into)
        edtl = len(into) if into is not None else len(write) if write is not None else 0
        immediate: memoryview | None = None
        unsolicited = 0
        p = conn.params
        if write is not None:
            task.r2t_send, r2t_recv = trio.open_memory_channel[tuple[int, int, int]](
                max(4, p.max_outstanding_r2t * 2))
            if p.immediate_data:
                immediate = write[: min(len(write), p.first_burst_length,
                                        p.max_xmit_data_segment_length)]
            if not p.initial_r2t:
                unsolicited = min(len(write), p.first_burst_length)
        sent_imm = len(immediate) if immediate is not None else 0
        hdr = scsi_command(lun=lun, itt=task.itt, edtl=edtl, cmd_sn=0, exp_stat_sn=0, cdb=cdb,
                           read=into is not None, write=write is not None,
                           final=unsolicited <= sent_imm, dsl=sent_imm)
        try:
            await conn.send_command(task, hdr, immediate)
            if write is not None:
                if unsolicited > sent_imm:
                    await self._data_out(conn, task, lun, write, NO_TAG, sent_imm,
                                         unsolicited - sent_imm)
                async with r2t_recv:
                    async for ttt, offset, length in r2t_recv:
                        if offset + length > len(write):
                            conn.fail(IscsiProtocolError(
                                f"iSCSI {self.label}: R2T for {length} bytes at {offset} is "
                                f"past the {len(write)}-byte write"))
                            break
                        await self._data_out(conn, task, lun, write, ttt, offset, length)
            await task.done.wait()
        finally:
            if not task.done.is_set():
                task.buf = None  # late Data-In goes to scratch, never into the caller's buffer
                if not task.sent:
                    conn.tasks.pop(task.itt, None)
                elif conn.receiving is task or write is not None:
                    conn.fail(self._abandoned(what))
        if task.error is not None:
            raise _Lost(task.error)
        return task

    async def _data_out(self, conn: _Connection, task: _Task, lun: int, data: memoryview,
                        ttt: int, offset: int, length: int) -> None:
        seg = conn.params.max_xmit_data_segment_length
        end = offset + length
        data_sn = 0
        while offset < end:
            n = min(seg, end - offset)
            hdr = data_out(lun=lun, itt=task.itt, ttt=ttt, exp_stat_sn=0, data_sn=data_sn,
                           offset=offset, dsl=n, final=offset + n >= end)
            await conn.send(hdr, data[offset : offset + n])
            offset += n
            data_sn += 1

    async def _execute(self, cdb: bytes, *, what: str, lun: int | None = None,
                       into: memoryview | None = None,
                       write: memoryview | None = None) -> _Task:
        """Run a command to completion: reconnect and resend on connection loss, absorb unit
        attentions, wait out BUSY; raise IscsiCommandError for any other non-GOOD status."""
        the_lun = self.lun if lun is None else lun
        losses = ua = busy = 0
        while True:
            conn = await self._current()
            task: _Task | None = None
            try:
                with trio.move_on_after(self.command_timeout) as scope:
                    task = await self._run(conn, cdb, lun=the_lun, what=what, into=into,
                                           write=write)
                if scope.cancelled_caught:
                    conn.fail(IscsiConnectionError(
                        f"iSCSI {self.label}: {what} got no answer within "
                        f"{self.command_timeout:g} s"))
                    raise _Lost(conn.error or IscsiConnectionError("timeout"))  # noqa: TRY301 - same recovery as a lost connection
            except _Lost as lost:
                losses += 1
                if losses > self.reconnect_attempts:
                    kind = type(lost.error) if isinstance(lost.error, IscsiProtocolError) \
                        else IscsiConnectionError
                    raise kind(
                        f"iSCSI {self.label}: {what} failed: {lost.error} (gave up after "
                        f"{losses - 1} reconnects)") from lost.error
                await self._reconnect(conn)
                continue
            assert task is not None
            self._collect_async_events(conn)
            if task.response:
                raise IscsiCommandError(
                    f"iSCSI {self.label} LUN {the_lun}: {what}: target failure (iSCSI "
                    f"response 0x{task.response:02x})", status=task.status)
            if task.status == scsi.Status.GOOD:
                return task
            sense = scsi.parse_sense(task.sense)
            if task.status == scsi.Status.CHECK_CONDITION and sense is not None \
                    and sense.unit_attention and ua < _UA_RETRIES:
                ua += 1
                self._unit_attention(sense)
                continue
            if task.status in (scsi.Status.BUSY, scsi.Status.TASK_SET_FULL) \
                    and busy < _BUSY_RETRIES:
                busy += 1
                await trio.sleep(min(0.05 * busy, 1.0))
                continue
            name = scsi.Status.NAMES.get(task.status, f"status 0x{task.status:02x}")
            raise IscsiCommandError(
                f"iSCSI {self.label} LUN {the_lun}: {what} failed: {name}"
                + (f", {sense}" if sense is not None else ""),
                status=task.status, sense=sense)

    def _abandoned(self, what: str) -> IscsiConnectionError:
        """Why a connection is dropped under a command that stopped waiting for its answer."""
        scope_deadline = trio.current_effective_deadline()
        if trio.current_time() >= scope_deadline:
            return IscsiConnectionError(f"iSCSI {self.label}: {what} got no answer within "
                                        f"{self.command_timeout:g} s")
        return IscsiConnectionError(f"iSCSI {self.label}: {what} was cancelled while its data "
                                    "was moving")

    def _unit_attention(self, sense: scsi.Sense) -> None:
        log.info("iscsi: %s: unit attention: %s", self.label, sense)
        self.unit_attentions.append(sense)
        if (sense.asc, sense.ascq) == (0x2A, 0x09):
            self.capacity = None  # capacity changed: the next read_capacity refreshes it

    def _collect_async_events(self, conn: _Connection) -> None:
        while conn.unit_attention_sense:
            sense = scsi.parse_sense(conn.unit_attention_sense.pop(0))
            if sense is not None:
                self._unit_attention(sense)

    async def _data_in(self, cdb: bytes, alloc: int, *, what: str,
                       lun: int | None = None) -> bytes:
        buf = bytearray(alloc)
        task = await self._execute(cdb, what=what, lun=lun, into=memoryview(buf))
        return bytes(buf[: task.received])

    # -- public SCSI commands -------------------------------------------------------------------

    async def test_unit_ready(self) -> None:
        await self._execute(scsi.test_unit_ready(), what="TEST UNIT READY")

    async def inquiry(self, *, lun: int | None = None) -> scsi.Inquiry:
        data = await self._data_in(scsi.inquiry(), 255, what="INQUIRY", lun=lun)
        try:
            return scsi.parse_inquiry(data)
        except ValueError as err:
            raise IscsiProtocolError(f"iSCSI {self.label}: INQUIRY: {err}") from err

    async def report_luns(self) -> list[int]:
        data = await self._data_in(scsi.report_luns(), 4096, what="REPORT LUNS", lun=0)
        try:
            return scsi.parse_report_luns(data)
        except ValueError as err:
            raise IscsiProtocolError(f"iSCSI {self.label}: REPORT LUNS: {err}") from err

    async def read_capacity(self) -> scsi.Capacity:
        """READ CAPACITY(16); also remembered as `self.capacity` (bounds reads and writes)."""
        data = await self._data_in(scsi.read_capacity16(), 32, what="READ CAPACITY(16)")
        try:
            self.capacity = scsi.parse_capacity16(data)
        except ValueError as err:
            raise IscsiProtocolError(f"iSCSI {self.label}: READ CAPACITY(16): {err}") from err
        return self.capacity

    async def _find_disk_lun(self) -> int:
        luns = await self.report_luns()
        for lun in luns:
            if (await self.inquiry(lun=lun)).device_type == 0:
                return lun
        raise IscsiError(f"iSCSI {self.label}: no disk LUN among LUNs {luns}")

    @property
    def size(self) -> int:
        if self.capacity is None:
            raise IscsiError(f"iSCSI {self.label}: capacity unknown (call read_capacity)")
        return self.capacity.size

    def _check_range(self, offset: int, length: int, verb: str) -> int:
        if self.capacity is None:
            raise IscsiError(f"iSCSI {self.label}: capacity unknown (call read_capacity)")
        bs = self.capacity.block_size
        if offset % bs or length % bs:
            raise IscsiError(f"iSCSI {self.label}: {verb} of {length} bytes at {offset} is not "
                             f"aligned to the {bs}-byte block size")
        if offset < 0 or offset + length > self.capacity.size:
            raise IscsiError(f"iSCSI {self.label}: {verb} of {length} bytes at {offset} is past "
                             f"the end of the LUN ({self.capacity.size} bytes)")
        return bs

    async def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill `buf` with the LUN's bytes at `offset`; anything short is an error."""
        buf = memoryview(buf).cast("B")
        bs = self._check_range(offset, len(buf), "read")
        step = max(bs, self.max_transfer - self.max_transfer % bs)
        if len(buf) <= step:
            await self._read_piece(offset, buf, bs)
            return
        await self._in_pieces(self._read_piece, offset, buf, bs, step)

    async def _in_pieces(
        self, piece: Callable[[int, memoryview, int], Awaitable[None]], offset: int,
        view: memoryview, bs: int, step: int,
    ) -> None:
        """Run `piece` on each `step`-sized part of `view` concurrently (the CmdSN window and
        `_slots` bound how many are in flight); the first failure is raised unwrapped."""
        try:
            async with trio.open_nursery() as nursery:
                for pos in range(0, len(view), step):
                    nursery.start_soon(piece, offset + pos, view[pos : pos + step], bs)
        except BaseExceptionGroup as group:
            inner = _unwrap(group)
            if inner is None:
                raise
            raise inner from None

    async def _read_piece(self, offset: int, buf: memoryview, bs: int) -> None:
        n = len(buf)
        what = f"READ(16) of {n} bytes at offset {offset}"
        async with self._slots:
            task = await self._execute(scsi.read16(offset // bs, n // bs), what=what, into=buf)
        if task.received != n or task.flags & 0x06:
            raise IscsiCommandError(
                f"iSCSI {self.label}: {what} returned {task.received} bytes (residual "
                f"{task.residual})", status=task.status)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` at `offset` (WRITE(16), immediate data, unsolicited Data-Out and R2T as
        negotiated)."""
        view = memoryview(data).cast("B")
        bs = self._check_range(offset, len(view), "write")
        step = max(bs, self.max_transfer - self.max_transfer % bs)
        await self._in_pieces(self._write_piece, offset, view, bs, step)

    async def _write_piece(self, offset: int, data: memoryview, bs: int) -> None:
        n = len(data)
        async with self._slots:
            await self._execute(scsi.write16(offset // bs, n // bs),
                                what=f"WRITE(16) of {n} bytes at offset {offset}", write=data)

    async def ping(self, *, timeout: float = 10.0) -> None:
        """NOP-Out ping: proves the target still answers on this connection."""
        conn = await self._current()
        task = conn.new_task()
        hdr = nop_out(itt=task.itt, ttt=NO_TAG, cmd_sn=conn.cmd_sn, exp_stat_sn=0)
        with trio.move_on_after(timeout) as scope:
            try:
                await conn.send(hdr)
                await task.done.wait()
            except _Lost as lost:
                raise IscsiConnectionError(f"iSCSI {self.label}: ping failed: {lost.error}") \
                    from lost.error
        if scope.cancelled_caught:
            conn.tasks.pop(task.itt, None)
            raise IscsiConnectionError(f"iSCSI {self.label}: no answer to a ping within "
                                       f"{timeout:g} s")
        if task.error is not None:
            raise IscsiConnectionError(f"iSCSI {self.label}: ping failed: {task.error}")

    def drop_connection(self) -> None:
        """Close the TCP connection abruptly (for tests of recovery); the next command
        reconnects."""
        if self._conn is not None:
            self._conn.fail(IscsiConnectionError(f"iSCSI {self.label}: connection dropped"))

