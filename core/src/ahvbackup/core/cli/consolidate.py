"""The consolidate command: chains into synthetic fulls, then retention."""

from __future__ import annotations

__all__ = ["consolidate"]

from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError
from ..jobs.consolidate import ConsolidateJob, ConsolidateOutcome
from ..jobs.restore import pick_backup
from ..jobs.retention import apply_retention
from ..jobs.runtime import Runtime
from .context import Context, emit, pass_context
from .options import config_options, load_job_config, run_trio


def _human(doc: dict[str, Any]) -> str:
    lines = []
    for r in doc["consolidated"]:
        state = "ok" if r["ok"] else "FAILED"
        lines.append(f"backup {r['backup_id']} ({r['vm_name']}): {state} {r['note']}".rstrip())
        for d in r["disks"]:
            lines.append(f"  {d['label']:<10} {d['links']} link(s) -> full, "
                         f"{d['bytes_stored']:,} bytes")
        if r["removed"]:
            lines.append(f"  removed older links: {', '.join(r['removed'])}")
    if doc["retention_removed"]:
        lines.append(f"retention removed: {', '.join(doc['retention_removed'])}")
    return "\n".join(lines) or "nothing to do"


@click.command()
@config_options
@click.option("--vm", help="Consolidate this VM's newest backup (name or UUID).")
@click.option("--backup", "backup_id", help="Consolidate this backup (the chain up to it).")
@pass_context
def consolidate(ctx: Context, configs: tuple[Path, ...], sets: tuple[str, ...],
                plugin_string: str | None, vm: str | None, backup_id: str | None) -> None:
    """Turn a chain (full + incrementals) into a synthetic full in the repository, verified
    before older links are removed; then apply keep_fulls / keep_days. The cluster is not
    contacted."""
    cfg = load_job_config(configs=configs, sets=sets, plugin_string=plugin_string,
                          hooks=ctx.hooks, verbose=ctx.verbose)
    if not vm and not backup_id:
        raise ConfigError("consolidate: name a VM (--vm NAME) or a backup (--backup ID)")
    rt = Runtime.from_config(cfg, hooks=ctx.hooks)

    async def main() -> dict[str, Any]:
        backup = await pick_backup(rt, vm=vm, backup_id=backup_id)
        done: ConsolidateOutcome = await ConsolidateJob(rt, backup).run()
        removed = await apply_retention(rt, vm_uuid=backup.vm_uuid, keep_fulls=cfg.keep_fulls,
                                        keep_days=cfg.keep_days)
        return {"consolidated": [done.to_json()], "retention_removed": removed}

    emit(ctx, run_trio(main), _human)
