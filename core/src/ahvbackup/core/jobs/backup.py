"""The backup job: select, snapshot, read each disk through the data path, stream it to the sink.

One nursery per job, one per VM, one per disk (style.md, async). Stages are joined by bounded
memory channels (reader -> encoder -> sink), so memory does not grow with disk size. A failed
disk fails its VM, never the other VMs; every remote resource is on the cleanup ledger and is
released in reverse order however the job ends.

Levels: a full reads each disk's allocation map; an incremental (or differential) reads the
changed regions against the reference snapshot in the VM's state and writes a delta stream that
names its reference. Any disk that cannot be a delta is read in full in the same job, with a
warning (`references.py`); on success the new snapshot becomes the reference.
"""

from __future__ import annotations

__all__ = ["BackupJob"]

import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass

import trio

from .. import __version__
from .. import log as msgs
from ..drivers import (
    BackupWriter,
    DataPath,
    DiskReader,
    HypervisorSession,
    Sink,
    StoredBackup,
    VmStage,
)
from ..errors import AhvBackupError, ApiError, ConfigError, HypervisorError, SinkError, our_errors
from ..ledger import ReleaseStack
from ..manifest import DiskEntry, Manifest, RemovedDisk, VmIdentity
from ..model import DiskSnapshot, Region, VmInfo, VmSnapshot
from ..plugins import load_driver
from ..repository import new_backup_id, stream_name
from ..state import DiskState, VmState
from ..stream import MAX_DATA_LENGTH, StreamHeader, StreamReader, Trailer
from .chain import ChainImage, resolve_chain
from .codec import stream_codec, stream_keys
from .concurrency import each_limited
from .encode import PACK_WINDOW, encode_disk
from .readahead import Chunk, read_chunks
from .references import DiskPlan, plan_disk, unreferenced
from .regions import coalesce
from .results import DiskResult, JobResult, VmResult
from .retention import apply_retention
from .runtime import Runtime, resolve_data_path
from .selection import select_vms

log = logging.getLogger("ahvbackup.backup")

#: bytes of reads in flight per disk (memory per disk is this plus two chunks)
READ_WINDOW = 32 << 20
#: piece size of the change-tracking trust check (verify_unchanged_sample)
SAMPLE_BLOCK = 1 << 20
#: what the cluster answers when a reference snapshot (file) is gone or unusable
_REFERENCE_GONE = (404, 410, 422)

Progress = Callable[[int], None]


@dataclass(frozen=True)
class _VmWork:
    """What every disk of one VM's backup shares."""

    session: HypervisorSession
    datapath: DataPath
    staged: VmStage  # the VM's disks as the data path staged them together
    vm: VmInfo
    snap: VmSnapshot
    writer: BackupWriter
    backup_id: str
    backups: Mapping[str, StoredBackup]  # the VM's stored backups, for chain depth


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
        self.keeps_chains = load_driver("sink", self.cfg.sink, base=Sink).keeps_chains
        self.codec = stream_codec(self.cfg)  # refuses encryption_key where it cannot work
        if self.cfg.level != "full" and not self.keeps_chains:
            raise ConfigError(
                f"level: {self.cfg.level} backups need a sink that keeps chains; the "
                f"{self.cfg.sink} sink does not yet (use level=full, or sink=directory)"
            )

    async def run(self) -> JobResult:
        cfg, rt = self.cfg, self.rt
        started = time.monotonic()
        result = JobResult(job_id=rt.job_id, mode=cfg.mode, warnings=list(cfg.warnings))
        for warning in cfg.warnings:
            log.warning("%s", warning)
        log.info(msgs.backend_up(__version__, mode=cfg.mode, level=cfg.level, vm=",".join(cfg.vm)))
        rt.hooks.job_started(job_id=rt.job_id, mode=cfg.mode, level=cfg.level, config=cfg)
        try:
            async with rt.hypervisor.connect() as session:
                log.info("%s", await session.discover())
                if cfg.job_cleanup_on_abort:
                    await rt.sweep(session)
                vms, warnings = select_vms(
                    await session.list_vms(), include=cfg.vm, exclude=cfg.exclude,
                    cluster=cfg.cluster, project=cfg.project,
                )
                for w in warnings:
                    log.warning("%s", w)
                result.warnings += warnings
                log.info(msgs.selected_vms(len(vms), [v.name for v in vms]))
                datapath = (
                    None if cfg.mode == "estimate" else await resolve_data_path(cfg, session)
                )
                result.vms = [VmResult(vm_uuid=vm.uuid, vm_name=vm.name) for vm in vms]
                # started in selection order, at most concurrent_vms at once
                await each_limited(zip(vms, result.vms, strict=True), cfg.concurrent_vms,
                                   lambda pair: self._vm(session, datapath, *pair))
        finally:
            result.seconds = time.monotonic() - started
            # before job_finished: an exporter writes its output there
            rt.hooks.measure({"mode": cfg.mode, "outcome": "ok" if result.ok else "failed"},
                             job_seconds=result.seconds)
            rt.hooks.job_finished(
                job_id=rt.job_id, ok=result.ok, failed=result.failed, seconds=result.seconds
            )
        return result

    async def _vm(
        self, session: HypervisorSession, datapath: DataPath | None, vm: VmInfo, vr: VmResult,
    ) -> None:
        rt = self.rt
        vm_started = time.monotonic()
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
        labels = {"mode": self.cfg.mode, "vm": vm.name, "outcome": "ok" if vr.ok else "failed"}
        rt.hooks.measure(labels, vm_bytes_read=vr.bytes_read, vm_bytes_stored=vr.bytes_stored,
                         vm_seconds=time.monotonic() - vm_started)
        if vr.ok and self.cfg.mode == "backup":
            rt.hooks.measure({"vm": vm.name}, vm_last_success_timestamp=time.time())

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
        old_state, state_problem = rt.states.load(vm.uuid)
        if state_problem:
            log.warning("VM %s: %s", vm.name, state_problem)
            vr.warnings.append(f"VM {vm.name}: {state_problem}")
        backups: dict[str, StoredBackup] = {}
        if cfg.level != "full" and old_state is not None:
            backups = {b.backup_id: b for b in await rt.sink.backups(vm.uuid)}
        stack = ReleaseStack(rt.ledger, owner=rt.job_id, releaser=session.release)
        async with stack:
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
            wanted = self._wanted_disks(vm, snap)
            plans = {
                d.disk.uuid: plan_disk(
                    level=cfg.level, vm_name=vm.name, disk=d, state=old_state,
                    state_problem=state_problem, backups=backups,
                )
                for d in wanted
            }
            if cfg.mode == "estimate":
                await self._estimate(session, vm, wanted, plans, vr)
                return
            assert datapath is not None
            writer = await rt.sink.begin(vm, backup_id=backup_id, level=cfg.level)
            try:
                vr.disks = [DiskResult(label=d.disk.label, size=d.size) for d in wanted]
                async with datapath.stage(session, wanted, stack=stack) as staged:
                    work = _VmWork(session=session, datapath=datapath, staged=staged, vm=vm,
                                   snap=snap, writer=writer, backup_id=backup_id,
                                   backups=backups)
                    # in disk order, at most concurrent_disks at once
                    await each_limited(
                        zip(wanted, vr.disks, strict=True), cfg.concurrent_disks,
                        lambda pair: self._disk(work, pair[0], plans[pair[0].disk.uuid],
                                                pair[1]))
                _all_disks_ok(vr)
                for dr in vr.disks:
                    vr.warnings += dr.warnings
                removed = self._removed_disks(vm, old_state)
                for r in removed:
                    warning = (f"VM {vm.name}: disk {r.label} ({r.uuid}) was removed since "
                               "the last backup; recorded in the manifest")
                    log.warning("%s", warning)
                    vr.warnings.append(warning)
                stored = await writer.commit(
                    self._manifest(vm, snap, vr, backup_id=backup_id, created=created,
                                   removed=removed)
                )
            except BaseException:
                with trio.CancelScope(shield=True):
                    await writer.abort()
                raise
            vr.backup_id = stored.backup_id
            self._retain(vm, snap, vr, old_state, backup_id, stack)
        vr.warnings += stack.left_behind()
        vr.ok = True
        log.info(msgs.backup_complete(vm.name, len(vr.disks), vr.bytes_read, vr.bytes_stored))
        if cfg.keep_fulls or cfg.keep_days:
            try:
                await apply_retention(rt, vm_uuid=vm.uuid, keep_fulls=cfg.keep_fulls,
                                      keep_days=cfg.keep_days)
            except AhvBackupError as err:  # the backup itself is complete
                warning = f"VM {vm.name}: retention could not run: {err}"
                log.warning("%s", warning)
                vr.warnings.append(warning)

    def _retain(
        self, vm: VmInfo, snap: VmSnapshot, vr: VmResult, old: VmState | None, backup_id: str,
        stack: ReleaseStack,
    ) -> None:
        """Make the new snapshot the reference in state; queue unreferenced ones for deletion."""
        rt = self.rt
        by_label = {d.label: d for d in vr.disks}
        disks = {} if old is None else {
            u: d for u, d in old.disks.items()
            if any(s.disk.uuid == u for s in snap.disks) and d.label not in by_label
        }
        for d in snap.disks:
            dr = by_label.get(d.disk.label)
            if dr is None:
                continue
            prev = old.disks.get(d.disk.uuid) if old is not None else None
            full = dr.kind == "full" or prev is None
            sid, handle = (snap.id, d.handle) if self.keeps_chains else ("", "")
            disks[d.disk.uuid] = DiskState(
                disk_uuid=d.disk.uuid, label=d.disk.label, size=d.size, snapshot_id=sid,
                handle=handle, backup_id=backup_id,
                full_backup_id=backup_id if full else prev.full_backup_id,  # type: ignore[union-attr]
                full_snapshot_id=sid if full else prev.full_snapshot_id,  # type: ignore[union-attr]
                full_handle=handle if full else prev.full_handle,  # type: ignore[union-attr]
                force_full=dr.trust_mismatch,
            )
        new = VmState(
            vm_uuid=vm.uuid, vm_name=vm.name, disks=disks, last_backup_id=backup_id,
            last_full_backup_id=(
                backup_id if all(d.kind == "full" for d in vr.disks)
                else (old.last_full_backup_id if old else "")
            ),
            cluster_uuid=vm.cluster_uuid,
        )
        doomed = [
            stack.record("snapshot", sid, cluster=(old.cluster_uuid if old and old.cluster_uuid
                                                   else vm.cluster_uuid), vm=vm.name)
            for sid in sorted(unreferenced(old, new))
        ]
        try:
            rt.states.save(new)
        except OSError as err:
            for rec in doomed:
                stack.keep(rec)  # the old state still names them
            raise SinkError(
                f"VM {vm.name}: cannot write its state in {rt.states.dir} ({err.strerror}); "
                f"backup {backup_id} is stored but the next backup builds on the previous one"
            ) from err
        if snap.id in new.snapshot_ids():
            kept = stack.held("snapshot", snap.id)
            if kept is not None:
                stack.keep(kept)

    def _removed_disks(self, vm: VmInfo, old: VmState | None) -> list[RemovedDisk]:
        if old is None or self.disks:
            return []
        now = {d.uuid for d in vm.disks}
        return [RemovedDisk(uuid=d.disk_uuid, label=d.label, size=d.size,
                            last_backup=d.backup_id)
                for d in old.disks.values() if d.disk_uuid not in now]

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

    async def _estimate(
        self, session: HypervisorSession, vm: VmInfo, wanted: list[DiskSnapshot],
        plans: dict[str, DiskPlan], vr: VmResult,
    ) -> None:
        """mode=estimate: what a backup would read, from the region maps alone."""
        for disk in wanted:
            dr = DiskResult(label=disk.disk.label, size=disk.size, ok=True)
            plan, regions = await self._regions(session, vm, disk, plans[disk.disk.uuid])
            dr.kind = plan.kind
            if plan.warning:
                dr.warnings.append(plan.warning)
                log.warning("%s", plan.warning)
            async for region in regions:
                if region.zero:
                    dr.zero_bytes += region.length
                else:
                    dr.estimated_bytes += region.length
            vr.disks.append(dr)
            vr.warnings += dr.warnings
        vr.ok = True
        log.info("estimate: VM %s disks=%d would read %d bytes of %d", vr.vm_name,
                 len(vr.disks), sum(d.estimated_bytes for d in vr.disks),
                 sum(d.size for d in vr.disks))

    async def _regions(
        self, session: HypervisorSession, vm: VmInfo, disk: DiskSnapshot, plan: DiskPlan
    ) -> tuple[DiskPlan, AsyncIterator[Region]]:
        """The region map for `plan`; a reference the cluster no longer has turns it into a
        full (asked before any data moves, so the stream's kind is known up front)."""
        if plan.kind == "full":
            return plan, coalesce(session.regions(disk), label=disk.disk.label, size=disk.size)
        it = aiter(session.regions(disk, reference=plan.reference_handle))
        try:
            first = await anext(it, None)
        except ApiError as err:
            if err.status not in _REFERENCE_GONE:
                raise
            why = (f"VM {vm.name} disk {disk.disk.label}: reference snapshot "
                   f"{plan.reference_snapshot_id} is gone on the cluster ({err}); "
                   "reading it in full")
            return plan.full(why), coalesce(session.regions(disk), label=disk.disk.label,
                                            size=disk.size)
        return plan, coalesce(_prepend(first, it), label=disk.disk.label, size=disk.size)

    async def _disk(self, w: _VmWork, disk: DiskSnapshot, plan: DiskPlan,
                    dr: DiskResult) -> None:
        rt, session, vm = self.rt, w.session, w.vm
        rt.hooks.disk_started(job_id=rt.job_id, vm_name=vm.name, disk=dr.label, size=disk.size)
        try:
            plan, regions = await self._regions(session, vm, disk, plan)
            dr.kind = plan.kind
            if plan.warning:
                log.warning("%s", plan.warning)
                dr.warnings.append(plan.warning)
            if plan.reference_backup is not None:
                dr.reference_backup = plan.reference_backup.backup_id
                dr.reference_snapshot = plan.reference_snapshot_id
            async with ReleaseStack(
                rt.ledger, owner=rt.job_id, releaser=session.release
            ) as stack:
                t0 = time.monotonic()
                async with w.staged.open(disk, stack=stack) as reader:
                    t1 = time.monotonic()
                    changed: list[tuple[int, int]] = []
                    dr.bytes_stored = await self._stream_disk(
                        w, disk, plan, _noting(regions, changed), reader, dr)
                    if plan.kind != "full" and self.cfg.verify_unchanged_sample > 0:
                        await self._trust_check(vm, disk, plan, reader, changed, dr)
                t2 = time.monotonic()
            dr.warnings += stack.left_behind()
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
        rt.hooks.measure(
            {"mode": self.cfg.mode, "vm": vm.name, "disk": dr.label, "kind": dr.kind,
             "outcome": "ok" if dr.ok else "failed"},
            disk_bytes_read=dr.bytes_read, disk_bytes_stored=dr.bytes_stored,
            disk_zero_bytes=dr.zero_bytes, disk_read_seconds=dr.read_seconds,
        )
        shape = _chain_shape(w.backups, plan, dr) if dr.ok else None
        if shape is not None:
            rt.hooks.measure({"mode": self.cfg.mode, "vm": vm.name, "disk": dr.label,
                              "kind": dr.kind}, disk_chain_depth=shape[0],
                             disk_incremental_ratio=shape[1])

    async def _trust_check(
        self, vm: VmInfo, disk: DiskSnapshot, plan: DiskPlan, reader: DiskReader,
        changed: list[tuple[int, int]], dr: DiskResult,
    ) -> None:
        """verify_unchanged_sample: re-read a random sample of what change tracking called
        unchanged and compare it with the reference backup. A mismatch is reported loudly and
        the disk is read in full next time."""
        assert plan.reference_backup is not None and plan.reference_entry is not None
        pieces = []
        pos = 0
        for start, end in [*changed, (disk.size, disk.size)]:
            while pos < start:
                n = min(SAMPLE_BLOCK - pos % SAMPLE_BLOCK, start - pos)
                pieces.append((pos, n))
                pos += n
            pos = max(pos, end)
        if not pieces:
            return
        count = max(1, math.ceil(len(pieces) * self.cfg.verify_unchanged_sample / 100))
        sample = sorted(random.sample(pieces, min(count, len(pieces))))
        backups = {b.backup_id: b for b in await self.rt.sink.backups(vm.uuid)}
        links = resolve_chain(backups, plan.reference_backup, plan.reference_entry)
        image = await trio.to_thread.run_sync(ChainImage, self.rt.sink, links,
                                             False, stream_keys(self.cfg))
        mismatched = []
        try:
            for off, n in sample:
                now = bytearray(n)
                await reader.read_into(off, memoryview(now))
                before = await trio.to_thread.run_sync(image.read, off, n)
                dr.sampled_bytes += n
                if before != now:
                    mismatched.append(off)
        finally:
            image.close()
        if mismatched:
            dr.trust_mismatch = (
                f"change tracking missed changes at {len(mismatched)} of {len(sample)} sampled "
                f"unchanged regions (first at offset {mismatched[0]}) in backup of "
                f"{dr.label}"
            )
            warning = (f"VM {vm.name} disk {dr.label}: TRUST CHECK FAILED: "
                       f"{dr.trust_mismatch}; this delta may be incomplete, the next backup "
                       "reads the disk in full")
            log.error("%s", warning)
            dr.warnings.append(warning)
        else:
            log.info("VM %s disk %s: trust check: %d sampled unchanged bytes match the "
                     "reference backup", vm.name, dr.label, dr.sampled_bytes)

    async def _stream_disk(
        self, w: _VmWork, disk: DiskSnapshot, plan: DiskPlan, regions: AsyncIterator[Region],
        reader: DiskReader, dr: DiskResult,
    ) -> int:
        vm, snap, backup_id = w.vm, w.snap, w.backup_id
        chunk_size = min(w.datapath.read_size(), MAX_DATA_LENGTH)
        inflight = max(2, min(8, READ_WINDOW // chunk_size))
        chunks_send, chunks_recv = trio.open_memory_channel[Chunk](0)
        # unbuffered: the encoder recycles a buffer once the sink asked for the next item
        bytes_send, bytes_recv = trio.open_memory_channel[bytes | memoryview](0)
        ref_backup = ref_stream = ""
        if plan.kind != "full":
            assert plan.reference_backup is not None and plan.reference_entry is not None
            ref_backup = plan.reference_backup.backup_id
            ref_stream = await self._stream_id(plan.reference_backup, plan.reference_entry)
        header = StreamHeader(
            kind=plan.kind, vm_uuid=vm.uuid, vm_name=vm.name, disk_uuid=disk.disk.uuid,
            disk_label=dr.label, disk_bus=disk.disk.bus.lower(), disk_index=disk.disk.index,
            disk_size=disk.size, block_size=chunk_size, snapshot_id=snap.id, backup_id=backup_id,
            reference_snapshot_id=plan.reference_snapshot_id if plan.kind != "full" else "",
            reference_backup_id=ref_backup, reference_stream_id=ref_stream,
        )
        dr.stream_id = header.stream_id

        def on_end(trailer: Trailer) -> None:
            dr.digest = trailer.digest_hex  # the manifest binds the stream by it

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
                    reader, regions, chunk_size=chunk_size, inflight=inflight,
                    # the encoder holds the chunks it compresses ahead, plus the one going out
                    # and the one being written: fewer spare buffers would deadlock it
                    out=chunks_send, spare=PACK_WINDOW + 2,
                )
            )
            nursery.start_soon(encode_disk, header, chunks_recv, bytes_send, on_chunk, on_end,
                               self.codec)
            stored = await w.writer.write_disk(dr.label, _iterate(bytes_recv))
        return stored

    async def _stream_id(self, backup: StoredBackup, entry: DiskEntry) -> str:
        """The reference stream's id: from its manifest, else from the stream's header."""
        if entry.stream_id:
            return entry.stream_id

        def read_header() -> str:
            with self.rt.sink.open_stream(backup, entry.label) as f:
                return StreamReader(f).header.stream_id

        return await trio.to_thread.run_sync(read_header)

    def _manifest(
        self, vm: VmInfo, snap: VmSnapshot, vr: VmResult, *, backup_id: str, created: float,
        removed: list[RemovedDisk],
    ) -> Manifest:
        by_label = {d.label: d for d in vr.disks}
        disks = tuple(
            DiskEntry(
                label=d.disk.label, uuid=d.disk.uuid, bus=d.disk.bus, index=d.disk.index,
                size=d.size, container=d.disk.container, stream=stream_name(d.disk.label),
                stream_id=r.stream_id, digest=r.digest, kind=r.kind, bytes_read=r.bytes_read,
                zero_bytes=r.zero_bytes, bytes_stored=r.bytes_stored,
                reference_backup=r.reference_backup or "",
                reference_snapshot=r.reference_snapshot or "", warnings=tuple(r.warnings),
            )
            for d in snap.disks
            if (r := by_label.get(d.disk.label)) is not None
        )
        # an incremental whose every disk had to be read in full is a full (and listed so)
        level = self.cfg.level if any(d.kind != "full" for d in disks) else "full"
        return Manifest(
            producer=f"ahvbackup {__version__}", backup_id=backup_id, job_id=self.rt.job_id,
            level=level, created=created, completed=time.time(),
            vm=VmIdentity(uuid=vm.uuid, name=vm.name, cluster_uuid=vm.cluster_uuid,
                          cluster_name=vm.cluster_name),
            snapshot_id=snap.id, consistency=snap.consistency, config=dict(vm.config),
            disks=disks, removed_disks=tuple(removed),
        )


async def _prepend(first: Region | None, rest: AsyncIterator[Region]) -> AsyncIterator[Region]:
    if first is not None:
        yield first
        async for r in rest:
            yield r


async def _noting(
    regions: AsyncIterator[Region], into: list[tuple[int, int]]
) -> AsyncIterator[Region]:
    """Pass regions on, noting their extents (the trust check samples outside them)."""
    async for r in regions:
        if into and into[-1][1] == r.offset:
            into[-1] = (into[-1][0], r.end)
        else:
            into.append((r.offset, r.end))
        yield r


async def _iterate(
    recv: trio.MemoryReceiveChannel[bytes | memoryview],
) -> AsyncIterator[bytes | memoryview]:
    async with recv:
        async for item in recv:
            yield item


def _chain_shape(
    backups: Mapping[str, StoredBackup], plan: DiskPlan, dr: DiskResult
) -> tuple[int, float] | None:
    """(backups a restore of this disk reads, its bytes stored over its full's): (1, 1.0)
    for a full; None when the reference's own chain does not resolve (restore says why)."""
    if dr.kind == "full" or plan.reference_backup is None or plan.reference_entry is None:
        return 1, 1.0
    try:
        links = resolve_chain(backups, plan.reference_backup, plan.reference_entry)
    except AhvBackupError:
        return None
    return len(links) + 1, dr.bytes_stored / max(1, links[0].entry.bytes_stored)


class _VmFailed(AhvBackupError):
    pass


def _all_disks_ok(vr: VmResult) -> None:
    """A VM is kept only whole: one failed disk fails it (and its backup is not committed)."""
    failed = [d for d in vr.disks if not d.ok]
    if failed:
        why = "; ".join(f"{d.label}: {d.error}" for d in failed if d.error)
        vr.error = (f"disk(s) {', '.join(d.label for d in failed)} failed"
                    + (f" ({why})" if why else "") + "; no backup of this VM was kept")
        raise _VmFailed(vr.error)
