"""Incrementals: what an incremental reads against what truly changed, and chain restore speed.

A full backup of a multi-GiB, partly allocated disk, then a known random change of a few percent
of its data (written through the simulator's control API, so change tracking sees exactly those
writes), then an incremental: bytes read from the cluster, bytes stored and the truly changed
bytes (goal: read <= 1.01 x changed plus metadata). Nine more incrementals with smaller changes
follow; then the chain (full + 10 incrementals) is restored to a raw file, and the same run times
`cp --sparse=always` of that final raw image (goal: cp_seconds / restore_seconds >= 0.8); as
the restore fsyncs its output before reporting success, cp followed by an fsync of the copy is
timed too (`restore_ratio_vs_cp_fsync`).
The simulator runs in its own process. Prints JSON.

    .venv/bin/python bench/incremental.py [--gib 4] [--data-gib 2] [--change-pct 3]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from _simproc import MiB, Served, add_vm, job_args, run_cli_measured, serve

BLOCK = 64 << 10  # the simulator's change-tracking block


def change(served: Served, vm_uuid: str, *, extents: list[tuple[int, int]], pct: float,
           rng: random.Random, write: int = 256 << 10) -> int:
    """Overwrite `pct` percent of the allocated data with new random bytes in `write`-sized,
    block-aligned pieces at random places; returns the distinct bytes changed."""
    data = sum(n for _, n in extents)
    want = int(data * pct / 100) // write
    slots = [(off + i * write) for off, n in extents for i in range(n // write)]
    chosen = rng.sample(slots, min(want, len(slots)))
    base = f"https://{served.pc}/api/simulator/v1/vms/{vm_uuid}/disks/0/data"
    with httpx.Client(verify=served.ca, auth=("admin", "nutanix/4u"), timeout=120) as c:
        for off in chosen:
            r = c.put(base, params={"offset": off}, content=os.urandom(write))
            r.raise_for_status()
    return len(chosen) * write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=4.0, help="disk size")
    ap.add_argument("--data-gib", type=float, default=2.0, help="allocated data on it")
    ap.add_argument("--change-pct", type=float, default=3.0, help="first change, % of the data")
    ap.add_argument("--later-pct", type=float, default=0.5, help="each later change")
    ap.add_argument("--chunk-mib", type=int, default=4, help="chunk_size_mib of the jobs")
    args = ap.parse_args()
    size = int(args.gib * 1024) * MiB
    data = int(args.data_gib * 1024) * MiB
    step = size // 4
    extents = [(i * step, data // 4) for i in range(4)]
    rng = random.Random(5)
    with tempfile.TemporaryDirectory(prefix="ahvbackup-bench-") as tmp:
        work = Path(tmp)
        vm_uuid = add_vm(work / "sim", "inc-vm", size, extents)
        with serve(work / "sim") as served:
            opts = {"vm": "inc-vm", "chunk_size_mib": args.chunk_mib}
            full, _ = run_cli_measured(["backup", *job_args(served, work, **opts)])
            changed = change(served, vm_uuid, extents=extents, pct=args.change_pct, rng=rng)
            inc, inc_rss = run_cli_measured(
                ["backup", *job_args(served, work, level="incremental", **opts)])
            ids = [full["vms"][0]["backup_id"], inc["vms"][0]["backup_id"]]  # type: ignore[index]
            for _ in range(9):
                change(served, vm_uuid, extents=extents, pct=args.later_pct, rng=rng)
                later, _ = run_cli_measured(
                    ["backup", *job_args(served, work, level="incremental", **opts)])
                ids.append(later["vms"][0]["backup_id"])  # type: ignore[index]
        # best of 3 each, alternating, every step from a clean page-cache writeback state
        restore_runs, cp_runs, cp_sync_runs = [], [], []
        for n in range(3):
            dest = work / f"restore{n}"
            os.sync()
            restored, restore_rss = run_cli_measured(
                ["restore", *job_args(served, work), "--backup", ids[-1], "--dest", str(dest)])
            restore_runs.append(float(restored["seconds"]))  # type: ignore[arg-type]
            (disk,) = restored["disks"]  # type: ignore[misc]
            raw = Path(disk["path"])
            copy = work / f"copy{n}.raw"
            os.sync()
            t0 = time.perf_counter()
            subprocess.run(["cp", "--sparse=always", str(raw), str(copy)], check=True)
            cp_runs.append(time.perf_counter() - t0)
            fd = os.open(copy, os.O_RDONLY)
            try:
                os.fsync(fd)  # the restore fsyncs its output before it reports success
            finally:
                os.close(fd)
            cp_sync_runs.append(time.perf_counter() - t0)
            if n:
                assert filecmp.cmp(copy, work / "copy0.raw", shallow=False)
                copy.unlink()
                raw.unlink()
        stream_bytes = sum(
            p.stat().st_size for p in (work / "repo").rglob("*.ahvd"))
    d = inc["vms"][0]["disks"][0]  # type: ignore[index]
    restore_s, cp_s, cp_sync_s = min(restore_runs), min(cp_runs), min(cp_sync_runs)
    out = {
        "disk_bytes": size,
        "data_bytes": data,
        "chunk_size_mib": args.chunk_mib,
        "full_bytes_read": full["bytes_read"],
        "full_seconds": round(float(full["seconds"]), 3),  # type: ignore[arg-type]
        "changed_bytes": changed,
        "incremental_kind": d["kind"],
        "incremental_bytes_read": d["bytes_read"],
        "incremental_bytes_stored": d["bytes_stored"],
        "read_over_changed": round(d["bytes_read"] / changed, 4),
        "stored_over_changed": round(d["bytes_stored"] / changed, 4),
        "incremental_seconds": round(float(inc["seconds"]), 3),  # type: ignore[arg-type]
        "incremental_peak_rss_mib": round(inc_rss / 1024, 1),
        "chain_links": len(restored["disks"][0]["chain"]),  # type: ignore[index]
        "chain_stream_bytes": stream_bytes,
        "restore_seconds": round(restore_s, 3),
        "restore_seconds_runs": [round(x, 3) for x in restore_runs],
        "cp_sparse_seconds_runs": [round(x, 3) for x in cp_runs],
        "restore_peak_rss_mib": round(restore_rss / 1024, 1),
        "cp_sparse_seconds": round(cp_s, 3),
        "restore_ratio": round(cp_s / restore_s, 3),
        "cp_sparse_fsync_seconds": round(cp_sync_s, 3),
        "restore_ratio_vs_cp_fsync": round(cp_sync_s / restore_s, 3),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
