"""Restore and verify: disk streams from the sink back into disks, checked end to end.

A stream is trusted only once its trailer and digest checked out, so a restore writes into the
target as it reads and, when the stream turns out damaged, removes the disk it was writing and
names the failure: nothing partial is passed off as complete.

A backup whose disk is a delta is restored through its chain (`chain.py`): every link is
indexed and checked against the one below it, each output range is taken from the newest record
that covers it and written once, and each payload is checked as it is read. A missing or damaged
link is named. `verify` reads every link of the chain completely.
"""

from __future__ import annotations

__all__ = ["RestoreJob", "VerifyJob", "parse_time", "pick_backup", "select_disks"]

import datetime
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..containment import safe_name
from ..drivers import RestoreTarget, StoredBackup
from ..errors import AhvBackupError, ConfigError, StreamFormatError, our_errors
from ..manifest import DiskEntry
from ..model import DiskInfo
from ..stream import StreamReader, Trailer
from .chain import ChainImage, Link, bind_stream, resolve_chain
from .runtime import Runtime

log = logging.getLogger("ahvbackup.restore")

Progress = Callable[[int], None]


@dataclass
class DiskOutcome:
    label: str
    ok: bool = False
    size: int = 0
    data_bytes: int = 0
    zero_bytes: int = 0
    digest: str = ""
    path: str = ""
    error: str | None = None
    chain: list[str] = field(default_factory=list)  # backup ids, the full first


@dataclass
class RestoreOutcome:
    backup_id: str
    vm_name: str
    mode: str  # restore | verify
    disks: list[DiskOutcome] = field(default_factory=list)
    seconds: float = 0.0
    level: str = "full"

    @property
    def ok(self) -> bool:
        return bool(self.disks) and all(d.ok for d in self.disks)

    @property
    def failed(self) -> list[str]:
        return [f"{self.vm_name}/{d.label}" for d in self.disks if not d.ok]

    def to_json(self) -> dict[str, Any]:
        return {
            "backup_id": self.backup_id, "vm": self.vm_name, "mode": self.mode, "ok": self.ok,
            "seconds": self.seconds, "failed": self.failed, "level": self.level,
            "disks": [d.__dict__ for d in self.disks],
        }


def parse_time(text: str) -> float:
    """A point in time: RFC 3339 / ISO 8601 (UTC unless it says otherwise) or Unix seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise ConfigError(
            f"at: {text!r} is not a time (use e.g. 2025-05-01T02:00:00Z or Unix seconds)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


async def pick_backup(
    rt: Runtime, *, vm: str | None, backup_id: str | None, at: float | None = None
) -> StoredBackup:
    """The backup a restore or verify is about: by id, else `vm`'s newest (at or before `at`)."""
    if not backup_id and not vm:
        raise ConfigError("restore: name a backup (--backup ID) or a VM (--vm NAME) to restore")
    found = await rt.sink.backups(vm)
    if at is not None and not backup_id:
        before = [b for b in found if b.created <= at]
        if not before:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
            raise ConfigError(f"at: no complete backup of {vm!r} was taken at or before {when}")
        return before[-1]
    if backup_id:
        match = [b for b in found if b.backup_id == backup_id]
        if not match:
            for bad in await rt.sink.damaged(vm):
                if backup_id in (bad.backup_id, safe_name(backup_id)):
                    raise StreamFormatError(f"backup {backup_id} is damaged: {bad.where}: "
                                            f"{bad.reason}")
            raise ConfigError(
                f"backup: no complete backup {backup_id!r}"
                + (f" of VM {vm!r}" if vm else "") + " in the repository"
            )
        return match[0]
    if not found:
        raise ConfigError(f"vm: no complete backup of {vm!r} in the repository")
    return found[-1]


def _disk_info(entry: DiskEntry) -> DiskInfo:
    return DiskInfo(uuid=entry.uuid, bus=entry.bus, index=entry.index, size=entry.size,
                    container=entry.container)


def _apply_chain(
    rt: Runtime, links: list[Link], target: RestoreTarget | None, dest: Path,
    outcome: DiskOutcome, progress: Progress,
) -> None:
    """Rebuild one disk from its chain (blocking: runs in a worker thread), or check the chain
    completely when there is no target."""
    tip = links[-1]
    with ChainImage(rt.sink, links, verify=target is None) as image:
        outcome.size = image.size
        trailer = image.tip.trailer
        assert trailer is not None
        outcome.digest = trailer.digest_hex
        if target is None:
            outcome.data_bytes = sum(n for _, n, v in _kinds(image) if v)
            outcome.zero_bytes = sum(n for _, n, v in _kinds(image) if not v)
            progress(outcome.size)
            outcome.ok = True
            return
        writer = target.open_disk(
            vm_name=tip.backup.vm_name, disk=_disk_info(tip.entry), size=outcome.size, dest=dest
        )
        try:
            outcome.data_bytes, outcome.zero_bytes = image.write_to(writer, progress)
        except BaseException:
            where = writer.close()
            Path(where).unlink(missing_ok=True)
            raise
        outcome.path = str(writer.close())
    outcome.ok = True


def _kinds(image: ChainImage) -> list[tuple[int, int, bool]]:
    return [(off, n, image.entries[li][ri].kind == "data") for off, n, li, ri in image.pieces]


def _apply(
    rt: Runtime, link: Link, target: RestoreTarget | None, dest: Path, outcome: DiskOutcome,
    progress: Progress,
) -> None:
    """Read one stream (blocking: runs in a worker thread) into the target, or just check it."""
    writer = None
    with rt.sink.open_stream(link.backup, link.label) as f:
        reader = StreamReader(f, name=f"{link.backup.vm_name}/{link.label}")
        bind_stream(link, reader.header)
        outcome.size = reader.header.disk_size
        if target is not None:
            writer = target.open_disk(vm_name=link.backup.vm_name, disk=_disk_info(link.entry),
                                      size=outcome.size, dest=dest)
        try:
            for rec in reader:
                if rec.data is not None:
                    if writer is not None:
                        writer.write_at(rec.offset, rec.data)
                    outcome.data_bytes += rec.length
                else:
                    if writer is not None:
                        writer.zero(rec.offset, rec.length)
                    outcome.zero_bytes += rec.length
                progress(rec.length)
            trailer: Trailer | None = reader.trailer
            assert trailer is not None
            bind_stream(link, reader.header, trailer)
            outcome.digest = trailer.digest_hex
        except BaseException:
            if writer is not None:
                where = writer.close()
                Path(where).unlink(missing_ok=True)
            raise
    if writer is not None:
        outcome.path = str(writer.close())
    outcome.ok = True


def select_disks(backup: StoredBackup, names: Sequence[str]) -> tuple[DiskEntry, ...]:
    """The disks of `backup` named by label (``scsi.0``) or by the whitepaper's ``disk-N``
    (the Nth disk with a stream, in backup order); all of them when `names` is empty."""
    streams = backup.manifest.streams
    if not names:
        return streams
    by_name = {d.label: d for d in streams}
    by_name.update({f"disk-{i}": d for i, d in enumerate(streams) if f"disk-{i}" not in by_name})
    unknown = [n for n in names if n not in by_name]
    if unknown:
        have = ", ".join(f"{d.label} (disk-{i})" for i, d in enumerate(streams))
        raise ConfigError(f"restore_disks_only: backup {backup.backup_id} has no disk "
                          f"{', '.join(unknown)} (it has {have})")
    wanted = {by_name[n].uuid for n in names}
    return tuple(d for d in streams if d.uuid in wanted)


class _StreamJob:
    mode = ""

    def __init__(
        self, rt: Runtime, backup: StoredBackup, *, disks: Sequence[str] = (),
        progress: Progress | None = None,
    ) -> None:
        self.rt = rt
        self.backup = backup
        self.progress = progress or (lambda n: None)
        self.entries = select_disks(backup, disks)

    def _target(self) -> RestoreTarget | None:
        return None

    def _dest(self) -> Path:
        return Path(".")

    async def run(self) -> RestoreOutcome:
        started = time.monotonic()
        out = RestoreOutcome(backup_id=self.backup.backup_id, vm_name=self.backup.vm_name,
                             mode=self.mode, level=self.backup.level)
        hooks, job_id, b = self.rt.hooks, self.rt.job_id, self.backup
        hooks.job_started(job_id=job_id, mode=self.mode, level=b.level)
        hooks.vm_started(job_id=job_id, vm_uuid=b.vm_uuid, vm_name=b.vm_name)
        try:
            target = self._target()
            self.by_id = {x.backup_id: x for x in await self.rt.sink.backups(b.vm_uuid)}
            limiter = trio.CapacityLimiter(max(1, self.rt.config.concurrent_disks))
            async with trio.open_nursery() as nursery:
                for entry in self.entries:
                    outcome = DiskOutcome(label=entry.label)
                    out.disks.append(outcome)
                    nursery.start_soon(self._one, entry, target, outcome, limiter)
        finally:
            out.seconds = time.monotonic() - started
            errors = "; ".join(d.error for d in out.disks if d.error) or None
            hooks.vm_finished(job_id=job_id, vm_uuid=b.vm_uuid, vm_name=b.vm_name, ok=out.ok,
                              bytes_stored=0, error=errors)
            hooks.job_finished(job_id=job_id, ok=out.ok, failed=out.failed, seconds=out.seconds)
            hooks.measure({"mode": self.mode, "outcome": "ok" if out.ok else "failed"},
                          job_seconds=out.seconds)
        return out

    async def _one(
        self, entry: DiskEntry, target: RestoreTarget | None, outcome: DiskOutcome,
        limiter: trio.CapacityLimiter,
    ) -> None:
        token = trio.lowlevel.current_trio_token()

        def progress(n: int) -> None:
            trio.from_thread.run_sync(self.progress, n, trio_token=token)

        hooks, vm_name = self.rt.hooks, self.backup.vm_name
        hooks.disk_started(job_id=self.rt.job_id, vm_name=vm_name, disk=entry.label,
                           size=entry.size)
        started = time.monotonic()
        try:
            await self._rebuild(entry, target, outcome, limiter, progress)
        finally:
            # bytes_read: the data bytes read back from the streams (written, for a restore)
            hooks.disk_finished(job_id=self.rt.job_id, vm_name=vm_name, disk=entry.label,
                                ok=outcome.ok, bytes_read=outcome.data_bytes, bytes_stored=0)
            hooks.measure({"mode": self.mode, "vm": vm_name, "disk": entry.label,
                           "outcome": "ok" if outcome.ok else "failed"},
                          disk_bytes_restored=outcome.data_bytes if target else 0,
                          disk_bytes_verified=0 if target else outcome.data_bytes,
                          disk_seconds=time.monotonic() - started)

    async def _rebuild(
        self, entry: DiskEntry, target: RestoreTarget | None, outcome: DiskOutcome,
        limiter: trio.CapacityLimiter, progress: Progress,
    ) -> None:
        try:
            links = resolve_chain(self.by_id, self.backup, entry)
            outcome.chain = [link.backup.backup_id for link in links]
            if len(links) == 1:
                await trio.to_thread.run_sync(
                    _apply, self.rt, links[0], target, self._dest(), outcome, progress,
                    limiter=limiter, abandon_on_cancel=False,
                )
            else:
                await trio.to_thread.run_sync(
                    _apply_chain, self.rt, links, target, self._dest(), outcome, progress,
                    limiter=limiter, abandon_on_cancel=False,
                )
        except (AhvBackupError, BaseExceptionGroup) as err:
            errors = our_errors(err)
            if errors is None:
                raise
            outcome.error = "; ".join(str(e) for e in errors)
            log.error("%s %s: %s", self.backup.vm_name, entry.label, outcome.error)
        except OSError as err:
            outcome.error = f"{entry.label}: {err}"
            log.error("%s %s: %s", self.backup.vm_name, entry.label, outcome.error)


class RestoreJob(_StreamJob):
    """Rebuild disks of one backup through a restore target (raw files by default)."""

    mode = "restore"

    def __init__(self, rt: Runtime, backup: StoredBackup, *, dest: Path,
                 target: RestoreTarget | None = None, **kw: Any) -> None:
        super().__init__(rt, backup, **kw)
        self.dest = dest
        self.target = target or rt.target()

    def _target(self) -> RestoreTarget | None:
        return self.target

    def _dest(self) -> Path:
        return self.dest


class VerifyJob(_StreamJob):
    """Read every stream of a backup and check it completely, writing nothing."""

    mode = "verify"
