"""Restoring a chain point straight into each image format, against raw + `qemu-img convert`.

One VM disk (sparse, a mix of compressible and random data) is backed up full, changed, and
backed up incremental; the incremental (a two-link chain) is then restored, in the same run:

- **direct**: `target=<format>`, the image written through qemu-nbd with no staging copy;
- **two-step**: `target=raw`, then ``qemu-img convert`` of the raw image to the same format
  with the same options (what the commercial plugin does; it needs the scratch space).

Both include everything they do (the direct path's ``qemu-img check``/``info`` and artifacts;
the OVA for streamOptimized vmdk). `ratio` is two-step seconds over direct seconds (above 1.0:
direct is faster), the median of `--repeat` runs (all of them in `ratios`: this machine is
shared); sizes are the bytes the output image allocates (fsynced, st_blocks). Prints JSON.

    .venv/bin/python bench/restore_formats.py [--gib 1] [--regions 24]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import trio

from ahvbackup.core.config import ConfigSources, ModeView, assemble_config
from ahvbackup.core.drivers import StoredBackup
from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.restore import RestoreJob, pick_backup
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.core.plugins import Hooks
from ahvbackup.hypervisors.ahv.simulator import Simulator, serve_simulator
from ahvbackup.hypervisors.ahv.simulator.model import Disk, Vm

MiB = 1 << 20
#: format -> (target keys, qemu-img convert arguments that make the same image)
FORMATS: dict[str, tuple[dict[str, str], list[str]]] = {
    "qcow2": ({"target": "qcow2"}, ["-O", "qcow2"]),
    "qcow2-zstd": ({"target": "qcow2", "qcow2_compression": "zstd"},
                   ["-O", "qcow2", "-c", "-o", "compression_type=zstd"]),
    "vmdk-streamOptimized": ({"target": "vmdk"}, [
        "-O", "vmdk", "-o", "subformat=streamOptimized,adapter_type=lsilogic"]),
    "vmdk-monolithicSparse": ({"target": "vmdk", "vmdk_subformat": "monolithicSparse"}, [
        "-O", "vmdk", "-o", "subformat=monolithicSparse,adapter_type=lsilogic"]),
    "vhdx": ({"target": "vhdx"}, ["-O", "vhdx", "-o", "subformat=dynamic"]),
    "vhd": ({"target": "vhd"}, ["-O", "vpc", "-o", "subformat=fixed,force_size=on"]),
}


def allocated(path: Path) -> int:
    with path.open("rb") as f:
        os.fsync(f.fileno())
        return os.fstat(f.fileno()).st_blocks * 512


def fill(sim: Simulator, vm: Vm, size: int, regions: int) -> int:
    """Regions of 4 MiB spread over the disk, a third of them compressible text."""
    step = size // regions
    for i in range(regions):
        if i % 3 == 0:
            data = (f"line {i} of a compressible region\n" * (4 * MiB // 32 + 1)).encode()[:4 * MiB]
        else:
            data = os.urandom(4 * MiB)
        sim.write_disk(vm.uuid, 0, i * step, data)
    return regions * 4 * MiB


async def _direct(work: Path, runtime: Runtime, backup: StoredBackup,
                  name: str) -> tuple[float, Path]:
    started = time.perf_counter()
    res = await RestoreJob(runtime, backup, dest=work / f"direct-{name}").run()
    seconds = time.perf_counter() - started
    assert res.ok, [d.error for d in res.disks]
    return seconds, Path(res.disks[0].path)


async def _two_step(work: Path, rt: Runtime, backup: StoredBackup, name: str,
                    convert: list[str], suffix: str) -> tuple[float, Path, Path]:
    started = time.perf_counter()
    raw = await RestoreJob(rt, backup, dest=work / f"raw-{name}").run()
    assert raw.ok
    converted = work / f"raw-{name}" / f"converted{suffix}"
    await trio.run_process(["qemu-img", "convert", "-f", "raw", *convert, raw.disks[0].path,
                            str(converted)])
    allocated(converted)  # fsynced, as the direct path's image is
    return time.perf_counter() - started, Path(raw.disks[0].path), converted


async def _one(work: Path, rt: Runtime, backup: StoredBackup, name: str, direct: Runtime,
               convert: list[str], *, direct_first: bool) -> dict[str, Any]:
    """One direct restore and one two-step restore of the same point, timed (in the order
    given, so that neither always finds the repository in the page cache first)."""
    suffix = {"qcow2": ".qcow2", "vmdk": ".vmdk", "vhdx": ".vhdx", "vpc": ".vhd"}[convert[1]]
    if direct_first:
        direct_s, image = await _direct(work, direct, backup, name)
        two_step_s, raw, converted = await _two_step(work, rt, backup, name, convert, suffix)
    else:
        two_step_s, raw, converted = await _two_step(work, rt, backup, name, convert, suffix)
        direct_s, image = await _direct(work, direct, backup, name)
    same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", convert[1], str(raw),
                           str(image)], capture_output=True, check=False)
    result = {
        "direct_seconds": round(direct_s, 3),
        "two_step_seconds": round(two_step_s, 3),
        "ratio": round(two_step_s / direct_s, 3),
        "direct_allocated_bytes": allocated(image),
        "two_step_allocated_bytes": allocated(converted),
        "two_step_scratch_bytes": allocated(raw),
        "identical": same.returncode == 0,
    }
    for folder in (work / f"direct-{name}", work / f"raw-{name}"):
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    return result


async def bench(work: Path, *, size: int, regions: int, repeat: int) -> dict[str, Any]:
    sim = Simulator(work / "sim", seed=True, task_seconds=0.05, sync=False)
    try:
        async with serve_simulator(sim, port=0, tls=True) as ep:
            assert ep.ca_path is not None
            base = {"prism_central": ep.pc_url.split("://", 1)[1], "user": "backup",
                    "password": "backup/4u", "prism_ca_cert": str(ep.ca_path),
                    "state_dir": str(work / "state"), "repository": str(work / "repo"),
                    "debug_log": "", "verbose": "0", "prism_rate_rpm": "100000",
                    "working_dir": str(work), "vm": "bench", "chunk_size_mib": "4"}

            def runtime(**keys: str) -> Runtime:
                return Runtime.from_config(assemble_config(
                    ConfigSources(overrides={**base, **keys}), hooks=Hooks(),
                    view=ModeView("the benchmark")))

            cluster = next(iter(sim.clusters.values()))
            vm = Vm(uuid=str(uuid.uuid4()), name="bench", cluster_uuid=cluster.uuid,
                    disks=[Disk(uuid=str(uuid.uuid4()), device_type="DISK",
                                adapter_type="SCSI", device_index=0, size=size,
                                container_uuid=cluster.containers[0].uuid)])
            sim.create_vm(vm)
            data = fill(sim, vm, size, regions)
            assert (await BackupJob(runtime()).run()).ok
            sim.write_disk(vm.uuid, 0, size // 2 + 12345, os.urandom(8 * MiB))  # the delta
            assert (await BackupJob(runtime(level="incremental")).run()).ok
            rt = runtime()
            backup = await pick_backup(rt, vm="bench", backup_id=None)
            out: dict[str, Any] = {"disk_bytes": size, "data_bytes": data + 8 * MiB,
                                   "chain_links": 2, "formats": {}}
            for name, (keys, convert) in FORMATS.items():
                runs = [await _one(work, rt, backup, name, runtime(**keys), convert,
                                   direct_first=i % 2 == 0) for i in range(repeat)]
                runs.sort(key=lambda r: r["ratio"])
                out["formats"][name] = {**runs[len(runs) // 2],
                                        "ratios": [r["ratio"] for r in runs]}
            return out
    finally:
        sim.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="disk size")
    ap.add_argument("--regions", type=int, default=24, help="4 MiB data regions on it")
    ap.add_argument("--repeat", type=int, default=5, help="runs per format (the median shown)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ahvbackup-bench-", dir="/var/tmp") as tmp:
        out = trio.run(lambda: bench(Path(tmp), size=int(args.gib * 1024) * MiB,
                                     regions=args.regions, repeat=args.repeat))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
