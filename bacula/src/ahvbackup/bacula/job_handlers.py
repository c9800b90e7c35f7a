"""The metaplugin backend's real work: backup, estimate, listing and restore of AHV VMs.

Backup runs `BackupJob` with the ``bacula`` sink attached to the session's file emitter, so per
VM Bacula receives ``@ahvbackup/<cluster>/<vm>/<backup id>/disks/<label>.ahvd`` for each disk
and then ``.../<backup id>/vm.json`` (the manifest: VM configuration, snapshot, disks). Restore
takes those files back with the Job's ``where`` applied, several backups' at once: each disk
stream is spooled and checked as it arrives, each ``vm.json`` kept (and written as a file),
and at FINISH every VM is restored at the newest backup received, its chain applied in one
pass through the configured restore target (`restore_collect`). Cancellation (SIGUSR1) cancels
the job's trio scope; the job's release stacks then release every snapshot, staged image,
volume group and half-made VM through the ledger.
"""

from __future__ import annotations

__all__ = ["JobHandlers", "backup_config"]

import dataclasses
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from ahvbackup.core.config import Config
from ahvbackup.core.containment import ContainmentError, check_part, open_inside
from ahvbackup.core.drivers import RestoreTarget
from ahvbackup.core.errors import ConfigError, SinkError
from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.results import JobResult
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.core.jobs.selection import select_vms
from ahvbackup.core.plugins import load_driver
from ahvbackup.targets.raw import image_parts

from .handlers import BackendContext, BackendHandlers, FileEmitter, RestoreFile
from .restore_collect import restore_received
from .sink import BaculaSink, virtual_part
from .spool import MANIFEST_MAX, RestoreSpool

log = logging.getLogger("ahvbackup.bacula.jobs")

STREAM_SUFFIX = ".ahvd"
MANIFEST = "vm.json"


def backup_config(config: Config) -> tuple[Config, list[str]]:
    """The configuration a Bacula backup runs with, and warnings for what had to change.

    - retention (keep_fulls, keep_days) is Bacula's job: its Pool and Job retention apply;
    - verify_unchanged_sample needs to read the reference backup back, which lives in Bacula.
    """
    warnings = []
    changes: dict[str, object] = {"sink": "bacula"}
    if config.keep_fulls or config.keep_days:
        changes.update(keep_fulls=0, keep_days=0)
        warnings.append("keep_fulls/keep_days do not apply to Bacula backups (Bacula's own "
                        "retention does); ignored")
    if config.verify_unchanged_sample:
        changes["verify_unchanged_sample"] = 0.0
        warnings.append("verify_unchanged_sample needs the reference backup on this host; "
                        "not available with Bacula, ignored")
    return dataclasses.replace(config, **changes), warnings  # type: ignore[arg-type]


class JobHandlers(BackendHandlers):
    """Backup, estimate, listing and restore through the job engine."""

    # backup and estimate ------------------------------------------------------------------
    async def backup(self, ctx: BackendContext, emitter: FileEmitter) -> None:
        cfg, warnings = backup_config(ctx.config)
        for warning in warnings:
            await ctx.messages.warning(warning)
        if not emitter.wants_data:
            cfg = dataclasses.replace(cfg, mode="estimate")
        rt = Runtime.from_config(cfg)
        sink = rt.sink
        assert isinstance(sink, BaculaSink)
        sink.attach_emitter(emitter, path_of=ctx.path, messages=ctx.messages)
        try:
            result = await BackupJob(rt).run()
        finally:
            sink.cleanup()
        if not emitter.wants_data:
            await self._estimate_files(ctx, emitter, rt, result)
        await self._report(ctx, result)

    async def _estimate_files(self, ctx: BackendContext, emitter: FileEmitter, rt: Runtime,
                              result: JobResult) -> None:
        """The files a backup would send, sized by what it would read."""
        async with rt.hypervisor.connect() as session:
            clusters = {v.uuid: v.cluster_name or v.cluster_uuid
                        for v in await session.list_vms()}
        now = time.time()
        for vr in result.vms:
            cluster = virtual_part(clusters.get(vr.vm_uuid, vr.vm_uuid))
            vm = virtual_part(vr.vm_name)
            for d in vr.disks:
                await emitter.file(ctx.path(cluster, vm, "disks", f"{d.label}{STREAM_SUFFIX}"),
                                   size=d.estimated_bytes, mtime=now)
            await emitter.file(ctx.path(cluster, vm, "vm.json"), size=0, mtime=now)

    async def _report(self, ctx: BackendContext, result: JobResult) -> None:
        if not result.vms:
            await ctx.messages.error("no VM matched the selection (vm=, exclude=, cluster=)")
        for vr in result.vms:
            if vr.ok and result.mode == "estimate":
                total = sum(d.estimated_bytes for d in vr.disks)
                await ctx.messages.info(f"VM {vr.vm_name}: estimate {len(vr.disks)} disk(s), "
                                        f"{total} bytes to read")
            elif vr.ok:
                kinds = ",".join(f"{d.label}:{d.kind}" for d in vr.disks)
                await ctx.messages.info(
                    f"VM backed up: vm={vr.vm_name} backup={vr.backup_id} disks={kinds} "
                    f"read={vr.bytes_read} stored={vr.bytes_stored} "
                    f"consistency={vr.consistency}")
            else:
                await ctx.messages.error(f"VM {vr.vm_name}: backup failed: {vr.error}")
            for w in vr.warnings:
                await ctx.messages.warning(w)

    async def estimate(self, ctx: BackendContext, emitter: FileEmitter) -> None:
        await self.backup(ctx, emitter)

    # listing: clusters, then the VMs of a cluster ---------------------------------------------
    async def listing(self, ctx: BackendContext, emitter: FileEmitter) -> None:
        rt = Runtime.from_config(dataclasses.replace(ctx.config, sink="bacula"))
        async with rt.hypervisor.connect() as session:
            vms, _ = select_vms(await session.list_vms(), include=ctx.config.vm,
                                exclude=ctx.config.exclude, cluster=ctx.config.cluster,
                                project=ctx.config.project)
        now = time.time()
        top = (ctx.listing or "/").strip("/").split("/")
        top = [p for p in top if p and not p.startswith("@")]
        clusters = sorted({virtual_part(v.cluster_name or v.cluster_uuid) for v in vms})
        if not top:
            for c in clusters:
                await emitter.directory(ctx.path(c), mtime=now)
            return
        for v in vms:
            if virtual_part(v.cluster_name or v.cluster_uuid) == top[0]:
                await emitter.directory(ctx.path(top[0], virtual_part(v.name)), mtime=now)

    # restore ------------------------------------------------------------------------------
    # Every file is taken as it comes (disk streams spooled and checked, vm.json kept); at
    # FINISH each VM is restored at the newest point received (restore_collect).
    _spool: RestoreSpool | None = None

    def _target_needs_cluster(self, ctx: BackendContext) -> bool:
        return bool(load_driver("target", ctx.config.target, base=RestoreTarget).needs_cluster)

    def _where(self, ctx: BackendContext) -> Path:
        if not ctx.job.where or ctx.job.where.strip("/") == "":
            if self._target_needs_cluster(ctx):
                return Path("/")  # a VM on a cluster: nothing is written under where
            raise ConfigError("where: a restore of ahvbackup files needs a restore folder "
                              "(bconsole: restore ... where=/path); disks are rebuilt there")
        return Path(ctx.job.where)

    def _parts(self, ctx: BackendContext, fname: str) -> tuple[Path, list[str]]:
        """`fname` as (where, the components below it), each a plain name: a ``..``, a
        control character or a name outside `where` is refused by name."""
        where = self._where(ctx)
        prefix = str(where).rstrip("/") + "/"
        if not fname.startswith(prefix):
            raise ContainmentError(f"{fname}: not under the restore folder {where}; refused")
        parts = [p for p in fname[len(prefix):].split("/") if p]  # a//b is a/b
        for part in parts:
            check_part(part, what=f"restore of {fname}")
        if not parts:
            raise ContainmentError(f"{fname}: names the restore folder itself; refused")
        return where, parts

    async def restore_wanted(self, ctx: BackendContext, file: RestoreFile) -> bool:
        where, parts = self._parts(ctx, file.fname)
        name = parts[-1]
        if name.endswith(STREAM_SUFFIX) and parts[-2:-1] == ["disks"]:
            label = name.removesuffix(STREAM_SUFFIX)
            only = ctx.config.restore_disks_only
            # disk-N names a disk by its place in vm.json: chosen once every file is in
            if only and not any(re.fullmatch(r"disk-\d+", n) for n in only) \
                    and label not in only:
                return False
            if ctx.job.replace == "n" and not self._target_needs_cluster(ctx):
                folder = parts[:-2]
                for vm_at in {len(folder) - 1, len(folder) - 2} - {-1}:  # both layouts
                    image = where.joinpath(*folder[:vm_at], *image_parts(folder[vm_at], label))
                    if image.exists():
                        await ctx.messages.info(f"{image} exists and replace=never: skipped")
                        return False
        return True

    async def restore_file(self, ctx: BackendContext, file: RestoreFile,
                           data: AsyncIterator[memoryview]) -> None:
        where, parts = self._parts(ctx, file.fname)
        if self._spool is None:
            self._spool = RestoreSpool(ctx.config)
        if parts[-1].endswith(STREAM_SUFFIX) and parts[-2:-1] == ["disks"]:
            got = await self._spool.take_stream(file.fname, data)
            h = got.header
            log.info("received %s: %s stream of %s %s, backup %s, %d bytes", file.fname,
                     h.kind, h.vm_name, h.disk_label, h.backup_id, got.size)
            return
        if parts[-1] == MANIFEST:
            doc = await _read_all(data, limit=MANIFEST_MAX, what=file.fname)
            self._spool.take_manifest(file.fname, doc)
            if where != Path("/"):
                await _write_plain(where, parts, _once(doc))
            return
        await _write_plain(where, parts, data)

    async def restore_finish(self, ctx: BackendContext) -> None:
        spool, self._spool = self._spool, None
        if spool is None:
            return
        try:
            await restore_received(ctx, spool, self._where(ctx))
        finally:
            with trio.CancelScope(shield=True):  # a cancelled job removes its spool too
                await trio.to_thread.run_sync(spool.close)

    async def end(self, ctx: BackendContext) -> None:
        if self._spool is not None:  # FINISH never came: nothing is restored half
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._spool.close)
            self._spool = None


async def _read_all(data: AsyncIterator[memoryview], *, limit: int, what: str) -> bytes:
    out = bytearray()
    async for block in data:
        out += block
        if len(out) > limit:
            raise SinkError(f"{what}: larger than {limit} bytes; not an ahvbackup vm.json")
    return bytes(out)


async def _once(doc: bytes) -> AsyncIterator[memoryview]:
    yield memoryview(doc)


async def _write_plain(where: Path, parts: list[str], data: AsyncIterator[memoryview]) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd, path = open_inside(where, parts, flags=flags, mode=0o640, what="restore")
    try:
        with os.fdopen(fd, "wb") as out:
            async for block in data:
                out.write(block)
    except OSError as err:
        raise SinkError(f"{path}: cannot write it ({err.strerror})") from err
