"""The backup job: select, snapshot, read each disk through the data path, stream it to the sink.

One nursery per job, one per VM, one per disk (style.md, async). Stages are joined by bounded
memory channels (reader -> encoder -> sink), so memory does not grow with disk size. A failed
disk fails its VM, never the other VMs; every remote resource is on the cleanup ledger and is
released in reverse order however the job ends.
"""

from __future__ import annotations

__all__ = ["BackupJob"]

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import trio

from .. import __version__, log as msgs
from ..drivers import BackupWriter, DataPath, HypervisorSession
from ..errors import AhvBackupError, ConfigError, HypervisorError, our_errors
from ..ledger import ReleaseStack
from ..model import DiskSnapshot, VmInfo, VmSnapshot
from ..repository import new_backup_id
from ..state import DiskState, VmState
from ..stream import MAX_DATA_LENGTH, StreamHeader
from .encode import encode_disk
from .readahead import Chunk, read_chunks
from .results import DiskResult, JobResult, VmResult
from .runtime import Runtime, resolve_data_path
from .selection import select_vms

log = logging.getLogger("ahvbackup.backup")

#: bytes of reads in flight per disk (memory per disk is this plus two chunks)
READ_WINDOW = 32 << 20

Progress = Callable[[int], None]


class BackupJob:
    def __init__(
        self, rt: Runtime, *, progress: Progress | None = None, disks: Sequence[str] = ()
    ) -> None:
        """`disks` limits the backup to these disk labels (e.g. ``scsi.0``; bpipe backs up one
        disk per FileSet line); by default every disk of every selected VM."""
        self.rt = rt
        self.cfg = rt.config
        self.progress = progress or (lambda n: None)
        self.disks = tuple(disks)
        if self.cfg.mode not in ("backup", "estimate"):
            raise ConfigError(
                f"mode: {self.cfg.mode!r} is not a backup mode (use backup or estimate)"
            )
        if self.cfg.level != "full":
            raise ConfigError(
                f"level: {self.cfg.level!r} backups are not available yet; use level=full"
            )

    async def run(self) -> JobResult:
        cfg, rt = self.cfg, self.rt
        started = time.monotonic()
        result = JobResult(job_id=rt.job_id, mode=cfg.mode, warnings=list(cfg.warnings))
        for warning in cfg.warnings:
            log.warning("%s", warning)
        log.info(msgs.backend_up(__version__, mode=cfg.mode, level=cfg.level, vm=",".join(cfg.vm)))
        rt.hooks.job_started(job_id=rt.job_id, mode=cfg.mode, level=cfg.level)
        try:
            async with rt.hypervisor.connect() as session:
                log.info("%s", await session.discover())
                if cfg.job_cleanup_on_abort:
                    await rt.sweep(session)
                vms, warnings = select_vms(
                    await session.list_vms(), include=cfg.vm, exclude=cfg.exclude,
                    cluster=cfg.cluster,
                )
                for w in warnings:
                    log.warning("%s", w)
                result.warnings += warnings
                log.info(msgs.selected_vms(len(vms), [v.name for v in vms]))
                datapath = (
                    None if cfg.mode == "estimate" else await resolve_data_path(cfg, session)
                )
                slots = trio.Semaphore(cfg.concurrent_vms)
                async with trio.open_nursery() as nursery:
                    for vm in vms:  # started in selection order, at most concurrent_vms at once
                        vr = VmResult(vm_uuid=vm.uuid, vm_name=vm.name)
                        result.vms.append(vr)
                        await slots.acquire()
                        nursery.start_soon(self._vm, session, datapath, vm, vr, slots)
        finally:
            result.seconds = time.monotonic() - started
            rt.hooks.job_finished(
                job_id=rt.job_id, ok=result.ok, failed=result.failed, seconds=result.seconds
            )
        return result

    async def _vm(
        self, session: HypervisorSession, datapath: DataPath | None, vm: VmInfo, vr: VmResult,
        slots: trio.Semaphore,
    ) -> None:
        rt = self.rt
        try:
            rt.hooks.vm_started(job_id=rt.job_id, vm_uuid=vm.uuid, vm_name=vm.name)
            try:
                await self._vm_locked(session, datapath, vm, vr)
            except (AhvBackupError, BaseExceptionGroup) as err:
                errors = our_errors(err)
                if errors is None:
                    raise
                vr.ok = False
                vr.error = vr.error or "; ".join(dict.fromkeys(str(e) for e in errors))
                log.error("VM %s: %s", vm.name, vr.error)
            rt.hooks.vm_finished(
                job_id=rt.job_id, vm_uuid=vm.uuid, vm_name=vm.name, ok=vr.ok,
                bytes_stored=vr.bytes_stored, error=vr.error,
            )
        finally:
            slots.release()

    def _consistency(self, vm: VmInfo, vr: VmResult) -> bool:
        """Whether to ask for an application-consistent snapshot (application_consistent=...)."""
        mode = self.cfg.application_consistent
        if mode == "false":
            return False
        if vm.app_consistent_capable:
            return True
        why = "guest tools (NGT) with VSS are not enabled"
        if mode == "true":
            raise ConfigError(
                f"VM {vm.name}: application_consistent=true but {why}; "
                "enable NGT with VSS or set application_consistent=try"
            )
        warning = f"VM {vm.name}: {why}; taking a crash-consistent snapshot instead"
        log.warning("%s", warning)
        vr.warnings.append(warning)
        return False

    async def _vm_locked(
        self, session: HypervisorSession, datapath: DataPath | None, vm: VmInfo, vr: VmResult
    ) -> None:
        rt, cfg = self.rt, self.cfg
        backup_id = new_backup_id()
        created = time.time()
        app = self._consistency(vm, vr)
        async with ReleaseStack(rt.ledger, owner=rt.job_id, releaser=session.release) as stack:
            name = f"ahvbackup-{rt.job_id}-{vm.name}"
            try:
                snap = await session.snapshot_vm(
                    vm, application_consistent=app, name=name, stack=stack
                )
            except HypervisorError as err:
                if not (app and cfg.application_consistent == "try"):
                    raise
                warning = (f"VM {vm.name}: application-consistent snapshot failed ({err}); "
                           "taking a crash-consistent snapshot instead")
                log.warning("%s", warning)
                vr.warnings.append(warning)
                snap = await session.snapshot_vm(
                    vm, application_consistent=False, name=name, stack=stack
                )
            vr.consistency = snap.consistency
            rt.hooks.snapshot_created(
                job_id=rt.job_id, vm_uuid=vm.uuid, snapshot_id=snap.id,
                consistency=snap.consistency,
            )
            if cfg.mode == "estimate":
                await self._estimate(session, snap, vr)
                return
            assert datapath is not None
            writer = await rt.sink.begin(vm, backup_id=backup_id, level=cfg.level)
            wanted = self._wanted_disks(vm, snap)
            try:
                slots = trio.Semaphore(cfg.concurrent_disks)
                async with trio.open_nursery() as nursery:
                    for disk in wanted:  # in disk order, at most concurrent_disks at once
                        dr = DiskResult(label=disk.disk.label, size=disk.size)
                        vr.disks.append(dr)
                        await slots.acquire()
                        nursery.start_soon(
                            self._disk, session, datapath, vm, snap, disk, writer, dr, backup_id,
                            slots,
                        )
                failed = [d.label for d in vr.disks if not d.ok]
                if failed:
                    vr.error = f"disk(s) {', '.join(failed)} failed; no backup of this VM was kept"
                    raise _VmFailed(vr.error)
                stored = await writer.commit(
                    self._manifest(vm, snap, vr, backup_id=backup_id, created=created)
                )
            except BaseException:
                with trio.CancelScope(shield=True):
                    await writer.abort()
                raise
        vr.backup_id = stored.backup_id
        vr.ok = True
        rt.states.save(VmState(
            vm_uuid=vm.uuid, vm_name=vm.name, last_backup_id=backup_id,
            last_full_backup_id=backup_id,
            disks={
                d.disk.uuid: DiskState(
                    disk_uuid=d.disk.uuid, label=d.disk.label, size=d.size, snapshot_id=snap.id,
                    handle=d.handle, backup_id=backup_id, full_backup_id=backup_id,
                )
                for d in snap.disks
                if any(r.label == d.disk.label for r in vr.disks)
            },
        ))
        log.info(msgs.backup_complete(vm.name, len(vr.disks), vr.bytes_read, vr.bytes_stored))

    def _wanted_disks(self, vm: VmInfo, snap: VmSnapshot) -> list[DiskSnapshot]:
        if not self.disks:
            return list(snap.disks)
        labels = [d.disk.label for d in snap.disks]
        unknown = [d for d in self.disks if d not in labels]
        if unknown:
            raise ConfigError(
                f"VM {vm.name} has no disk {', '.join(unknown)} (it has {', '.join(labels)})"
            )
        return [d for d in snap.disks if d.disk.label in self.disks]

    async def _estimate(self, session: HypervisorSession, snap: VmSnapshot, vr: VmResult) -> None:
        """mode=estimate: what a backup would read, from the region maps alone."""
        for disk in snap.disks:
            dr = DiskResult(label=disk.disk.label, size=disk.size, ok=True)
            async for region in session.regions(disk):
                if region.zero:
                    dr.zero_bytes += region.length
                else:
                    dr.estimated_bytes += region.length
            vr.disks.append(dr)
        vr.ok = True
        log.info("estimate: VM %s disks=%d would read %d bytes of %d", vr.vm_name,
                 len(vr.disks), sum(d.estimated_bytes for d in vr.disks),
                 sum(d.size for d in vr.disks))

    async def _disk(
        self, session: HypervisorSession, datapath: DataPath, vm: VmInfo, snap: VmSnapshot,
        disk: DiskSnapshot, writer: BackupWriter, dr: DiskResult, backup_id: str,
        slots: trio.Semaphore,
    ) -> None:
        rt, cfg = self.rt, self.cfg
        try:
            rt.hooks.disk_started(job_id=rt.job_id, vm_name=vm.name, disk=dr.label, size=disk.size)
            try:
                async with ReleaseStack(
                    rt.ledger, owner=rt.job_id, releaser=session.release
                ) as stack:
                    t0 = time.monotonic()
                    reader = await datapath.open(session, disk, stack=stack)
                    t1 = time.monotonic()
                    try:
                        dr.bytes_stored = await self._stream_disk(
                            session, datapath, vm, snap, disk, reader, writer, dr, backup_id
                        )
                    finally:
                        with trio.CancelScope(shield=True):
                            await reader.aclose()
                    t2 = time.monotonic()
                dr.ok = True
                dr.read_seconds = round(t2 - t1, 3)
                log.debug(
                    "VM %s disk %s: staged in %.2fs, read %d bytes in %.2fs (%.0f MB/s), "
                    "released in %.2fs", vm.name, dr.label, t1 - t0, dr.bytes_read, t2 - t1,
                    dr.bytes_read / max(t2 - t1, 1e-9) / 1e6, time.monotonic() - t2,
                )
            except (AhvBackupError, BaseExceptionGroup) as err:
                errors = our_errors(err)
                if errors is None:
                    raise
                dr.error = "; ".join(dict.fromkeys(str(e) for e in errors))
                log.error("VM %s disk %s: %s", vm.name, dr.label, dr.error)
            rt.hooks.disk_finished(
                job_id=rt.job_id, vm_name=vm.name, disk=dr.label, ok=dr.ok,
                bytes_read=dr.bytes_read, bytes_stored=dr.bytes_stored,
            )
        finally:
            slots.release()

    async def _stream_disk(
        self, session: HypervisorSession, datapath: DataPath, vm: VmInfo, snap: VmSnapshot, disk: DiskSnapshot,
        reader: Any, writer: BackupWriter, dr: DiskResult, backup_id: str,
    ) -> int:
        cfg = self.cfg
        chunk_size = min(datapath.read_size(), MAX_DATA_LENGTH)
        inflight = max(2, min(8, READ_WINDOW // chunk_size))
        chunks_send, chunks_recv = trio.open_memory_channel[Chunk](0)
        # unbuffered: the encoder recycles a buffer once the sink asked for the next item
        bytes_send, bytes_recv = trio.open_memory_channel[bytes | memoryview](0)
        header = StreamHeader(
            kind="full", vm_uuid=vm.uuid, vm_name=vm.name, disk_uuid=disk.disk.uuid,
            disk_label=dr.label, disk_bus=disk.disk.bus.lower(), disk_index=disk.disk.index,
            disk_size=disk.size, block_size=chunk_size, snapshot_id=snap.id, backup_id=backup_id,
        )

        def on_chunk(chunk: Chunk) -> None:
            if chunk.data is None:
                dr.zero_bytes += chunk.length
            else:
                dr.bytes_read += chunk.length
            self.progress(chunk.length)

        stored = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: read_chunks(
                    reader, session.regions(disk), chunk_size=chunk_size, inflight=inflight,
                    out=chunks_send, spare=2,
                )
            )
            nursery.start_soon(encode_disk, header, chunks_recv, bytes_send, on_chunk)
            stored = await writer.write_disk(dr.label, _iterate(bytes_recv))
        return stored

    def _manifest(
        self, vm: VmInfo, snap: VmSnapshot, vr: VmResult, *, backup_id: str, created: float
    ) -> dict[str, Any]:
        by_label = {d.label: d for d in vr.disks}
        return {
            "format": 1,
            "producer": f"ahvbackup {__version__}",
            "backup_id": backup_id,
            "job_id": self.rt.job_id,
            "level": self.cfg.level,
            "created": created,
            "completed": time.time(),
            "vm": {
                "uuid": vm.uuid, "name": vm.name,
                "cluster_uuid": vm.cluster_uuid, "cluster_name": vm.cluster_name,
            },
            "snapshot": {"id": snap.id, "consistency": snap.consistency},
            "config": dict(vm.config),
            "disks": [
                {
                    "label": d.disk.label, "uuid": d.disk.uuid, "bus": d.disk.bus,
                    "index": d.disk.index, "size": d.size, "container": d.disk.container,
                    "stream": f"{d.disk.label}.ahvd",
                    "bytes_read": by_label[d.disk.label].bytes_read,
                    "zero_bytes": by_label[d.disk.label].zero_bytes,
                    "bytes_stored": by_label[d.disk.label].bytes_stored,
                    "reference_backup": None,
                }
                for d in snap.disks
                if d.disk.label in by_label
            ],
        }


async def _iterate(recv: trio.MemoryReceiveChannel[bytes | memoryview]) -> AsyncIterator[bytes | memoryview]:
    async with recv:
        async for item in recv:
            yield item


class _VmFailed(AhvBackupError):
    pass
