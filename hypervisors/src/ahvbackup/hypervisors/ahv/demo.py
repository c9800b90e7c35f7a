"""`ahvbackup demo`: the main job, end to end, against the embedded simulator.

Starts a seeded simulator (Prism Central + Prism Element over HTTPS with its own CA), backs up
every VM, restores one VM's disks as raw files, checks them byte for byte against the VM's disks
in the simulator (unchanged since the snapshot), verifies every stream, checks the cluster was
left with no snapshot or image of ours, and prints a summary.
"""

from __future__ import annotations

__all__ = ["demo"]

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import trio

from ahvbackup.core.cli import Context, emit, pass_context
from ahvbackup.core.config import load_config
from ahvbackup.core.errors import JobError
from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.restore import RestoreJob, VerifyJob
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.core.log import configure_logging

from .simulator import Simulator, serve_simulator

USER, PASSWORD = "backup", "backup/4u"  # the simulator's seeded Backup Admin
BLOCK = 4 << 20


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the ranges of a sparse file that are not holes."""
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
    return out


def _same_bytes(sim: Simulator, disk_id: str, path: Path) -> bool:
    """Compare a restored raw file with the simulator's disk, reading only what is allocated:
    the simulator's allocation map (of a snapshot taken for the check) on one side, the file's
    data extents on the other; everything outside both must read as zeros on both sides."""
    store = sim.store
    snap = store.snapshot(disk_id)
    try:
        size = store.snapshot_size(disk_id, snap)
        if path.stat().st_size != size:
            return False
        regular = [(r.offset, r.offset + r.length)
                   for r in store.changed_regions(disk_id, snap).regions if r.type == "REGULAR"]
        fd = os.open(path, os.O_RDONLY)
        try:
            for start, end in regular:
                for off in range(start, end, BLOCK):
                    n = min(BLOCK, end - off)
                    if os.pread(fd, n, off) != store.read_snapshot(disk_id, snap, off, n):
                        return False
            for start, end in _data_extents(fd, size):
                for off in range(start, end, BLOCK):
                    n = min(BLOCK, end - off)
                    inside = any(a <= off and off + n <= b for a, b in regular)
                    if not inside and os.pread(fd, n, off).count(0) != n:
                        return False
        finally:
            os.close(fd)
        return True
    finally:
        store.delete_snapshot(disk_id, snap)


async def run_demo(work: Path, *, verbose: int) -> dict[str, Any]:
    started = time.monotonic()
    sim = Simulator(work / "simulator", seed=True)
    async with serve_simulator(sim, port=0, tls=True) as ep:
        cfg = load_config(overrides={
            "prism_central": ep.pc_url.split("://", 1)[1], "user": USER, "password": PASSWORD,
            "prism_ca_cert": str(ep.ca_path), "state_dir": str(work / "state"),
            "repository": str(work / "repository"), "working_dir": str(work),
            "debug_log": str(work / "ahvbackup.log"), "verbose": str(verbose),
            "prism_rate_rpm": "6000",
        })
        configure_logging(verbose=verbose, debug_log=cfg.debug_log)
        rt = Runtime.from_config(cfg)
        inventory = [
            {"vm": v.name, "disks": len(v.data_disks), "ngt": v.app_consistent_capable}
            for v in sorted(sim.vms.values(), key=lambda v: v.name)
        ]
        backup = await BackupJob(rt).run()
        if not backup.ok:
            raise JobError(f"demo backup failed: {', '.join(backup.failed)}")
        backup_seconds = backup.seconds

        # restore the VM with the most disks, and compare with the simulator's disks
        chosen = max(backup.vms, key=lambda v: (len(v.disks), v.vm_name))
        stored = [b for b in await rt.sink.backups(chosen.vm_uuid)][-1]
        restored = await RestoreJob(rt, stored, dest=work / "restore").run()
        vm = sim.vms[chosen.vm_uuid]
        checks = []
        for disk in vm.data_disks:
            label = f"{disk.adapter_type.lower()}.{disk.device_index}"
            out = next(d for d in restored.disks if d.label == label)
            same = out.ok and _same_bytes(sim, disk.uuid, Path(out.path))
            checks.append({"disk": label, "size": out.size, "identical": same,
                           "stream_digest": out.digest})
        verified = [await VerifyJob(rt, b).run() for b in await rt.sink.backups()]
        # each VM's snapshot stays as the reference of its next incremental; anything else
        # (another snapshot, an image, a volume group) would be debris
        references: set[str] = set()
        for vm_result in backup.vms:
            state, _ = rt.states.load(vm_result.vm_uuid)
            references |= state.snapshot_ids() if state else set()
        leftovers = {
            "reference_snapshots": len(set(sim.snapshots) & references),
            "other_snapshots": len(set(sim.snapshots) - references),
            "images": len(sim.images),
        }
    total = time.monotonic() - started
    return {
        "inventory": inventory,
        "vms": len(backup.vms),
        "disks": sum(len(v.disks) for v in backup.vms),
        "bytes_provisioned": sum(d.size for v in backup.vms for d in v.disks),
        "bytes_read": sum(v.bytes_read for v in backup.vms),
        "bytes_stored": sum(v.bytes_stored for v in backup.vms),
        "backup_seconds": round(backup_seconds, 2),
        "read_throughput_mb_s": round(
            sum(v.bytes_read for v in backup.vms) / backup_seconds / 1e6, 1
        ),
        "restored_vm": chosen.vm_name,
        "restore_check": checks,
        "verified_backups": sum(1 for v in verified if v.ok),
        "verify_failures": [f for v in verified for f in v.failed],
        "left_on_cluster": leftovers,
        "seconds": round(total, 2),
        "work_dir": str(work),
    }


def _human(r: dict[str, Any]) -> str:
    lines = ["Simulated inventory:"]
    lines += [f"  {i['vm']:<10} disks={i['disks']} ngt={'yes' if i['ngt'] else 'no'}"
              for i in r["inventory"]]
    lines.append(
        f"Backed up {r['vms']} VMs, {r['disks']} disks ({r['bytes_provisioned'] / 2**30:.1f} GiB "
        f"provisioned): read {r['bytes_read'] / 2**20:.1f} MiB, "
        f"stored {r['bytes_stored'] / 2**20:.1f} MiB in {r['backup_seconds']} s "
        f"({r['read_throughput_mb_s']} MB/s of allocated data)"
    )
    lines.append(f"Restored {r['restored_vm']} to raw files:")
    lines += [f"  {c['disk']:<8} {c['size']:>13,} bytes  "
              f"{'byte-identical to the simulator' if c['identical'] else 'DIFFERENT'}"
              f"  (stream xxh3-128 {c['stream_digest'][:16]})" for c in r["restore_check"]]
    lines.append(f"Verified {r['verified_backups']} backups end to end"
                 + (f"; FAILED: {', '.join(r['verify_failures'])}" if r["verify_failures"] else ""))
    left = r["left_on_cluster"]
    lines.append(
        f"Left on the cluster: {left['reference_snapshots']} reference snapshots (kept for the "
        f"next incremental), {left['other_snapshots']} other snapshots, {left['images']} images"
    )
    lines.append(f"Done in {r['seconds']} s (work files in {r['work_dir']})")
    return "\n".join(lines)


@click.command()
@click.option("--keep", type=click.Path(path_type=Path),
              help="Keep the simulator, repository and restored disks in this folder.")
@pass_context
def demo(ctx: Context, keep: Path | None) -> None:
    """Back up every VM of a simulated cluster, restore one, and prove it byte-identical."""
    work = keep or Path(tempfile.mkdtemp(prefix="ahvbackup-demo-"))
    if keep is not None and keep.exists():
        shutil.rmtree(keep)
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = trio.run(lambda: run_demo(work, verbose=ctx.verbose or 1))
        emit(ctx, result, _human)
        bad = [c["disk"] for c in result["restore_check"] if not c["identical"]]
        left = result["left_on_cluster"]
        debris = left["other_snapshots"] or left["images"]
        references_ok = left["reference_snapshots"] == result["vms"]
        if bad or result["verify_failures"] or debris or not references_ok:
            raise JobError("the demo found a problem (see above)")
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
