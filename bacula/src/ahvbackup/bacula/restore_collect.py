"""A metaplugin restore, once every file is in: each VM restored at the newest point received.

Per VM, the newest backup whose ``vm.json`` arrived is the point restored; the links of its
chain (the backups its disks' deltas build on) must be in the same restore job, which
bconsole's "most recent backup" selection gives, since every backup's files are named apart
(``<vm>/<backup id>/...``). The point is then restored by the ordinary restore job
(`RestoreJob`) from the spool, through whatever target is configured: the chain resolved and
checked link by link, each output range written once, a cluster target given its session
(`cluster_for`), the VM committed whole or removed.

A chain that is not all in the job can still be restored link by link into raw images
(``target=raw``, every link its own restore job, oldest first, into one where): backups taken
before files were named per backup have no other way. Any other target is refused, naming the
missing backups.
"""

from __future__ import annotations

__all__ = ["restore_received", "vm_folder_index"]

import dataclasses
import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import trio

from ahvbackup.core.containment import folders_inside, safe_name
from ahvbackup.core.drivers import RestoreTarget, StoredBackup
from ahvbackup.core.errors import AhvBackupError, ConfigError, TargetError, our_errors
from ahvbackup.core.jobs.codec import stream_keys
from ahvbackup.core.jobs.restore import RestoreJob, select_disks
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.core.manifest import DiskEntry
from ahvbackup.core.plugins import load_driver
from ahvbackup.targets.raw import RawTarget

from .apply import StreamApplier, apply_stream, write_chain_file
from .handlers import BackendContext
from .spool import RestoreSpool, SpooledStream

log = logging.getLogger("ahvbackup.bacula.restore")


def vm_folder_index(parts: Sequence[str], backup_id: str) -> int:
    """Where the VM's folder is in a restored file's path components below where:
    ``.../<vm>/<backup id>/(vm.json | disks/<label>.ahvd)``, or, for backups taken before
    files were named per backup, ``.../<vm>/(vm.json | disks/<label>.ahvd)``."""
    leaf = 2 if parts[-2:-1] == ["disks"] else 1
    below = len(parts) - leaf - 1  # the folder holding vm.json or disks/
    if below >= 1 and parts[below] == safe_name(backup_id):
        return below - 1
    return below


async def restore_received(ctx: BackendContext, spool: RestoreSpool, where: Path) -> None:
    """Restore every VM something was received for; a VM that fails is one job error (the
    others go on)."""
    for vm_uuid in spool.vm_uuids():
        try:
            await _restore_vm(ctx, spool, vm_uuid, where)
        except (AhvBackupError, BaseExceptionGroup) as err:
            errors = our_errors(err)
            if errors is None:
                raise
            name = _vm_name(spool, vm_uuid)
            await ctx.messages.error(f"VM {name}: restore failed: "
                                     + "; ".join(str(e) for e in errors))


def _vm_name(spool: RestoreSpool, vm_uuid: str) -> str:
    for m in spool.manifests_of(vm_uuid)[-1:]:
        return m.vm.name
    for s in spool.streams_of(vm_uuid)[-1:]:
        return s.header.vm_name or vm_uuid
    return vm_uuid


def _dest(where: Path, fname: str, backup_id: str) -> tuple[Path, str]:
    """(the folder the VM's folder goes in, the VM's folder) for a restored file."""
    parts = [p for p in fname[len(str(where).rstrip("/")) + 1:].split("/") if p]
    i = vm_folder_index(parts, backup_id)
    return folders_inside(where, parts[:i], what=f"restore of {fname}"), parts[i]


def _missing(spool: RestoreSpool, tip: StoredBackup, entries: Sequence[DiskEntry]) -> list[str]:
    """What the chain of each entry needs and the job does not hold."""
    out: list[str] = []
    for entry in entries:
        backup, e = tip, entry
        while True:
            if (tip.vm_uuid, backup.backup_id, e.uuid) not in spool.streams:
                out.append(f"disk {e.label} of backup {backup.backup_id}")
            ref = e.reference_backup
            if not ref:
                break
            m = spool.manifests.get((tip.vm_uuid, ref))
            below = m.disk(uuid=e.uuid) if m is not None else None
            if m is None or below is None:
                out.append(f"backup {ref} (the {e.kind} of {e.label} in backup "
                           f"{backup.backup_id} builds on it)")
                break
            backup, e = StoredBackup.of(m), below
    return list(dict.fromkeys(out))


async def _restore_vm(ctx: BackendContext, spool: RestoreSpool, vm_uuid: str,
                      where: Path) -> None:
    config = ctx.config
    target = load_driver("target", config.target, base=RestoreTarget)(config)
    manifests = spool.manifests_of(vm_uuid)
    streams = spool.streams_of(vm_uuid)
    name = _vm_name(spool, vm_uuid)
    if manifests:
        tip = StoredBackup.of(manifests[-1])
        entries = select_disks(tip, config.restore_disks_only)
        # a disk whose stream of this backup was not selected (unmarked, skipped) is left out
        left_out = [e.label for e in entries
                    if (tip.vm_uuid, tip.backup_id, e.uuid) not in spool.streams]
        if left_out and len(left_out) < len(entries):
            await ctx.messages.info(f"VM {name}: backup {tip.backup_id}: disk(s) "
                                    f"{', '.join(left_out)} not in this restore; left out")
            entries = tuple(e for e in entries if e.label not in left_out)
        missing = _missing(spool, tip, entries)
        if not missing:
            await _restore_point(ctx, spool, tip, target, where,
                                 disks=[e.label for e in entries])
            return
    else:
        tip = None
        missing = [f"the vm.json of backup {s.header.backup_id}" for s in streams[-1:]]
    if isinstance(target, RawTarget) and streams:
        await ctx.messages.info(
            f"VM {name}: this job holds part of a chain only ({'; '.join(missing)} missing); "
            "applying each stream onto the raw images earlier restores left in this where")
        await _link_by_link(ctx, streams, where)
        return
    raise ConfigError(
        f"VM {name}: backup {tip.backup_id if tip else '?'} needs {'; '.join(missing)}, "
        "which this restore job does not hold; select the newest backup with bconsole's "
        "most recent selection (restore client=<fd> select current ...), which includes "
        "every link of its chain, or mark the VM's folder")


async def _restore_point(ctx: BackendContext, spool: RestoreSpool, tip: StoredBackup,
                         target: RestoreTarget, where: Path, *, disks: Sequence[str]) -> None:
    fname = spool.manifest_files[(tip.vm_uuid, tip.backup_id)]
    if target.needs_cluster:
        dest = where
    else:
        dest, _ = await trio.to_thread.run_sync(_dest, where, fname, tip.backup_id)
    rt = Runtime.from_config(dataclasses.replace(ctx.config, sink="bacula"))
    rt = dataclasses.replace(rt, sink=spool)
    job = RestoreJob(rt, tip, dest=dest, target=target, disks=disks)
    out = await job.run()
    kinds = {e.label: e.kind for e in tip.manifest.disks}
    if not out.ok:
        raise TargetError("; ".join(d.error for d in out.disks if d.error)
                          or f"backup {tip.backup_id}: the restore failed")
    for d in out.disks:
        if isinstance(target, RawTarget):
            entry = tip.manifest.disk(label=d.label)
            assert entry is not None
            # what the image holds: a later link restored alone applies onto it
            await trio.to_thread.run_sync(functools.partial(
                write_chain_file, Path(d.path), vm_uuid=tip.vm_uuid, disk_uuid=entry.uuid,
                disk_size=entry.size, backup_ids=d.chain, snapshot_id=tip.manifest.snapshot_id,
                stream_id=entry.stream_id))
        await ctx.messages.info(
            f"disk restored: {d.path} ({kinds.get(d.label, '?')}, {d.data_bytes} data bytes, "
            f"{d.zero_bytes} zero bytes, chain {'+'.join(d.chain)})")
    await ctx.messages.info(f"VM restored: {tip.vm_name} backup {tip.backup_id} "
                            f"({len(out.disks)} disk(s)) to {out.path}")
    used = {(tip.vm_uuid, b, d.uuid) for d in tip.manifest.streams
            for b in next((x.chain for x in out.disks if x.label == d.label), [])}
    for key, s in spool.streams.items():
        if key[0] == tip.vm_uuid and key not in used:
            await ctx.messages.info(f"{s.fname}: not in the chain of backup {tip.backup_id} "
                                    "(the newest of this VM in this restore); not applied")


async def _link_by_link(ctx: BackendContext, streams: Sequence[SpooledStream],
                        where: Path) -> None:
    """Each stream onto the raw image its chain's earlier restores left, oldest first."""
    for s in streams:
        dest, folder = await trio.to_thread.run_sync(_dest, where, s.fname, s.header.backup_id)
        target = load_driver("target", ctx.config.target, base=RestoreTarget)(ctx.config)
        applier = StreamApplier(target=target, dest=dest, vm_name=folder, name=s.fname,
                                keys=stream_keys(ctx.config))
        try:
            with open(s.path, "rb") as f:
                out = await apply_stream(applier, f.read)
        except (AhvBackupError, BaseExceptionGroup) as err:
            errors = our_errors(err)
            if errors is None:
                raise
            await ctx.messages.error(f"{s.fname}: " + "; ".join(str(e) for e in errors))
            continue
        await ctx.messages.info(
            f"disk restored: {out.path} ({out.kind}, {out.data_bytes} data bytes, "
            f"{out.zero_bytes} zero bytes, chain {'+'.join(out.backup_ids)})")
