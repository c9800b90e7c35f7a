"""The source side of DR: push one point of one VM to its receiver, resuming after cuts.

What to send comes from the same places a backup's does: a `DiskReader` from the data path and
the region map from the hypervisor session (`open_disk_sources`): the allocation map for a
disk sent in full (a seed, a new or resized disk), the changed regions since the last
acknowledged point's snapshot for a delta. Reads go through the backup's read-ahead
(`jobs.readahead.read_chunks`), so chunks are aligned the same way and memory stays flat.

A cut connection is retried with capped, jittered exponential backoff; the receiver's welcome
names the durable offset of every disk and the push goes on from there, not from the start.
`max_bandwidth_mbps` is one token bucket on the wire bytes for the whole push, reconnects
included.
"""

from __future__ import annotations

__all__ = [
    "DiskSource",
    "PushPoint",
    "PushRefused",
    "PushResult",
    "PushSettings",
    "open_disk_sources",
    "push_point",
]

import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import trio

from .. import log as msgs
from ..drivers import DataPath, DiskReader, HypervisorSession
from ..errors import AhvBackupError, ApiError, CredentialsRefused, TransportError
from ..jobs.readahead import Chunk, read_chunks
from ..jobs.regions import coalesce
from ..ledger import ReleaseStack
from ..model import DiskSnapshot, Region, VmSnapshot
from ..plugins import Hooks
from .protocol import (
    MAX_CHUNK,
    Ack,
    Committed,
    Data,
    DiskEnd,
    Hello,
    HelloDisk,
    PointEnd,
    ProtocolError,
    Refused,
    Welcome,
    WelcomeRules,
    Zero,
    chain_next,
)
from .throttle import TokenBucket
from .wire import ConnectionLost, Wire

log = logging.getLogger("ahvbackup.dr.push")

Connect = Callable[[], Awaitable[trio.abc.Stream]]
#: what the cluster answers when a reference snapshot is gone (as for backups)
_REFERENCE_GONE = (404, 410, 422)


class PushRefused(TransportError):
    """The receiver will not take this point (its reason is the message); not retried."""


#: a session that ends with one of these is retried (a lost connection, a transport that
#: failed), unless it is one of the errors the retry cannot help with
_RETRIED = (TransportError, OSError, trio.BrokenResourceError)
_NOT_RETRIED = (ProtocolError, PushRefused, CredentialsRefused)


@dataclass(frozen=True)
class DiskSource:
    """One disk of the point: `full` when `regions` build it from zeros (the allocation map),
    else they are the changes since the base point. `regions` is called once per session and
    must give the same map each time (the same snapshots)."""

    uuid: str
    label: str
    size: int
    full: bool
    reader: DiskReader
    regions: Callable[[], AsyncIterator[Region]]


@dataclass(frozen=True)
class PushPoint:
    """A point of `vm_name` to push: `point` numbers it (1, 2, ...), `base` is the last point
    the receiver acknowledged (0 for a seed) and `base_snapshot_id` its snapshot ("" for a
    seed), `taken` the wall-clock time of this point's snapshot (the lag, i.e. the RPO, is
    measured from it)."""

    vm_uuid: str
    vm_name: str
    point: int
    snapshot_id: str
    base: int
    base_snapshot_id: str
    taken: float
    disks: tuple[DiskSource, ...]


@dataclass(frozen=True)
class PushSettings:
    """`max_bandwidth_mbps` (0: no cap); `chunk_size` the largest range; `inflight` reads at
    once; `retries` reconnects in a row without progress before giving up; backoff from
    `backoff` doubling up to `backoff_max` seconds; `reply_timeout` for the receiver's welcome
    and commit (None: wait forever)."""

    max_bandwidth_mbps: int = 0
    chunk_size: int = 1 << 20
    inflight: int = 4
    retries: int = 8
    backoff: float = 0.5
    backoff_max: float = 30.0
    reply_timeout: float | None = 300.0


@dataclass
class PushResult:
    point: int
    bytes_pushed: int = 0  # bytes put on the wire, every session together
    data_bytes: int = 0  # data range bytes sent (re-sent ones counted again)
    zero_bytes: int = 0
    reconnects: int = 0
    resumed_at: dict[str, int] = field(default_factory=dict)  # disk label: first resume offset
    seconds: float = 0.0
    durable: list[int] = field(default_factory=list)  # per disk, as the receiver last said
    lag: float = 0.0  # seconds from the snapshot to the commit: the RPO reached


async def push_point(point: PushPoint, *, connect: Connect,
                     settings: PushSettings | None = None, hooks: Hooks | None = None,
                     throttle: TokenBucket | None = None) -> PushResult:
    """Push `point` until the receiver commits it. Raises `PushRefused` when the receiver
    refuses it, `TransportError` when `retries` reconnects in a row made no progress.
    `throttle` overrides the bucket `settings.max_bandwidth_mbps` makes."""
    settings = settings or PushSettings()
    if not 4096 <= settings.chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size {settings.chunk_size} outside 4096..{MAX_CHUNK}")
    bucket = throttle or TokenBucket.mbps(settings.max_bandwidth_mbps)
    hello = Hello(vm_uuid=point.vm_uuid, vm_name=point.vm_name, point=point.point,
                  snapshot_id=point.snapshot_id, base=point.base,
                  base_snapshot_id=point.base_snapshot_id, chunk=settings.chunk_size,
                  disks=tuple(HelloDisk(uuid=d.uuid, label=d.label, size=d.size, full=d.full)
                              for d in point.disks))
    result = PushResult(point=point.point)
    started = time.monotonic()
    failures = 0
    while True:
        session = _Session(point, hello, settings, bucket, result)
        try:
            try:
                await session.run(connect)
            except BaseExceptionGroup as group:
                raise _one_error(group) from None
            break
        except _NOT_RETRIED:
            raise
        except _RETRIED as err:
            failure: BaseException = err
        finally:
            result.bytes_pushed += session.sent
        failures = 0 if session.progress else failures + 1
        if failures > settings.retries:
            raise TransportError(
                f"DR push of VM {point.vm_name} point {point.point}: gave up after "
                f"{settings.retries} reconnects without progress ({failure}); the receiver "
                "keeps the partial point and the next push resumes it") from failure
        wait = min(settings.backoff_max, settings.backoff * 2 ** max(0, failures - 1))
        wait *= random.uniform(0.8, 1.0)
        result.reconnects += 1
        log.warning("DR push of VM %s point %d: %s; reconnecting in %.1fs", point.vm_name,
                    point.point, failure, wait)
        await trio.sleep(wait)
    result.seconds = time.monotonic() - started
    result.lag = max(0.0, time.time() - point.taken)
    log.info("%s", msgs.dr_cycle_complete(
        point.vm_name, point.point, result.bytes_pushed, reconnects=result.reconnects,
        lag=result.lag))
    if hooks is not None:
        hooks.measure({"vm": point.vm_name}, dr_bytes_pushed=result.bytes_pushed,
                      dr_reconnects=result.reconnects, dr_lag_seconds=result.lag)
    return result


class _Session:
    """One connection's worth of a push."""

    def __init__(self, point: PushPoint, hello: Hello, settings: PushSettings,
                 bucket: TokenBucket | None, result: PushResult) -> None:
        self.point, self.hello, self.settings = point, hello, settings
        self.bucket, self.result = bucket, result
        self.rules = WelcomeRules(hello)
        self.committed = trio.Event()
        self.progress = False  # the receiver acknowledged something new in this session
        self.wire: Wire | None = None

    @property
    def sent(self) -> int:
        return self.wire.sent if self.wire is not None else 0

    async def run(self, connect: Connect) -> None:
        stream = await connect()
        self.wire = wire = Wire(stream, peer="receiver", throttle=self.bucket)
        async with stream:
            await wire.send(self.hello)
            with _deadline(self.settings.reply_timeout, "its welcome"):
                welcome = await self._reply(wire)
            if not isinstance(welcome, Welcome):
                raise ProtocolError(f"{self.hello.identity}: receiver: expected a welcome, got "
                                    f"{type(welcome).__name__}")
            self._note_resume(welcome)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._acks, wire)
                for index, disk in enumerate(self.point.disks):
                    token = welcome.resume[index]
                    if not token.done:
                        await self._send_disk(wire, index, disk, token.offset, token.chain)
                await wire.send(PointEnd(self.hello.point))
                with _deadline(self.settings.reply_timeout, "its commit"):
                    await self.committed.wait()
                nursery.cancel_scope.cancel()

    async def _reply(self, wire: Wire) -> Welcome | Ack | Committed:
        msg = await wire.expect()
        self.rules.check(msg)
        if isinstance(msg, Refused):
            raise PushRefused(f"DR push of VM {self.point.vm_name} point {self.point.point}: "
                              f"the receiver refused it: {msg.reason}")
        assert isinstance(msg, Welcome | Ack | Committed)
        return msg

    def _note_resume(self, welcome: Welcome) -> None:
        durable = self.result.durable
        now = [d.size if t.done else t.offset
               for d, t in zip(self.point.disks, welcome.resume, strict=True)]
        if durable and any(a > b for a, b in zip(now, durable, strict=True)):
            self.progress = True  # the cut session's last ranges became durable after all
        self.result.durable = now
        for disk, token in zip(self.point.disks, welcome.resume, strict=True):
            if token.offset and not token.done:
                self.result.resumed_at.setdefault(disk.label, token.offset)
                log.info("DR push of VM %s point %d: disk %s resumes at offset %d",
                         self.point.vm_name, self.point.point, disk.label, token.offset)

    async def _acks(self, wire: Wire) -> None:
        while True:
            msg = await self._reply(wire)
            if isinstance(msg, Ack):
                self.progress = True
                self.result.durable[msg.disk] = msg.offset
            elif isinstance(msg, Committed):
                self.progress = True
                self.committed.set()
                return

    async def _send_disk(self, wire: Wire, index: int, disk: DiskSource, start: int,
                         chain: bytes) -> None:
        chunk_size = self.settings.chunk_size
        inflight = self.settings.inflight
        send, recv = trio.open_memory_channel[Chunk](0)
        regions = _from(start, coalesce(disk.regions(), label=disk.label, size=disk.size))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: read_chunks(
                disk.reader, regions, chunk_size=chunk_size, inflight=inflight, out=send,
                spare=2))
            async with recv:
                async for chunk in recv:
                    try:
                        if chunk.data is None:
                            msg: Data | Zero = Zero(index, chunk.offset, chunk.length)
                            self.result.zero_bytes += chunk.length
                        else:
                            msg = Data(index, chunk.offset, chunk.data)
                            self.result.data_bytes += chunk.length
                        chain = chain_next(chain, offset=chunk.offset, length=chunk.length,
                                           payload=chunk.data)
                        await wire.send(msg)
                    finally:
                        chunk.release()
        await wire.send(DiskEnd(index, chain))


def _one_error(group: BaseExceptionGroup) -> BaseException:
    """The error a session's nursery ended with, unwrapped: a refusal or protocol error before
    a lost connection (which is retried); a group holding anything else (a bug, a
    cancellation) is given back whole."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending += exc.exceptions
        elif isinstance(exc, AhvBackupError | OSError | trio.BrokenResourceError):
            leaves.append(exc)
        else:
            return group
    fatal = [e for e in leaves if not isinstance(e, _RETRIED) or isinstance(e, _NOT_RETRIED)]
    return (fatal or leaves)[0]


@contextmanager
def _deadline(seconds: float | None, what: str) -> Iterator[None]:
    """`trio.move_on_after` that turns the timeout into a lost connection (retried)."""
    if seconds is None:
        yield
        return
    with trio.move_on_after(seconds) as scope:
        yield
    if scope.cancelled_caught:
        raise ConnectionLost(f"the receiver sent no {what} within {seconds}s")


async def _from(start: int, regions: AsyncIterator[Region]) -> AsyncIterator[Region]:
    """The regions at or after `start` (a resume offset, always a range end), clipped."""
    async for r in regions:
        if r.end <= start:
            continue
        if r.offset < start:
            r = Region(start, r.end - start, r.zero)
        yield r


@asynccontextmanager
async def open_disk_sources(
    session: HypervisorSession, datapath: DataPath, snap: VmSnapshot, *,
    references: Mapping[str, str], stack: ReleaseStack,
) -> AsyncIterator[tuple[DiskSource, ...]]:
    """Every disk of `snap`, opened through `datapath` for the length of the block.
    `references` maps a disk's uuid to its handle in the last acknowledged point's snapshot;
    a disk without one, or whose reference the cluster no longer has, is sent in full (its
    allocation map; the second case with a warning). The caller leaves out of `references`
    a disk resized since that point."""
    async with AsyncExitStack() as opened:
        out = []
        for disk in snap.disks:
            handle = await _usable_reference(session, disk, references.get(disk.disk.uuid))
            reader = await opened.enter_async_context(datapath.open(session, disk, stack=stack))

            def regions(disk: DiskSnapshot = disk, handle: str | None = handle
                        ) -> AsyncIterator[Region]:
                return session.regions(disk, reference=handle)

            out.append(DiskSource(uuid=disk.disk.uuid, label=disk.disk.label, size=disk.size,
                                  full=handle is None, reader=reader, regions=regions))
        yield tuple(out)


async def _usable_reference(session: HypervisorSession, disk: DiskSnapshot,
                            handle: str | None) -> str | None:
    """`handle`, or None when the cluster answers that it is gone (asked before the hello,
    which must say whether the disk is sent in full)."""
    if handle is None:
        return None
    it = aiter(session.regions(disk, reference=handle))
    try:
        await anext(it, None)
    except ApiError as err:
        if err.status not in _REFERENCE_GONE:
            raise
        log.warning("DR push: disk %s: the reference snapshot of the last acknowledged point "
                    "is gone on the cluster (%s); sending the disk in full", disk.disk.label,
                    err)
        return None
    return handle  # the rest of `it` is dropped (trio finalizes an async generator)
