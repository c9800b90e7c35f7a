"""A real Bacula 15.0.3 metaplugin backup job (our ``ahvbackup-fd.so`` running
``ahvbackup-bacula-backend``), against a bpipe job that ``cat``s an equivalent stream made
beforehand, in the same Bacula lab, same run.

Bacula 15.0.3 is Debian's bookworm-backports packages in a private prefix, with the plugin
built from Debian's 15.0.3 source (``bacula/fd-plugin/ci-prepare.sh``; tests/bacula/lab15.py).
Both jobs store one disk stream of the same size through the same Director, Storage and File
daemons; the peer's reader does no work but reading a file from the page cache, so `ratio`
(peer seconds / ours) says how much of Bacula's own speed the metaplugin path keeps: snapshot,
image staging, ranged reads from the simulator (in its own process), encoding (the one disk is
streamed to the file daemon as it is read, overlapping with Bacula's work; see sink.py) and
the metaplugin's packet protocol. Job wall times include Bacula's fixed start and ``wait``
overhead (~3 s), measured the same way for both; `*_catalog_mb_s` uses the catalog's
whole-second job times instead. `ratio_vs_catdl` compares with the fairer peer of
bench/bacula_bpipe.py (``cat`` while downloading the disk's ranges from the same simulator,
whose CPU time is spent on this machine's two cores). The project is byte-compiled first, as
an install is (see bench/bacula_bpipe.py `byte_compile`): the backend is one Python process per
job.

    .venv/bin/python bench/bacula_metaplugin.py [--gib 2] [--data-mib 512] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _simproc import MiB, add_vm, serve

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "bacula"), str(REPO)]
import lab15  # noqa: E402 - the lab lives with the tests
from bacula_bpipe import add_image, byte_compile, catalog_seconds, catdl_script  # noqa: E402
from lab import BaculaLab, JobResult  # noqa: E402

AHVBACKUP = Path(sys.executable).with_name("ahvbackup")
#: a job's catalog JobStatus once it has ended
TERMINAL = frozenset("TEefAW")


def write_config(path: Path, *, pc: str, ca: str, work: Path) -> Path:
    passfile = work / "backup.pass"
    fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("password = backup/4u\n")
    keys = {"prism_central": pc, "user": "backup", "passfile": passfile, "prism_ca_cert": ca,
            "state_dir": work / "state", "working_dir": work, "debug_log": "", "verbose": "0",
            "prism_rate_rpm": "100000", "chunk_size_mib": "4",
            "application_consistent": "false"}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f'{k} = "{v}"\n' for k, v in keys.items()))
    return path


def run_polled(lab: BaculaLab, command: str, *, timeout: float = 1800) -> JobResult:
    """`lab.run_job`, but the end of the job is seen within 50 ms (its catalog status)."""
    out = lab.bconsole(command)
    ids = [int(x) for x in re.findall(r"Job queued\. JobId=(\d+)", out)]
    if not ids:
        raise SystemExit(f"no JobId from {command!r}: {out}")
    deadline = time.monotonic() + timeout
    while True:
        job = lab.job(ids[-1])
        if job.status in TERMINAL:
            return job
        if time.monotonic() > deadline:
            raise SystemExit(f"job {ids[-1]} did not end in {timeout} s")
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0, help="disk size")
    ap.add_argument("--data-mib", type=int, default=512, help="allocated data on it")
    ap.add_argument("--runs", type=int, default=2, help="jobs of each kind, alternating")
    ap.add_argument("--poll", action="store_true",
                    help="time each job by polling the catalog every 50 ms instead of with "
                         "bconsole's `wait` (which checks once a second, so wall times come in "
                         "whole-second steps)")
    args = ap.parse_args()
    why = lab15._missing()
    if why:
        raise SystemExit(why)
    byte_compile()
    size = int(args.gib * 1024) * MiB
    extents = [(i * (size // 4), args.data_mib * MiB // 4) for i in range(4)]
    with tempfile.TemporaryDirectory(prefix="ahvbackup-bench-bacula15-") as tmp:
        work = Path(tmp)
        add_vm(work / "sim", "bench-vm", size, extents)
        image = add_image(work / "sim", "bench-vm")
        with serve(work / "sim") as served:
            conf = write_config(work / "ahvbackup.conf", pc=served.pc, ca=served.ca, work=work)
            # the peer's stream: the same disk's full stream, made by our bpipe reader
            reader = [str(AHVBACKUP), "bpipe", "backup", "-c", str(conf), "--vm", "bench-vm",
                      "--disk", "scsi.0", "--level", "full"]
            stream = work / "premade.ahvd"
            with stream.open("wb") as f:
                subprocess.run(reader, stdout=f, stderr=subprocess.DEVNULL, check=True)
            peer = catdl_script(work / "catdl.sh", served=served, image=image,
                                extents=extents, stream=stream)
            filesets: dict[str, str | list[str]] = {
                "ours": "ahvbackup: vm=bench-vm",
                "cat": f"bpipe:/@bench/premade.ahvd:/bin/cat {stream}:/bin/true",
                "catdl": f"bpipe:/@bench/premade-dl.ahvd:/bin/sh {peer}:/bin/true",
            }
            lab = lab15.lab15(work / "lab", filesets=filesets, config=conf)
            walls: dict[str, list[float]] = {name: [] for name in filesets}
            cat_s: dict[str, list[float]] = {name: [] for name in filesets}
            stored: dict[str, int] = {}
            log_lines: list[str] = []
            with lab:
                for _ in range(args.runs):
                    for name in filesets:
                        t0 = time.perf_counter()
                        if args.poll:
                            job = run_polled(lab, f"run job={name} level=Full yes")
                        else:
                            job = lab.run_job(f"run job={name} level=Full yes", timeout=1800)
                        walls[name].append(time.perf_counter() - t0)
                        if (job.status, job.errors) != ("T", 0):
                            raise SystemExit(f"job {name} ended {job}: {lab.job_log()[-2000:]}")
                        cat_s[name].append(catalog_seconds(lab, job.job_id))
                        stored[name] = job.bytes
                        if name == "ours":
                            log_lines = [x for x in lab15.job_lines(lab, job.job_id)
                                         if "ahvbackup:" in x]
    stream_bytes = stored["cat"]
    ours_wall, cat_wall = statistics.median(walls["ours"]), statistics.median(walls["cat"])
    out = {
        "bacula": "15.0.3 (Debian bookworm-backports), metaplugin ahvbackup-fd.so vs bpipe cat, "
                  "File device, no compression",
        "disk_bytes": size,
        "data_bytes": args.data_mib * MiB,
        "stream_bytes": stream_bytes,
        "job_bytes": stored,
        "runs": args.runs,
        "timing": "catalog polled every 50 ms" if args.poll else "bconsole wait (1 s steps)",
        "ours_wall_seconds": [round(x, 2) for x in walls["ours"]],
        "cat_wall_seconds": [round(x, 2) for x in walls["cat"]],
        "ours_wall_mb_s": round(stream_bytes / ours_wall / 1e6, 1),
        "cat_wall_mb_s": round(stream_bytes / cat_wall / 1e6, 1),
        "catdl_wall_seconds": [round(x, 2) for x in walls["catdl"]],
        "ratio": round(cat_wall / ours_wall, 3),
        "ratio_vs_catdl": round(statistics.median(walls["catdl"]) / ours_wall, 3),
        "ours_catalog_mb_s": round(stream_bytes / statistics.median(cat_s["ours"]) / 1e6, 1),
        "cat_catalog_mb_s": round(stream_bytes / statistics.median(cat_s["cat"]) / 1e6, 1),
        "ours_job_log": log_lines,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
