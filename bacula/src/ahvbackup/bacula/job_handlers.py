"""The metaplugin backend's real work: backup, estimate, listing and restore of AHV VMs.

Backup runs `BackupJob` with the ``bacula`` sink attached to the session's file emitter, so per
VM Bacula receives ``@ahvbackup/<cluster>/<vm>/disks/<label>.ahvd`` for each disk and then
``.../vm.json`` (the manifest: VM configuration, snapshot, disks). Restore takes those files
back with the Job's ``where`` applied: ``vm.json`` is written as a file, each ``.ahvd`` stream is
checked and applied onto a raw image beside it (``<where>/@ahvbackup/<cluster>/<vm>/<label>.raw``
with the raw target). Cancellation (SIGUSR1) cancels the job's trio scope; the job's release
stacks then release every snapshot and staged image through the ledger.
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
from ahvbackup.core.containment import ContainmentError, check_part, folders_inside, open_inside
from ahvbackup.core.drivers import RestoreTarget
from ahvbackup.core.errors import ConfigError, SinkError
from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.results import JobResult
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.core.jobs.selection import select_vms
from ahvbackup.core.plugins import load_driver
from ahvbackup.targets.raw import image_parts

from .apply import StreamApplier
from .handlers import BackendContext, BackendHandlers, FileEmitter, RestoreFile
from .sink import BaculaSink, virtual_part

log = logging.getLogger("ahvbackup.bacula.jobs")

STREAM_SUFFIX = ".ahvd"


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
                                exclude=ctx.config.exclude, cluster=ctx.config.cluster)
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
    def _where(self, ctx: BackendContext) -> Path:
        if not ctx.job.where or ctx.job.where.strip("/") == "":
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
        if name.endswith(STREAM_SUFFIX) and len(parts) >= 3:
            label = name.removesuffix(STREAM_SUFFIX)
            only = ctx.config.restore_disks_only
            by_position = [n for n in only if re.fullmatch(r"disk-\d+", n) and n != label]
            if by_position:
                # the Nth disk is known from vm.json, which Bacula restores after the disks
                raise ConfigError(f"restore_disks_only: {', '.join(by_position)}: a Bacula "
                                  "restore selects disks by label (scsi.0, scsi.1, ...), as "
                                  "the restore tree names them")
            if only and label not in only:
                return False
            image = where.joinpath(*parts[:-3], *image_parts(parts[-3], label))
            if ctx.job.replace == "n" and image.exists():
                await ctx.messages.info(f"{image} exists and replace=never: skipped")
                return False
        return True

    async def restore_file(self, ctx: BackendContext, file: RestoreFile,
                           data: AsyncIterator[memoryview]) -> None:
        where, parts = self._parts(ctx, file.fname)
        if not parts[-1].endswith(STREAM_SUFFIX) or len(parts) < 3:
            await _write_plain(where, parts, data)
            return
        # <...>/<vm>/disks/<label>.ahvd -> the image <...>/<vm>/<label>.raw (raw target)
        vm_parent = await trio.to_thread.run_sync(
            lambda: folders_inside(where, parts[:-3], what=f"restore of {file.fname}"))
        target = load_driver("target", ctx.config.target, base=RestoreTarget)(ctx.config)
        applier = StreamApplier(target=target, dest=vm_parent, vm_name=parts[-3],
                                name=file.fname)
        try:
            async for block in data:
                await applier.feed(block)
            out = await applier.finish()
        except BaseException:
            await applier.abort()
            raise
        await ctx.messages.info(
            f"disk restored: {out.path} ({out.kind}, {out.data_bytes} data bytes, "
            f"{out.zero_bytes} zero bytes, chain {'+'.join(out.backup_ids)})")


async def _write_plain(where: Path, parts: list[str], data: AsyncIterator[memoryview]) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd, path = open_inside(where, parts, flags=flags, mode=0o640, what="restore")
    try:
        with os.fdopen(fd, "wb") as out:
            async for block in data:
                out.write(block)
    except OSError as err:
        raise SinkError(f"{path}: cannot write it ({err.strerror})") from err
