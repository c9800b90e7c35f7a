"""Restore and verify commands."""

from __future__ import annotations

__all__ = ["restore", "verify"]

from pathlib import Path
from typing import Any

import click

from ..errors import JobError, StreamFormatError
from ..jobs.restore import RestoreJob, RestoreOutcome, VerifyJob, parse_time, pick_backup
from ..jobs.runtime import Runtime
from . import Context, emit, pass_context
from .options import config_options, load_job_config, run_trio
from .progress import Meter


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
@pass_context
def restore(ctx: Context, configs: tuple[Path, ...], sets: tuple[str, ...],
            plugin_string: str | None, vm: str | None, backup_id: str | None, at: str | None,
            disks: tuple[str, ...], dest: Path | None) -> None:
    """Rebuild a backup's disks through the restore target (target=raw: sparse raw files).

    Any point of a chain (full + incrementals, or full + differential) restores as it was."""
    when = parse_time(at) if at else None
    cfg = load_job_config(configs=configs, sets=sets, plugin_string=plugin_string,
                          hooks=ctx.hooks, verbose=ctx.verbose)
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
    cfg = load_job_config(configs=configs, sets=sets, plugin_string=plugin_string,
                          hooks=ctx.hooks, verbose=ctx.verbose)
    rt = Runtime.from_config(cfg, hooks=ctx.hooks)

    async def main() -> list[RestoreOutcome]:
        if every:
            backups = await rt.sink.backups(vm)
        else:
            backups = [await pick_backup(rt, vm=vm, backup_id=backup_id)]
        return [await VerifyJob(rt, b).run() for b in backups]

    _finish(ctx, run_trio(main))
