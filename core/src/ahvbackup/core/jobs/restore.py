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

__all__ = [
    "RestoreJob",
    "VerifyJob",
    "parse_time",
    "pick_backup",
    "refuse_vm_keys",
    "restore_request",
    "select_disks",
]

import datetime
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..config.assembly import vm_key_refusals
from ..containment import safe_name
from ..drivers import (
    DiskWriter,
    Hypervisor,
    RestoreRequest,
    RestoreTarget,
    SourceRange,
    StoredBackup,
    VmRestore,
)
from ..errors import AhvBackupError, ConfigError, StreamFormatError, our_errors
from ..manifest import DiskEntry, Manifest
from ..model import DiskInfo
from ..stream import StreamReader, Trailer
from .chain import ChainImage, Link, bind_stream, resolve_chain
from .cluster import cluster_for
from .codec import stream_keys
from .concurrency import each_limited
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
    copied_bytes: int = 0  # of data_bytes, given to the target as ranges of a local file
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
    path: str = ""  # where the restored VM is (the target's answer to commit)

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
            "path": self.path, "disks": [d.__dict__ for d in self.disks],
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


class _Bridge:
    """A target's disk writer, called from the worker thread that reads the streams. Each call
    returns once the write is done, so the stream's buffer (the view) stays valid through it."""

    def __init__(self, writer: DiskWriter, token: trio.lowlevel.TrioToken) -> None:
        self._writer = writer
        self._token = token

    def write_at(self, offset: int, data: memoryview) -> None:
        trio.from_thread.run(self._writer.write, offset, data, trio_token=self._token)

    def zero(self, offset: int, length: int) -> None:
        trio.from_thread.run(self._writer.zero, offset, length, trio_token=self._token)

    def copy(self, offset: int, source: SourceRange) -> None:
        trio.from_thread.run(self._writer.copy, offset, source, trio_token=self._token)

    def finish(self) -> str:
        return trio.from_thread.run(self._writer.finish, trio_token=self._token)


#: from the worker thread: the disk's writer, once its size is known (None: verify only)
Opener = Callable[[int], _Bridge]


def _apply_chain(rt: Runtime, links: list[Link], opener: Opener | None, outcome: DiskOutcome,
                 progress: Progress) -> None:
    """Rebuild one disk from its chain (blocking: runs in a worker thread), or check the chain
    completely when there is no writer."""
    with ChainImage(rt.sink, links, verify=opener is None, keys=stream_keys(rt.config)) as image:
        outcome.size = image.size
        trailer = image.tip.trailer
        assert trailer is not None
        outcome.digest = trailer.digest_hex
        if opener is None:
            outcome.data_bytes = sum(n for _, n, v in _kinds(image) if v)
            outcome.zero_bytes = sum(n for _, n, v in _kinds(image) if not v)
            progress(outcome.size)
        else:
            writer = opener(outcome.size)
            written = image.write_to(writer, progress)
            outcome.data_bytes, outcome.zero_bytes = written.data, written.zero
            outcome.copied_bytes = written.copied
            outcome.path = writer.finish()
    outcome.ok = True


def _kinds(image: ChainImage) -> list[tuple[int, int, bool]]:
    return [(off, n, image.entries[li][ri].kind == "data") for off, n, li, ri in image.pieces]


def _apply(rt: Runtime, link: Link, opener: Opener | None, outcome: DiskOutcome,
           progress: Progress) -> None:
    """Read one stream (blocking: runs in a worker thread) into the writer, or just check it.
    Its digest is checked at the end; a failure then makes the job abort the VM's restore."""
    with rt.sink.open_stream(link.backup, link.label) as f:
        reader = StreamReader(f, name=f"{link.backup.vm_name}/{link.label}",
                              keys=stream_keys(rt.config), keyless=opener is None)
        bind_stream(link, reader.header)
        outcome.size = reader.header.disk_size
        writer = opener(outcome.size) if opener is not None else None
        for rec in reader:
            if rec.kind == "data":  # without its data when verified without the key
                if writer is not None and rec.data is not None:
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
        if trailer.unchecked:
            log.warning("%s: verified without its key: %s", link.name, trailer.unchecked)
        if writer is not None:
            outcome.path = writer.finish()
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


def refuse_vm_keys(target: RestoreTarget) -> None:
    """Nothing is accepted and then ignored: a key that shapes a created VM, set for a target
    that writes disk images (a target handed in, not the configured one), is an error."""
    lines = vm_key_refusals(target.config, target_name=target.name,
                            needs_cluster=target.needs_cluster)
    if lines:
        raise ConfigError("\n".join(lines))


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

    async def run(self) -> RestoreOutcome:
        started = time.monotonic()
        out = RestoreOutcome(backup_id=self.backup.backup_id, vm_name=self.backup.vm_name,
                             mode=self.mode, level=self.backup.level)
        hooks, job_id, b = self.rt.hooks, self.rt.job_id, self.backup
        hooks.job_started(job_id=job_id, mode=self.mode, level=b.level, config=self.rt.config)
        hooks.vm_started(job_id=job_id, vm_uuid=b.vm_uuid, vm_name=b.vm_name)
        try:
            self.by_id = {x.backup_id: x for x in await self.rt.sink.backups(b.vm_uuid)}
            out.disks = [DiskOutcome(label=e.label) for e in self.entries]
            await self._disks(out)
        finally:
            out.seconds = time.monotonic() - started
            errors = "; ".join(d.error for d in out.disks if d.error) or None
            hooks.vm_finished(job_id=job_id, vm_uuid=b.vm_uuid, vm_name=b.vm_name, ok=out.ok,
                              bytes_stored=0, error=errors)
            hooks.measure({"mode": self.mode, "outcome": "ok" if out.ok else "failed"},
                          job_seconds=out.seconds)  # before job_finished: exporters write then
            hooks.job_finished(job_id=job_id, ok=out.ok, failed=out.failed, seconds=out.seconds)
        return out

    async def _disks(self, out: RestoreOutcome, vm: VmRestore | None = None) -> None:
        """Every selected disk, at most concurrent_disks at once, into `vm` (None: verify)."""
        await each_limited(zip(self.entries, out.disks, strict=True),
                           self.rt.config.concurrent_disks,
                           lambda pair: self._one(pair[0], pair[1], vm))

    async def _one(self, entry: DiskEntry, outcome: DiskOutcome, vm: VmRestore | None) -> None:
        token = trio.lowlevel.current_trio_token()

        def progress(n: int) -> None:
            trio.from_thread.run_sync(self.progress, n, trio_token=token)

        opener: Opener | None = None
        if vm is not None:
            def opener(size: int) -> _Bridge:
                open_disk = functools.partial(vm.open_disk, _disk_info(entry), size=size)
                return _Bridge(trio.from_thread.run(open_disk, trio_token=token), token)

        hooks, vm_name = self.rt.hooks, self.backup.vm_name
        hooks.disk_started(job_id=self.rt.job_id, vm_name=vm_name, disk=entry.label,
                           size=entry.size)
        started = time.monotonic()
        try:
            await self._rebuild(entry, outcome, opener, progress)
        finally:
            # bytes_read: the data bytes read back from the streams (written, for a restore)
            hooks.disk_finished(job_id=self.rt.job_id, vm_name=vm_name, disk=entry.label,
                                ok=outcome.ok, bytes_read=outcome.data_bytes, bytes_stored=0)
            hooks.measure({"mode": self.mode, "vm": vm_name, "disk": entry.label,
                           "outcome": "ok" if outcome.ok else "failed"},
                          disk_bytes_restored=outcome.data_bytes if vm else 0,
                          disk_bytes_verified=0 if vm else outcome.data_bytes,
                          disk_seconds=time.monotonic() - started)

    async def _rebuild(self, entry: DiskEntry, outcome: DiskOutcome, opener: Opener | None,
                       progress: Progress) -> None:
        try:
            links = resolve_chain(self.by_id, self.backup, entry)
            outcome.chain = [link.backup.backup_id for link in links]
            if len(links) == 1:
                await trio.to_thread.run_sync(_apply, self.rt, links[0], opener, outcome,
                                              progress, abandon_on_cancel=False)
            else:
                await trio.to_thread.run_sync(_apply_chain, self.rt, links, opener, outcome,
                                              progress, abandon_on_cancel=False)
        except (AhvBackupError, BaseExceptionGroup) as err:
            errors = our_errors(err)
            if errors is None:
                raise
            outcome.ok = False
            outcome.error = "; ".join(str(e) for e in errors)
            log.error("%s %s: %s", self.backup.vm_name, entry.label, outcome.error)
        except OSError as err:
            outcome.ok = False
            outcome.error = f"{entry.label}: {err}"
            log.error("%s %s: %s", self.backup.vm_name, entry.label, outcome.error)


def restore_request(hypervisor: Hypervisor, *, vm_name: str, dest: Path,
                    manifest: Manifest | None) -> RestoreRequest:
    """What a target is told of the VM it restores: the VM's shape is read from the
    manifest's recorded configuration by the hypervisor driver that recorded it."""
    shape = hypervisor.vm_shape(manifest.config) if manifest is not None else None
    return RestoreRequest(vm_name=vm_name, dest=dest, manifest=manifest, shape=shape)


class RestoreJob(_StreamJob):
    """Rebuild the disks of one backup as a VM through a restore target (raw files by default).

    The target's VM restore is committed only when every disk was restored whole; a failed
    disk, an error or a cancellation aborts it, so nothing partial is left."""

    mode = "restore"

    def __init__(self, rt: Runtime, backup: StoredBackup, *, dest: Path,
                 target: RestoreTarget | None = None, **kw: Any) -> None:
        super().__init__(rt, backup, **kw)
        self.dest = dest
        self.target = target or rt.target()
        refuse_vm_keys(self.target)

    async def _disks(self, out: RestoreOutcome, vm: VmRestore | None = None) -> None:
        async with cluster_for(self.rt, self.target) as cluster:
            request = restore_request(self.rt.hypervisor, vm_name=self.backup.vm_name,
                                      dest=self.dest, manifest=self.backup.manifest)
            restoring = await self.target.begin_vm(request, cluster=cluster)
            try:
                await super()._disks(out, restoring)
                if out.ok:
                    out.path = await restoring.commit()
                    return
            except BaseException:
                with trio.CancelScope(shield=True):
                    await restoring.abort()
                raise
            await restoring.abort()
            for d in out.disks:
                if d.ok:  # whole, but a VM is restored whole or not at all
                    d.ok, d.path = False, ""
                    d.error = "removed: another disk of this VM could not be restored"
            log.error("restore of backup %s (%s) failed; what it had written was removed",
                      self.backup.backup_id, self.backup.vm_name)


class VerifyJob(_StreamJob):
    """Read every stream of a backup and check it completely, writing nothing."""

    mode = "verify"
