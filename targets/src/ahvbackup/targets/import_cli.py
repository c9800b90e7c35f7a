"""The `ahvbackup import` command (contributed by the targets distribution's hook plugin:
its code lives with the ahv target and the image reader, outside core)."""

from __future__ import annotations

__all__ = ["import_vm"]

from pathlib import Path
from typing import Any

import click

from ahvbackup.core.cli import Context, emit, pass_context
from ahvbackup.core.cli.options import config_options, load_job_config, run_trio
from ahvbackup.core.cli.progress import Meter
from ahvbackup.core.config import view_of_job
from ahvbackup.core.jobs.runtime import Runtime

from .importer import ImportJob, ImportOutcome, ImportRequest

#: import is a restore into AHV: it runs the restore job's mode (mode=restore or unset)
IMPORT_VIEW = view_of_job("ahvbackup import", "restore")


def _human(doc: dict[str, Any]) -> str:
    lines = [f"imported VM {doc['vm']} ({doc['vm_id']}) in {doc['seconds']:.1f} s"]
    for d in doc["disks"]:
        source = f"{d['image']} ({d['format']}, {d['virtual_size']:,} bytes)" if d["image"] \
            else "blank"
        lines.append(f"  {d['label']:<8} size={d['size']:,} data={d['data_bytes']:,} "
                     f"<- {source}")
    return "\n".join(lines)


@click.command("import")
@config_options
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              metavar="FILE", help="A disk image: qcow2, vmdk, vhdx, vhd or raw (repeatable, "
                                   "in disk order; with --ovf, in the OVF's disk order).")
@click.option("--format", "image_format", metavar="FORMAT",
              help="The images' format (qcow2, vmdk, vhdx, vhd, raw; default: probed).")
@click.option("--ovf", type=click.Path(path_type=Path), metavar="FILE",
              help="An OVF descriptor: the VM's CPU, memory, firmware, NICs and disks (its "
                   "disk files next to it unless --image).")
@click.option("--ova", type=click.Path(path_type=Path), metavar="FILE",
              help="An OVA: the OVF and its disks, read inside the archive.")
@click.option("--vm-name", metavar="NAME",
              help="Name of the new VM (restore_vm_name=; default: the OVF's VM name).")
@pass_context
def import_vm(ctx: Context, configs: tuple[Path, ...], sets: tuple[str, ...],
              plugin_string: str | None, images: tuple[Path, ...], image_format: str | None,
              ovf: Path | None, ova: Path | None, vm_name: str | None) -> None:
    """Import foreign disk images (from Proxmox, vSphere, Hyper-V, ...) as a new AHV VM.

    Takes the ahv target's keys: target_cluster, target_container, network_map, vcpu,
    memory_mib, power_on, data_path. Only the images' allocated data is written."""
    overrides: dict[str, object] = {"target": "ahv"}
    if vm_name:
        overrides["restore_vm_name"] = vm_name
    cfg = load_job_config(configs=configs, sets=sets, plugin_string=plugin_string,
                          hooks=ctx.hooks, verbose=ctx.verbose, overrides=overrides,
                          view=IMPORT_VIEW)
    rt = Runtime.from_config(cfg, hooks=ctx.hooks)
    request = ImportRequest(images=images, ovf=ovf, ova=ova, image_format=image_format,
                            vm_name=vm_name)
    meter = Meter("import", enabled=None if not ctx.json else False)
    job = ImportJob(rt, request, progress=meter.add)

    async def main() -> ImportOutcome:
        async with meter.running():
            return await job.run()

    outcome: ImportOutcome = run_trio(main)
    emit(ctx, outcome.to_json(), _human)
