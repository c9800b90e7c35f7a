"""A real Bacula bpipe backup job running ``ahvbackup bpipe backup``, against a job that ``cat``s
an equivalent stream made beforehand, in the same Bacula lab, same run.

Both jobs store the same number of bytes through the same Director, Storage and File daemons
(Debian's Bacula, tests/bacula/lab.py); the peer's reader does no work but reading a file from
the page cache, so `ratio` (peer seconds / ours) says how much of Bacula's own speed our reader
keeps: snapshot, image staging, ranged reads from the simulator (in its own process), encoding.
Job wall times include Bacula's fixed start and ``wait`` overhead (~3 s), measured the same way
for both (``wait`` polls, so they move in whole seconds: use a few GiB); `*_catalog_mb_s` uses
the catalog's whole-second job times instead. `reader_alone_*` is the same reader writing the
stream to a file without Bacula (how the peer's stream was made).

A second peer, `catdl`, is fair to ours where `cat` is not: this machine also runs the
simulator, and every byte our reader gets costs the simulator CPU time (TLS and its disk
store) on the same two cores, which on a real cluster is spent on the cluster. `catdl` ``cat``s
the same stream while it downloads the disk's allocated ranges from the same simulator with
``curl`` (over HTTPS, from an image of the same disk, four ranges at once), the least any
reader of that disk must do; `ratio_vs_catdl` is its seconds over ours. It pays nothing for
snapshots or staging (ours does), and nothing for encoding.

The project's sources are byte-compiled first (`byte_compile`), as an installed package is
(pip and Debian's py3compile compile at install time). A development tree under
``PYTHONDONTWRITEBYTECODE=1`` has no ``.pyc`` files, and every reader (one Python process per
job) would otherwise spend about a second of CPU compiling ahvbackup's modules, a cost no
install pays.

    .venv/bin/python bench/bacula_bpipe.py [--gib 2] [--data-mib 512] [--runs 2]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from _simproc import MiB, Served, add_vm, serve

from ahvbackup.hypervisors.ahv.simulator import Simulator

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "bacula"), str(REPO)]
from lab import BaculaLab  # noqa: E402 - the lab lives with the tests

AHVBACKUP = Path(sys.executable).with_name("ahvbackup")
PROGRAMS = ("bacula-dir", "bacula-sd", "bacula-fd", "bconsole")


def write_config(path: Path, *, pc: str, ca: str, work: Path) -> Path:
    keys = {"prism_central": pc, "user": "backup", "password": "backup/4u", "prism_ca_cert": ca,
            "state_dir": work / "state", "working_dir": work, "debug_log": "", "verbose": "0",
            "prism_rate_rpm": "100000", "chunk_size_mib": "4"}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f'{k} = "{v}"\n' for k, v in keys.items()))
    return path


def byte_compile() -> None:
    """Write the ``.pyc`` files of the project's packages, as an install does (``__pycache__``
    is ignored by git; a module edited later is compiled again, as usual)."""
    for src in sorted(REPO.glob("*/src")):
        compileall.compile_dir(src, quiet=1)


def add_image(state: Path, vm_name: str) -> str:
    """An image of the VM's first disk (a copy-on-write clone), for the `catdl` peer."""
    sim = Simulator(state, seed=True, sync=False)
    try:
        vm = sim.find_vm(vm_name)
        image = sim.create_image(name="bench-peer", source_vmdisk=vm.data_disks[0].uuid)
        sim.save()
        return image.uuid
    finally:
        sim.close()


def catdl_script(path: Path, *, served: Served, image: str, extents: list[tuple[int, int]],
                 stream: Path) -> Path:
    """The `catdl` peer's reader: `stream` to stdout while `extents` of the image are
    downloaded (and dropped); it fails when a download fails."""
    url = f"https://{served.pc}/api/nutanix/v3/images/{image}/file"
    curls = "".join(
        f"curl -sf --cacert {served.ca} -u backup:backup/4u -r {off}-{off + n - 1} "
        f"-o /dev/null {url} & pids=\"$pids $!\"\n" for off, n in extents)
    path.write_text(f"#!/bin/sh\npids=\"\"\n{curls}cat {stream} || exit 1\n"
                    "for p in $pids; do wait $p || exit 1; done\n")
    return path


def catalog_seconds(lab: BaculaLab, job_id: int) -> float:
    row = lab.job_row(job_id)
    fmt = "%Y-%m-%d %H:%M:%S"
    start = datetime.strptime(str(row["StartTime"]), fmt)
    end = datetime.strptime(str(row["EndTime"]), fmt)
    return max((end - start).total_seconds(), 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0, help="disk size")
    ap.add_argument("--data-mib", type=int, default=512, help="allocated data on it")
    ap.add_argument("--runs", type=int, default=2, help="jobs of each kind, alternating")
    args = ap.parse_args()
    programs = {p: shutil.which(p) or shutil.which(p, path="/usr/sbin:/sbin") for p in PROGRAMS}
    missing = [p for p, path in programs.items() if not path]
    if missing:
        raise SystemExit(f"bacula programs missing: {', '.join(missing)}")
    byte_compile()
    size = int(args.gib * 1024) * MiB
    extents = [(i * (size // 4), args.data_mib * MiB // 4) for i in range(4)]
    with tempfile.TemporaryDirectory(prefix="ahvbackup-bench-bacula-") as tmp:
        work = Path(tmp)
        add_vm(work / "sim", "bench-vm", size, extents)
        image = add_image(work / "sim", "bench-vm")
        with serve(work / "sim") as served:
            conf = write_config(work / "ahvbackup.conf", pc=served.pc, ca=served.ca, work=work)
            reader = f"{AHVBACKUP} bpipe backup -c {conf} --vm bench-vm --disk scsi.0 --level full"
            stream = work / "premade.ahvd"
            t0 = time.perf_counter()
            with stream.open("wb") as out:
                subprocess.run(reader.split(), stdout=out, stderr=subprocess.DEVNULL, check=True)
            reader_alone = time.perf_counter() - t0
            peer = catdl_script(work / "catdl.sh", served=served, image=image,
                                extents=extents, stream=stream)
            filesets = {
                "ours": f"bpipe:/@ahvbackup/bench/bench-vm/disks/scsi.0.ahvd:{reader}:/bin/true",
                "cat": f"bpipe:/@bench/premade.ahvd:/bin/cat {stream}:/bin/true",
                "catdl": f"bpipe:/@bench/premade-dl.ahvd:/bin/sh {peer}:/bin/true",
            }
            lab = BaculaLab(root=work / "lab", programs={k: str(v) for k, v in programs.items()},
                            filesets=filesets)
            walls: dict[str, list[float]] = {name: [] for name in filesets}
            cat_s: dict[str, list[float]] = {name: [] for name in filesets}
            stored: dict[str, int] = {}
            with lab:
                for _ in range(args.runs):
                    for name in filesets:
                        t0 = time.perf_counter()
                        job = lab.run_job(f"run job={name} level=Full yes", timeout=1800)
                        walls[name].append(time.perf_counter() - t0)
                        if (job.status, job.errors) != ("T", 0):
                            raise SystemExit(f"job {name} ended {job}: {lab.job_log()[-2000:]}")
                        cat_s[name].append(catalog_seconds(lab, job.job_id))
                        stored[name] = job.bytes
    stream_bytes = stored["cat"]
    ours_wall, cat_wall = statistics.median(walls["ours"]), statistics.median(walls["cat"])
    out = {
        "bacula": "9.6.7 (Debian), bpipe, File device, no compression",
        "disk_bytes": size,
        "data_bytes": args.data_mib * MiB,
        "stream_bytes": stream_bytes,
        "job_bytes": stored,
        "runs": args.runs,
        "ours_wall_seconds": [round(x, 2) for x in walls["ours"]],
        "cat_wall_seconds": [round(x, 2) for x in walls["cat"]],
        "ours_wall_mb_s": round(stream_bytes / ours_wall / 1e6, 1),
        "cat_wall_mb_s": round(stream_bytes / cat_wall / 1e6, 1),
        "catdl_wall_seconds": [round(x, 2) for x in walls["catdl"]],
        "ratio": round(cat_wall / ours_wall, 3),
        "ratio_vs_catdl": round(statistics.median(walls["catdl"]) / ours_wall, 3),
        "reader_alone_seconds": round(reader_alone, 2),
        "reader_alone_mb_s": round(stream_bytes / reader_alone / 1e6, 1),
        "ours_catalog_mb_s": round(stream_bytes / statistics.median(cat_s["ours"]) / 1e6, 1),
        "cat_catalog_mb_s": round(stream_bytes / statistics.median(cat_s["cat"]) / 1e6, 1),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
