"""Restore and verify commands."""

from __future__ import annotations

__all__ = ["restore", "verify"]

from pathlib import Path
from typing import Any

import click

from ..config import view_of_job
from ..drivers import DamagedBackup
from ..errors import ConfigError, JobError, StreamFormatError
from ..jobs.restore import RestoreJob, RestoreOutcome, VerifyJob, parse_time, pick_backup
from ..jobs.runtime import Runtime
from .context import Context, emit, pass_context
from .options import config_options, load_job_config, refuse_hosted_sink, run_trio
from .progress import Meter

#: `restore` runs the restore job's modes (restore); another mode= is an error naming both
RESTORE_VIEW = view_of_job("ahvbackup restore", "restore")


def _human(res: dict[str, Any]) -> str:
    lines = [f"{res['mode']} of backup {res['backup_id']} ({res['vm']}, {res['level']}): "
             f"{'ok' if res['ok'] else 'FAILED'}"]
    for d in res["disks"]:
        state = "ok" if d["ok"] else "FAILED"
        where = f" -> {d['path']}" if d["path"] else ""
        lines.append(f"  {d['label']:<10} {state:<7} size={d['size']:,} data={d['data_bytes']:,} "
                     f"digest={d['digest'][:16] or '-'}{where}")
        if len(d["chain"]) > 1:
            lines.append(f"    chain: {' -> '.join(d['chain'])}")
        if d["error"]:
            lines.append(f"    error: {d['error']}")
    return "\n".join(lines)


def _finish(ctx: Context, outcomes: list[RestoreOutcome]) -> None:
    docs = [o.to_json() for o in outcomes]
    emit(ctx, docs if len(docs) != 1 else docs[0],
         lambda d: "\n".join(_human(x) for x in (d if isinstance(d, list) else [d])))
    failed = [f for o in outcomes for f in o.failed]
    if failed:
        verify = all(o.mode == "verify" for o in outcomes)
        cls = StreamFormatError if verify else JobError
        raise cls(f"{len(failed)} disk(s) failed: {', '.join(failed)}")


@click.command()
@config_options
@click.option("--vm", help="VM name or UUID (restores its newest backup unless --backup).")
@click.option("--backup", "backup_id",
              help="Backup id (see `ahvbackup list`); an incremental restores through its chain.")
@click.option("--at", "at", metavar="TIME",
              help="With --vm: the newest backup taken at or before TIME "
                   "(e.g. 2025-05-01T02:00:00Z, UTC unless a zone is given, or Unix seconds).")
@click.option("--disk", "disks", multiple=True, metavar="LABEL",
              help="Restore only this disk, e.g. scsi.0 (repeatable; restore_disks_only=).")
@click.option("--dest", type=click.Path(path_type=Path),
              help="Folder for restored disks (default: where= or ./restore).")
@click.option("--target", "target", metavar="NAME",
              help="Restore target (target=): raw files; qcow2, vmdk, vhdx or vhd images "
                   "(docs/targets.md); or ahv for a new VM on the cluster (restore_vm_name, "
                   "target_cluster, target_container, network_map, vcpu, memory_mib, "
                   "power_on).")
@pass_context
def restore(ctx: Context, configs: tuple[Path, ...], sets: tuple[str, ...],
            plugin_string: str | None, vm: str | None, backup_id: str | None, at: str | None,
            disks: tuple[str, ...], dest: Path | None, target: str | None) -> None:
    """Rebuild a backup's disks through the restore target (target=raw: sparse raw files;
    qcow2, vmdk, vhdx, vhd: disk images for other platforms; ahv: a new VM on an AHV cluster).

    Any point of a chain (full + incrementals, or full + differential) restores as it was."""
    when = parse_time(at) if at else None
    if target:  # as -o target=NAME, placed first so that a later -o target= wins
        sets = (f"target={target}", *sets)
    cfg = load_job_config(configs=configs, sets=sets, plugin_string=plugin_string,
                          hooks=ctx.hooks, verbose=ctx.verbose, view=RESTORE_VIEW)
    refuse_hosted_sink(cfg)
    rt = Runtime.from_config(cfg, hooks=ctx.hooks)
    folder = dest or (Path(cfg.where) if cfg.where else Path("restore"))
    meter = Meter("restore", enabled=None if not ctx.json else False)

    async def main() -> RestoreOutcome:
        backup = await pick_backup(rt, vm=vm, backup_id=backup_id, at=when)
        job = RestoreJob(rt, backup, dest=folder, disks=disks or cfg.restore_disks_only,
                         progress=meter.add)
        async with meter.running():
            return await job.run()

    _finish(ctx, [run_trio(main)])


@click.command()
@config_options
@click.option("--vm", help="Verify this VM's newest backup (or all of them with --all).")
@click.option("--backup", "backup_id", help="Backup id to verify.")
@click.option("--all", "every", is_flag=True, help="Verify every backup in the repository.")
@pass_context
def verify(ctx: Context, configs: tuple[Path, ...], sets: tuple[str, ...],
           plugin_string: str | None, vm: str | None, backup_id: str | None,
           every: bool) -> None:
    """Check every stream of a backup end to end without restoring it (exit 4 if damaged).

    For a delta, every link of its chain is read completely and checked against the next."""
    if not (vm or backup_id or every):
        raise ConfigError("verify: name a VM (--vm NAME), a backup (--backup ID), or give "
                          "--all to verify every backup")
    cfg = load_job_config(configs=configs, sets=sets, plugin_string=plugin_string,
                          hooks=ctx.hooks, verbose=ctx.verbose)
    refuse_hosted_sink(cfg)
    rt = Runtime.from_config(cfg, hooks=ctx.hooks)

    if not every:
        async def one() -> list[RestoreOutcome]:
            return [await VerifyJob(rt, await pick_backup(rt, vm=vm, backup_id=backup_id))
                    .run()]

        _finish(ctx, run_trio(one))
        return

    async def everything() -> tuple[list[RestoreOutcome], list[DamagedBackup]]:
        backups = await rt.sink.backups(vm)
        return [await VerifyJob(rt, b).run() for b in backups], await rt.sink.damaged(vm)

    outcomes, damaged = run_trio(everything)
    _finish_all(ctx, outcomes, damaged)


def _finish_all(ctx: Context, outcomes: list[RestoreOutcome],
                damaged: list[DamagedBackup]) -> None:
    """`verify --all`: every backup and every damaged entry is counted; exit 4 unless all
    of them verified."""
    failed = [o for o in outcomes if not o.ok]
    unreadable = [d for d in damaged if d.unreadable]
    counts = {"verified": len(outcomes) - len(failed),
              "damaged": len(failed) + len(damaged) - len(unreadable),
              "unreadable": len(unreadable)}
    doc = {"backups": [o.to_json() for o in outcomes],
           "damaged_entries": [d.__dict__ for d in damaged], **counts}

    def human(d: dict[str, Any]) -> str:
        lines = [_human(x) for x in d["backups"]]
        lines += [f"{'unreadable' if x['unreadable'] else 'damaged'}: {x['where']}: {x['reason']}"
                  for x in d["damaged_entries"]]
        lines.append(f"{d['verified']} verified, {d['damaged']} damaged, "
                     f"{d['unreadable']} unreadable")
        return "\n".join(lines)

    emit(ctx, doc, human)
    if counts["damaged"] or counts["unreadable"]:
        raise StreamFormatError(f"verify: {counts['damaged']} damaged, {counts['unreadable']} "
                                f"unreadable of {len(outcomes) + len(damaged)} backup(s)")
