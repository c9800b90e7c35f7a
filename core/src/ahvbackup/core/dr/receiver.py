"""The DR receiver: one `Receiver` per state directory, `handle(stream)` per connection.

The transport's `serve(handler)` calls `handle` with each authenticated stream. A push is
checked message by message (`PushRules`) before anything is written; writes are fsynced before
they are acknowledged; a cut connection leaves a partial point that the next push of the same
point resumes from its durable offsets; only a finished, verified point is listed.
"""

from __future__ import annotations

__all__ = ["Receiver", "ReceiverSettings"]

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import trio

from ..errors import ConfigError, TransportError
from ..fsutil import ensure_dir, io_failure
from .protocol import (
    Ack,
    Committed,
    Data,
    DigestMismatch,
    DiskEnd,
    Hello,
    PointEnd,
    ProtocolError,
    PushRules,
    Refused,
    ResumeToken,
    Welcome,
    Zero,
)
from .store import Partial, RestorePoint, VmStore, check_base, disks_done
from .wire import ConnectionLost, Wire

log = logging.getLogger("ahvbackup.dr.receiver")

#: seconds a new connection waits for the VM's old one to end
PREEMPT_WAIT = 30.0
#: seconds a connection may take to say which push it is
HELLO_WAIT = 60.0


@dataclass(frozen=True)
class ReceiverSettings:
    """`state_dir` is this receiver's own (per-VM state under ``state_dir/receiver/``);
    `restore_points` the complete points kept per VM (dr_restore_points); `apply_remote`
    (push_apply_remote) must be true: deltas are applied write-through; `sync_bytes` the
    bytes written between an fsync and its ack."""

    state_dir: Path
    restore_points: int = 7
    apply_remote: bool = True
    sync_bytes: int = 8 << 20


class Receiver:
    """Takes pushes into `settings.state_dir`. Several receivers with distinct state
    directories share nothing; two pushes of one VM at once are refused (a file lock)."""

    def __init__(self, settings: ReceiverSettings) -> None:
        if not settings.apply_remote:
            raise ConfigError("push_apply_remote: no (deltas kept unapplied until failover) is "
                              "not supported yet; set push_apply_remote=yes")
        if settings.restore_points < 1:
            raise ConfigError(f"dr_restore_points: must be at least 1 (got "
                              f"{settings.restore_points})")
        self.settings = settings
        self.root = ensure_dir(settings.state_dir / "receiver", key="state_dir", writable=True)
        #: the session serving each VM now: its cancel scope, and set when it ended
        self._active: dict[str, tuple[trio.CancelScope, trio.Event]] = {}

    def store(self, vm_uuid: str) -> VmStore:
        return VmStore(self.root / vm_uuid)

    def points(self, vm_uuid: str) -> list[RestorePoint]:
        """The VM's complete restore points, oldest first."""
        return self.store(vm_uuid).points()

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one connection: a push session, or nothing (a probe that closes at once).
        Never raises for what the source does; it is logged and the connection closed."""
        wire = Wire(stream, peer="source")
        try:
            await self._session(wire)
        except ConnectionLost as err:
            log.info("DR push interrupted: %s; the partial point is kept for resuming", err)
        except ProtocolError as err:
            log.warning("DR push refused: %s", err)
            with contextlib.suppress(TransportError):
                await wire.send(Refused(str(err)))
        except TransportError as err:  # the channel itself failed (the transport's error)
            log.warning("DR connection failed: %s", err)
        except OSError as err:  # the state directory failed us (full, read-only, damaged)
            where = Path(err.filename or self.root)
            why = f"receiver cannot store the push: {io_failure(where, err)}"
            log.error("DR push failed: %s", why)
            with contextlib.suppress(TransportError):
                await wire.send(Refused(why))
        finally:
            with contextlib.suppress(trio.BrokenResourceError, OSError):
                await stream.aclose()

    async def _session(self, wire: Wire) -> None:
        first = None
        with trio.move_on_after(HELLO_WAIT) as waited:
            first = await wire.receive()
        if waited.cancelled_caught:
            raise ProtocolError(f"source: no hello within {HELLO_WAIT:.0f}s")
        if first is None:
            return
        if not isinstance(first, Hello):
            raise ProtocolError(
                f"source: the first message must be hello (got {type(first).__name__})")
        hello = first
        await self._preempt(hello.vm_uuid)
        done = trio.Event()
        with trio.CancelScope() as scope:
            self._active[hello.vm_uuid] = (scope, done)
            try:
                await self._locked(wire, hello)
            finally:
                done.set()
                if self._active.get(hello.vm_uuid, (None, None))[1] is done:
                    del self._active[hello.vm_uuid]
        if scope.cancelled_caught:
            log.info("DR push of %s: a new connection of the same source took over",
                     hello.identity)

    async def _preempt(self, vm_uuid: str) -> None:
        """A VM's new connection replaces its old one (a source that reconnects after a cut
        the receiver has not noticed yet); the old one ends after the write in flight."""
        active = self._active.get(vm_uuid)
        if active is not None:
            scope, done = active
            scope.cancel()
            with trio.move_on_after(PREEMPT_WAIT):
                await done.wait()

    async def _locked(self, wire: Wire, hello: Hello) -> None:
        store = self.store(hello.vm_uuid)
        if not await trio.to_thread.run_sync(store.lock):
            raise ProtocolError(
                f"{hello.identity}: another receiver process is taking a push of this VM "
                f"into {self.settings.state_dir}")
        partial: Partial | None = None
        try:
            newest = await trio.to_thread.run_sync(store.newest)
            why = check_base(hello, newest)
            if why:
                raise ProtocolError(why)
            if newest is not None and newest.point == hello.point:
                tokens = disks_done(hello)  # complete already: its commit ack was lost
            else:
                partial = await trio.to_thread.run_sync(store.partial_for, hello)
                tokens = list(partial.tokens)
            welcome = Welcome(newest=newest.point if newest else 0, resume=tuple(tokens))
            if partial is not None and any(t.offset for t in tokens):
                log.info("DR push of %s resumes at %s", hello.identity, ", ".join(
                    f"{d.label}={t.offset}" for d, t in zip(hello.disks, tokens, strict=True)))
            await wire.send(welcome)
            await self._ranges(wire, store, hello, welcome, partial)
        finally:
            if partial is not None:
                partial.close()
            store.unlock()

    async def _ranges(self, wire: Wire, store: VmStore, hello: Hello, welcome: Welcome,
                      partial: Partial | None) -> None:
        rules = PushRules(hello, welcome)
        unsynced = [0] * len(hello.disks)
        while True:
            msg = await wire.expect()
            try:
                rules.check(msg)
            except DigestMismatch as err:  # what is written cannot be trusted: start over
                await trio.to_thread.run_sync(store.discard_partial)
                raise DigestMismatch(f"{err}; the partial point is dropped") from None
            if isinstance(msg, PointEnd):
                break
            assert partial is not None  # a complete point has no disk left to send
            if isinstance(msg, Data):
                await trio.to_thread.run_sync(partial.write, msg.disk, msg.offset, msg.payload)
            elif isinstance(msg, Zero):
                await trio.to_thread.run_sync(partial.zero, msg.disk, msg.offset, msg.length)
            assert isinstance(msg, Data | Zero | DiskEnd)
            disk = msg.disk
            if not isinstance(msg, DiskEnd):
                unsynced[disk] += msg.length if isinstance(msg, Data) else 1
                if unsynced[disk] < self.settings.sync_bytes:
                    continue
            token = ResumeToken(offset=rules.ends[disk], chain=rules.chains[disk],
                                done=rules.done[disk])
            await trio.to_thread.run_sync(partial.sync, disk, token)
            unsynced[disk] = 0
            await wire.send(Ack(disk=disk, offset=token.offset))
        if partial is not None:
            with trio.CancelScope(shield=True):  # a new connection waits for the listing
                point = await trio.to_thread.run_sync(partial.commit)
                removed = await trio.to_thread.run_sync(store.rotate,
                                                        self.settings.restore_points)
            log.info("DR point complete: vm=%s point=%d disks=%d removed=%s", hello.vm_name,
                     point.point, len(point.disks), ",".join(map(str, removed)) or "-")
        await wire.send(Committed(hello.point))
