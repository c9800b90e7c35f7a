"""Incrementals: what an incremental reads against what truly changed, and chain restore speed.

A full backup of a multi-GiB, partly allocated disk, then a known random change of a few percent
of its data (written through the simulator's control API, so change tracking sees exactly those
writes), then an incremental: bytes read from the cluster, bytes stored and the truly changed
bytes (goal: read <= 1.01 x changed plus metadata). Nine more incrementals with smaller changes
follow; then the chain (full + 10 incrementals) is restored to a raw file, and the same run times
`cp --sparse=always` of that final raw image (goal: ratio >= 0.8); as the restore fsyncs its
output before reporting success, cp followed by an fsync of the copy is timed too (goal >= 1.0).
Each side runs `--runs` times, alternating, and the medians are compared, in two cache states
for both sides alike: cold (dirty pages written back and the page cache dropped before each run,
when this process may: root) and warm (each side's input read once just before). The restore
path itself is also timed in-process with the kernel copy on and off (`mechanism_*`), same
chain, same raw file writer, warm, to show what the kernel copy buys on this filesystem.
The simulator runs in its own process. Prints JSON.

    .venv/bin/python bench/incremental.py [--gib 4] [--data-gib 2] [--change-pct 3]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
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


def drop_caches() -> bool:
    """Write dirty pages back and drop the page cache; False when this process may not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def read_through(paths: list[Path]) -> None:
    """Bring files into the page cache (the warm state)."""
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(8 << 20):
                pass


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stats(runs: list[float]) -> dict[str, object]:
    return {"median": round(statistics.median(runs), 3), "min": round(min(runs), 3),
            "max": round(max(runs), 3), "runs": [round(x, 3) for x in runs]}


def cache_state(state: str, inputs: list[Path]) -> Callable[[], None]:
    """What brings the page cache into `state` for a run reading `inputs`."""
    if state == "cold":
        return lambda: None if drop_caches() else None  # noqa: RUF034 (drop, whatever it says)

    def warm() -> None:
        os.sync()
        read_through(inputs)
    return warm


def timed(prepare: Callable[[], None], action: Callable[[], None]) -> float:
    prepare()
    t0 = time.perf_counter()
    action()
    return time.perf_counter() - t0


def restore_timing(served: Served, work: Path, backup_id: str, streams: list[Path], *,
                   runs: int) -> dict[str, object]:
    """Restore vs cp --sparse=always vs cp + fsync, cold and warm, medians of `runs`."""
    out: dict[str, object] = {}
    probe = work / "probe"
    first, _ = run_cli_measured(
        ["restore", *job_args(served, work), "--backup", backup_id, "--dest", str(probe)])
    (disk,) = first["disks"]  # type: ignore[misc]
    raw = Path(disk["path"])
    out["chain_links"] = len(disk["chain"])
    out["restore_copied_in_kernel_bytes"] = disk.get("copied_bytes", 0)
    out["restore_data_bytes"] = disk["data_bytes"]
    cold_ok = drop_caches()
    states = ["cold", "warm"] if cold_ok else ["warm"]
    out["cache_states"] = states
    peak = 0
    for state in states:
        restore_runs, cp_runs, cp_sync_runs = [], [], []
        for n in range(runs):
            dest, copy = work / f"r-{state}{n}", work / f"c-{state}{n}.raw"

            rss = [0]

            def restore(dest: Path = dest, rss: list[int] = rss) -> None:
                done, rss[0] = run_cli_measured(
                    ["restore", *job_args(served, work), "--backup", backup_id,
                     "--dest", str(dest)])
                assert done["ok"], done

            restore_runs.append(timed(cache_state(state, streams), restore))
            peak = max(peak, rss[0])
            restored = dest / raw.parent.name / raw.name
            assert filecmp.cmp(restored, raw, shallow=False)
            restored.unlink()
            cp = ["cp", "--sparse=always", str(raw), str(copy)]
            cp_runs.append(timed(cache_state(state, [raw]),
                                 lambda cp=cp: subprocess.run(cp, check=True)))
            copy.unlink()
            cp_sync_runs.append(timed(cache_state(state, [raw]), lambda cp=cp, copy=copy: (
                subprocess.run(cp, check=True), fsync_path(copy))))
            copy.unlink()
        r, c, cs = stats(restore_runs), stats(cp_runs), stats(cp_sync_runs)
        out[state] = {
            "restore_seconds": r, "cp_sparse_seconds": c, "cp_sparse_fsync_seconds": cs,
            "restore_ratio_vs_cp": round(c["median"] / r["median"], 3),  # type: ignore[operator]
            "restore_ratio_vs_cp_fsync": round(cs["median"] / r["median"], 3),  # type: ignore[operator]
        }
    out["restore_peak_rss_mib"] = round(peak / 1024, 1)
    out.update(mechanism(work, backup_id, streams, runs=3))
    return out


def mechanism(work: Path, backup_id: str, streams: list[Path], *, runs: int
              ) -> dict[str, object]:
    """The chain written into a raw file in-process, kernel copy on and off (warm, fsynced)."""
    from types import SimpleNamespace

    import trio

    from ahvbackup.core.jobs.chain import ChainImage, resolve_chain
    from ahvbackup.core.repository import DirectorySink
    from ahvbackup.targets.raw import RawImage

    repo = DirectorySink(SimpleNamespace(repository=str(work / "repo")))
    backups = {b.backup_id: b for b in trio.run(repo.backups)}
    backup = backups[backup_id]
    links = resolve_chain(backups, backup, backup.manifest.streams[0])
    result: dict[str, object] = {}
    for kernel in (True, False):
        times = []
        for n in range(runs):
            os.sync()
            read_through(streams)
            t0 = time.perf_counter()
            with ChainImage(repo, links) as image:
                raw = RawImage(work, ("mech", f"{kernel}{n}.raw"), image.size)
                image.write_to(raw, kernel_copy=kernel)
                path = raw.close()
            times.append(time.perf_counter() - t0)
            path.unlink()
        result[f"mechanism_{'kernel_copy' if kernel else 'read_write'}_seconds"] = stats(times)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=4.0, help="disk size")
    ap.add_argument("--data-gib", type=float, default=2.0, help="allocated data on it")
    ap.add_argument("--change-pct", type=float, default=3.0, help="first change, % of the data")
    ap.add_argument("--later-pct", type=float, default=0.5, help="each later change")
    ap.add_argument("--chunk-mib", type=int, default=4, help="chunk_size_mib of the jobs")
    ap.add_argument("--compression", default="auto", help="compression of the backups")
    ap.add_argument("--runs", type=int, default=5, help="timed runs of each side and state")
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
            opts = {"vm": "inc-vm", "chunk_size_mib": args.chunk_mib,
                    "compression": args.compression}
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
        streams = sorted((work / "repo").rglob("*.ahvd"))
        stream_bytes = sum(p.stat().st_size for p in streams)
        timing = restore_timing(served, work, ids[-1], streams, runs=args.runs)
    d = inc["vms"][0]["disks"][0]  # type: ignore[index]
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
        "chain_links": timing.pop("chain_links"),
        "chain_stream_bytes": stream_bytes,
        "compression": args.compression,
        **timing,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
