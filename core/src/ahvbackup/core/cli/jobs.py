"""Job commands: backup, list (restore and verify live beside them in restore.py)."""

from __future__ import annotations

__all__ = ["backup", "list_backups"]

import time
from pathlib import Path
from typing import Any

import click

from ..config import ModeView, view_of_job
from ..errors import JobError
from ..jobs.backup import BackupJob
from ..jobs.results import JobResult
from ..jobs.runtime import Runtime
from .context import Context, emit, pass_context
from .options import config_options, load_job_config, refuse_hosted_sink, run_trio
from .progress import Meter

#: `backup` runs the backup job's modes (backup, estimate: -o mode=estimate works too);
#: `--estimate` runs estimate, also when a file says mode=backup
BACKUP_VIEW = view_of_job("ahvbackup backup", "backup")
ESTIMATE_VIEW = ModeView("ahvbackup backup --estimate", ("estimate",), replayed=("backup",))


def _human_result(res: dict[str, Any]) -> str:
    lines = []
    if res["mode"] == "estimate":
        for vm in res["vms"]:
            for d in vm["disks"]:
                lines.append(f"{vm['vm_name']:<24} {d['label']:<8} {d['kind']:<12} "
                             f"size={d['size']:>15,} to read={d['estimated_bytes']:>15,}")
            lines += [f"    warning: {w}" for w in vm["warnings"]]
        total = sum(d["estimated_bytes"] for vm in res["vms"] for d in vm["disks"])
        lines.append(f"{len(res['vms'])} VM(s): this backup would read {total:,} bytes")
        return "\n".join(lines)
    for vm in res["vms"]:
        state = "ok" if vm["ok"] else "FAILED"
        read = sum(d["bytes_read"] for d in vm["disks"])
        stored = sum(d["bytes_stored"] for d in vm["disks"])
        lines.append(
            f"{vm['vm_name']:<24} {state:<7} disks={len(vm['disks'])} read={read:,} "
            f"stored={stored:,} backup={vm['backup_id'] or '-'}"
        )
        if vm["error"]:
            lines.append(f"    error: {vm['error']}")
        for d in vm["disks"]:
            ref = f" on {d['reference_backup']}" if d["reference_backup"] else ""
            lines.append(f"    {d['label']:<8} {d['kind']}{ref} read={d['bytes_read']:,}")
            if d["error"]:
                lines.append(f"    {d['label']}: {d['error']}")
        lines += [f"    warning: {w}" for w in vm["warnings"]]
    lines.append(
        f"{len(res['vms'])} VM(s), {len(res['failed'])} failed, {res['bytes_read']:,} bytes read, "
        f"{res['bytes_stored']:,} stored, {res['seconds']:.1f}s"
    )
    return "\n".join(lines)


def finish(ctx: Context, result: JobResult) -> None:
    emit(ctx, result.to_json(), _human_result)
    if not result.ok:
        raise JobError(f"{len(result.failed)} failed: {', '.join(result.failed)}")


@click.command()
@config_options
@click.option("--level", type=click.Choice(["full", "incremental", "differential"]),
              help="Backup level (overrides the level= key).")
@click.option("--estimate", is_flag=True,
              help="Report what a backup at this level would read, per VM and disk, without "
                   "reading data (mode=estimate; for an incremental: the changed bytes).")
@pass_context
def backup(ctx: Context, configs: tuple[Path, ...], sets: tuple[str, ...],
           plugin_string: str | None, level: str | None, estimate: bool) -> None:
    """Back up the VMs the configuration selects (vm=, exclude=, cluster=)."""
    overrides: dict[str, object] = {"level": level} if level else {}
    cfg = load_job_config(
        configs=configs, sets=sets, plugin_string=plugin_string, hooks=ctx.hooks,
        verbose=ctx.verbose, overrides=overrides, require=("prism_central", "user", "password"),
        view=ESTIMATE_VIEW if estimate else BACKUP_VIEW,
    )
    refuse_hosted_sink(cfg)
    rt = Runtime.from_config(cfg, hooks=ctx.hooks)
    meter = Meter("backup", enabled=None if not ctx.json else False)

    async def main() -> JobResult:
        async with meter.running():
            return await BackupJob(rt, progress=meter.add).run()

    finish(ctx, run_trio(main))


@click.command("list")
@config_options
@click.option("--vm", "vm_filter", help="Only backups of this VM (name or UUID).")
@pass_context
def list_backups(ctx: Context, configs: tuple[Path, ...], sets: tuple[str, ...],
                 plugin_string: str | None, vm_filter: str | None) -> None:
    """List complete backups in the repository with sizes and times."""
    cfg = load_job_config(configs=configs, sets=sets, plugin_string=plugin_string,
                          hooks=ctx.hooks, verbose=ctx.verbose)
    refuse_hosted_sink(cfg)
    rt = Runtime.from_config(cfg, hooks=ctx.hooks)
    found = run_trio(rt.sink.backups, vm_filter)
    rows: list[dict[str, Any]] = [
        {"backup_id": b.backup_id, "vm": b.vm_name, "vm_uuid": b.vm_uuid, "level": b.level,
         "created": b.created, "disks": list(b.disks), "bytes_stored": b.bytes_stored,
         "damaged": None, "tenant": cfg.tenant or ""}
        for b in found
    ]
    # damaged entries are shown, flagged, never hidden (verify --all counts them too)
    rows += [{"backup_id": d.backup_id, "vm": d.vm, "vm_uuid": d.vm, "level": "DAMAGED",
              "created": 0.0, "disks": [], "bytes_stored": 0, "damaged": d.reason,
              "where": d.where, "tenant": cfg.tenant or ""}
             for d in run_trio(rt.sink.damaged, vm_filter)]

    def human(rows: list[dict[str, Any]]) -> str:
        of = f" of tenant {cfg.tenant}" if cfg.tenant else ""
        if not rows:
            return f"no backups{of}"
        out = [f"backups{of}:"] if of else []
        out += [f"{'BACKUP':<30} {'VM':<20} {'LEVEL':<12} {'CREATED (UTC)':<20} {'DISKS':>5} "
               f"{'STORED':>15}"]
        for r in rows:
            if r["damaged"]:
                out.append(f"{r['backup_id'] or '-':<30} {r['vm']:<20} {'DAMAGED':<12} "
                           f"{r['where']}: {r['damaged']}")
                continue
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["created"]))
            out.append(f"{r['backup_id']:<30} {r['vm']:<20} {r['level']:<12} {when:<20} "
                       f"{len(r['disks']):>5} {r['bytes_stored']:>15,}")
        return "\n".join(out)

    emit(ctx, rows, human)
