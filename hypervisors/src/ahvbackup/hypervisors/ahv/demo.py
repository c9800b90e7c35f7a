"""`ahvbackup demo`: the main job, end to end, against the embedded simulator.

Starts a seeded simulator (Prism Central + Prism Element over HTTPS with its own CA, and its
iSCSI target on free ports of its own, so another simulator or iSCSI target on the machine does
not matter), backs up every VM over iSCSI (the recommended data path), restores one VM's disks
as raw files, checks them byte for byte against the VM's disks in the simulator (unchanged since
the snapshot), verifies every stream, checks the cluster was left with nothing of ours but the
reference snapshots, and prints a summary. A failure is one error line (exit 1) and keeps the
work files, whose ahvbackup.log has the detail.
"""

from __future__ import annotations

__all__ = ["demo"]

import os
import shutil
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any

import click
import trio

from ahvbackup.core.cli import Context, emit, pass_context
from ahvbackup.core.config import Config, load_config
from ahvbackup.core.errors import ConfigError, JobError, our_errors
from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.restore import RestoreJob, VerifyJob
from ahvbackup.core.jobs.results import JobResult
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.core.log import configure_logging

from .driver import AhvKeys
from .simulator import Endpoints, Simulator, serve_simulator

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


def _config(work: Path, ep: Endpoints, *, verbose: int, **keys: str) -> Config:
    """The demo's job configuration: its own simulator's Prism and iSCSI portal, a passfile
    (as an operator would keep the password), and a rate limit the simulator does not need."""
    passfile = work / "backup.pass"
    if not passfile.exists():
        passfile.touch(mode=0o600)
        passfile.write_text(f"password = {PASSWORD}\n")
    ((_dsip, iscsi_port),) = set(ep.iscsi_portals.values())
    return load_config(overrides={
        "prism_central": ep.pc_url.split("://", 1)[1], "user": USER, "passfile": str(passfile),
        "prism_ca_cert": str(ep.ca_path), "state_dir": str(work / "state"),
        "repository": str(work / "repository"), "working_dir": str(work),
        "debug_log": str(work / "ahvbackup.log"), "verbose": str(verbose),
        "prism_rate_rpm": "6000", "data_path": "iscsi", "iscsi_port": str(iscsi_port),
        **keys,
    }, extra_fields=dict(AhvKeys().fields))


async def _backup_all(sim: Simulator, work: Path, ep: Endpoints, *,
                      verbose: int) -> list[JobResult]:
    """Back up every VM: application-consistent where guest tools allow it, crash-consistent
    (chosen, so nothing warns) where the demo inventory has none."""
    capable = sorted(v.name for v in sim.vms.values() if v.app_consistent_capable)
    others = sorted(v.name for v in sim.vms.values() if not v.app_consistent_capable)
    results = []
    for names, consistent in ((capable, "true"), (others, "false")):
        if names:
            cfg = _config(work, ep, verbose=verbose, vm=",".join(names),
                          application_consistent=consistent)
            result = await BackupJob(Runtime.from_config(cfg)).run()
            if not result.ok:
                raise JobError(f"the backup failed for {', '.join(result.failed)}")
            results.append(result)
    return results


async def run_demo(work: Path, *, verbose: int) -> dict[str, Any]:
    started = time.monotonic()
    sim = Simulator(work / "simulator", seed=True)
    async with serve_simulator(sim, port=0, tls=True) as ep:
        cfg = _config(work, ep, verbose=verbose)
        configure_logging(verbose=verbose, debug_log=cfg.debug_log)
        rt = Runtime.from_config(cfg)
        inventory = [
            {"vm": v.name, "disks": len(v.data_disks), "ngt": v.app_consistent_capable}
            for v in sorted(sim.vms.values(), key=lambda v: v.name)
        ]
        jobs = await _backup_all(sim, work, ep, verbose=verbose)
        backup_seconds = sum(j.seconds for j in jobs)
        backed_up = [vm for j in jobs for vm in j.vms]
        ((dsip, iscsi_port),) = set(ep.iscsi_portals.values())

        # restore the VM with the most disks, and compare with the simulator's disks
        chosen = max(backed_up, key=lambda v: (len(v.disks), v.vm_name))
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
        for vm_result in backed_up:
            state, _ = rt.states.load(vm_result.vm_uuid)
            references |= state.snapshot_ids() if state else set()
        # v3 snapshots and v4 recovery points ("v4:<extId>", whose own snapshots they hold)
        held = {v.snapshot_uuid for p in sim.recovery_points.points.values() for v in p.vms}
        on_cluster = (set(sim.snapshots) - held) | {
            f"v4:{p}" for p in sim.recovery_points.points}
        leftovers = {
            "reference_snapshots": len(on_cluster & references),
            "other_snapshots": len(on_cluster - references),
            "images": len(sim.images),
            "volume_groups": len(sim.volume_groups.groups),
        }
        bytes_over_iscsi = sim.volume_groups.bytes_read
    total = time.monotonic() - started
    return {
        "inventory": inventory,
        "vms": len(backed_up),
        "disks": sum(len(v.disks) for v in backed_up),
        "bytes_provisioned": sum(d.size for v in backed_up for d in v.disks),
        "bytes_read": sum(v.bytes_read for v in backed_up),
        "bytes_stored": sum(v.bytes_stored for v in backed_up),
        "data_path": "iscsi",
        "iscsi_portal": f"{dsip}:{iscsi_port}",
        "bytes_read_over_iscsi": bytes_over_iscsi,
        "backup_seconds": round(backup_seconds, 2),
        "read_throughput_mb_s": round(
            sum(v.bytes_read for v in backed_up) / backup_seconds / 1e6, 1
        ),
        "restored_vm": chosen.vm_name,
        "restore_check": checks,
        "verified_backups": sum(1 for v in verified if v.ok),
        "verify_failures": [f for v in verified for f in v.failed],
        "left_on_cluster": leftovers,
        "seconds": round(total, 2),
    }


def _human(r: dict[str, Any]) -> str:
    lines = ["Simulated inventory:"]
    lines += [f"  {i['vm']:<10} disks={i['disks']} ngt={'yes' if i['ngt'] else 'no ':<4}"
              f"{'application' if i['ngt'] else 'crash'}-consistent snapshot"
              for i in r["inventory"]]
    lines.append(
        f"Backed up {r['vms']} VMs, {r['disks']} disks ({r['bytes_provisioned'] / 2**30:.1f} GiB "
        f"provisioned): read {r['bytes_read'] / 2**20:.1f} MiB, "
        f"stored {r['bytes_stored'] / 2**20:.1f} MiB in {r['backup_seconds']} s "
        f"({r['read_throughput_mb_s']} MB/s of allocated data)"
    )
    lines.append(f"  over iSCSI from the cluster's iSCSI portal {r['iscsi_portal']} "
                 f"({r['bytes_read_over_iscsi'] / 2**20:.1f} MiB through volume groups)")
    lines.append(f"Restored {r['restored_vm']} to raw files:")
    lines += [f"  {c['disk']:<8} {c['size']:>13,} bytes  "
              f"{'byte-identical to the simulator' if c['identical'] else 'DIFFERENT'}"
              f"  (stream xxh3-128 {c['stream_digest'][:16]})" for c in r["restore_check"]]
    lines.append(f"Verified {r['verified_backups']} backups end to end"
                 + (f"; FAILED: {', '.join(r['verify_failures'])}" if r["verify_failures"] else ""))
    left = r["left_on_cluster"]
    lines.append(
        f"Left on the cluster: {left['reference_snapshots']} reference snapshots (kept for the "
        f"next incremental), {left['other_snapshots']} other snapshots, {left['images']} "
        f"images, {left['volume_groups']} volume groups"
    )
    where = (f"work files in {r['work_dir']}" if r["work_dir"]
             else "work files removed; --keep DIR keeps them")
    lines.append(f"Done in {r['seconds']} s ({where})")
    return "\n".join(lines)


def _problem(r: dict[str, Any]) -> str | None:
    """What the summary shows went wrong, if anything."""
    bad = [c["disk"] for c in r["restore_check"] if not c["identical"]]
    left = r["left_on_cluster"]
    if bad:
        return f"restored disk(s) {', '.join(bad)} differ from the simulator's"
    if r["verify_failures"]:
        return f"verify failed for {', '.join(r['verify_failures'])}"
    if left["other_snapshots"] or left["images"] or left["volume_groups"]:
        return "the backup left snapshots, images or volume groups on the cluster"
    if left["reference_snapshots"] != r["vms"]:
        return f"{left['reference_snapshots']} reference snapshots kept for {r['vms']} VMs"
    if not r["bytes_read_over_iscsi"]:
        return "nothing was read over iSCSI"
    return None


def _run(work: Path, *, verbose: int) -> dict[str, Any]:
    """Run the demo; any failure becomes one JobError line (the traceback goes to the log)."""
    try:
        return trio.run(partial(run_demo, work, verbose=verbose))
    except Exception as err:  # a demo never ends in a traceback
        errors: list[BaseException] = list(our_errors(err) or [])
        if errors:
            raise JobError(f"demo failed: {errors[0]}") from None
        # a bug: its traceback goes to the debug log, which the failure keeps
        with (work / "ahvbackup.log").open("a") as f:
            f.write("".join(traceback.format_exception(err)))
        cause = _first_leaf(err)
        raise JobError(f"demo failed: {type(cause).__name__}: {cause}") from None


def _first_leaf(err: BaseException) -> BaseException:
    while isinstance(err, BaseExceptionGroup):
        err = err.exceptions[0]
    return err


def _empty_folder(keep: Path) -> None:
    """Make `keep` an empty folder; only an earlier demo's folder is emptied, never others."""
    try:
        if keep.exists():
            if any(keep.iterdir()) and not (keep / "simulator" / "inventory.json").exists():
                raise ConfigError(f"--keep {keep}: holds files of something other than an "
                                  "earlier demo; name a new or empty folder")
            shutil.rmtree(keep)
        keep.mkdir(parents=True)
    except OSError as err:
        raise ConfigError(f"--keep {keep}: {err.strerror or err}") from None


@click.command()
@click.option("--keep", type=click.Path(path_type=Path),
              help="Keep the simulator, repository and restored disks in this folder.")
@pass_context
def demo(ctx: Context, keep: Path | None) -> None:
    """Back up every VM of a simulated cluster, restore one, and prove it byte-identical."""
    if keep is not None:
        _empty_folder(keep)
    work = keep or Path(tempfile.mkdtemp(prefix="ahvbackup-demo-"))
    kept = f"work files kept in {work} (ahvbackup.log has the detail)"
    try:
        result = _run(work, verbose=ctx.verbose or 1)
    except JobError as err:
        raise JobError(f"{err}; {kept}") from None
    problem = _problem(result)
    result["work_dir"] = str(work) if keep or problem else None
    emit(ctx, result, _human)
    if problem:
        raise JobError(f"demo failed: {problem}; {kept}")
    if keep is None:
        shutil.rmtree(work, ignore_errors=True)
