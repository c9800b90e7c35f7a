"""Restore a backed-up VM to AHV over iSCSI and over REST, against a plain ``curl -T`` upload
of the same disk bytes to the simulator's image endpoint and our raw restore, in the same
run; print JSON with ratios.

    .venv/bin/python bench/restore_ahv.py [--size-gib 4] [--data-mib 768] [--runs 2]

The VM has one sparse disk of `--size-gib` holding `--data-mib` of pseudo-random data in
extents spread over it. It is backed up once (full, directory repository); then each run times:

- ``ahvbackup restore --target ahv -o data_path=iscsi``: a volume group with an empty disk,
  written over iSCSI with our initiator (data ranges only), cloned into a new VM;
- the same with ``data_path=rest``: an image filled by one streamed PUT (zeros included);
- ``curl -T disk.raw`` into a fresh image (``PUT /api/nutanix/v3/images/{uuid}/file``): the
  whole disk, zeros included, read from the raw restore's sparse file;
- ``ahvbackup restore`` (raw target): a sparse raw file.

Times: `job_s` is the restore job's own time (its JSON ``seconds``: Python start-up excluded,
which is about a second here), `wall_s` the process. The goal is iSCSI at least 1.0x curl
(`iscsi_vs_curl` = curl seconds / our job seconds). The simulator runs in its own process
(bench/iscsi_read.py --child-sim) with its iSCSI target on the DSIP.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _simproc import CLI, Served, add_vm, job_args  # noqa: E402 - after the path change

MiB = 1 << 20
GiB = 1 << 30
ADMIN = ("admin", "nutanix/4u")


def extents(size: int, data: int, pieces: int = 24) -> list[tuple[int, int]]:
    """`pieces` extents of data spread evenly over the disk (MiB-aligned)."""
    each = max(MiB, data // pieces // MiB * MiB)
    stride = size // pieces // MiB * MiB
    return [(i * stride, each) for i in range(pieces) if i * stride + each <= size]


def cli_json(args: list[str]) -> tuple[dict[str, object], float]:
    start = time.perf_counter()
    done = subprocess.run([*CLI, "--json", *args], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"ahvbackup {args[0]} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout), wall


def job_seconds(doc: dict[str, object]) -> float:
    assert doc["ok"], doc
    return float(doc["seconds"])  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=4.0)  # 2 cores: 4 GiB, 768 MiB data
    ap.add_argument("--data-mib", type=int, default=768)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    size = int(args.size_gib * GiB) // MiB * MiB
    with tempfile.TemporaryDirectory(prefix="bench-restore-ahv-") as tmp:
        work = Path(tmp)
        layout = extents(size, args.data_mib * MiB)
        add_vm(work / "sim", "bench-vm", size, layout)
        sim = subprocess.Popen([sys.executable, str(HERE / "iscsi_read.py"), "--child-sim",
                                "--state", str(work / "sim")], stdout=subprocess.PIPE, text=True)
        try:
            assert sim.stdout is not None
            info = json.loads(sim.stdout.readline())
            served = Served(pc=info["pc"], ca=info["ca"], state=work / "sim")
            port = info["portal"][1]
            report = run(args, work, served, port, size, sum(n for _, n in layout))
        finally:
            sim.terminate()
            sim.wait(timeout=30)
    print(json.dumps(report, indent=2))


def run(args: argparse.Namespace, work: Path, served: Served, port: int, size: int,
        data: int) -> dict[str, object]:
    common = {"iscsi_port": port, "vm": "bench-vm"}
    backup, _ = cli_json(["backup", *job_args(served, work, **common)])
    assert backup["ok"], backup
    admin = {"user": ADMIN[0], "password": ADMIN[1]}
    tls = ssl.create_default_context(cafile=served.ca)
    times: dict[str, list[float]] = {k: [] for k in
                                     ("iscsi_job", "iscsi_wall", "rest_job", "rest_wall",
                                      "raw_job", "raw_wall", "curl")}
    with httpx.Client(verify=tls, auth=ADMIN, timeout=600) as http:
        for n in range(args.runs):
            for path in ("iscsi", "rest"):
                doc, wall = cli_json(["restore", "--vm", "bench-vm", "--target", "ahv",
                                      *job_args(served, work, **common, **admin, data_path=path,
                                                restore_vm_name=f"r-{path}-{n}")])
                times[f"{path}_job"].append(job_seconds(doc))
                times[f"{path}_wall"].append(wall)
            out = work / f"raw-{n}"
            doc, wall = cli_json(["restore", "--vm", "bench-vm", "--dest", str(out),
                                  *job_args(served, work, **common)])
            times["raw_job"].append(job_seconds(doc))
            times["raw_wall"].append(wall)
            (image,) = out.rglob("*.raw")
            assert image.stat().st_size == size
            times["curl"].append(curl_upload(http, served, image, n))
            image.unlink()
            for vm in http.post(f"https://{served.pc}/api/nutanix/v3/vms/list",
                                json={"length": 500}).json()["entities"]:
                if vm["spec"]["name"].startswith("r-"):  # the VMs made: keep the sim small
                    http.delete(f"https://{served.pc}/api/nutanix/v3/vms/"
                                f"{vm['metadata']['uuid']}")
    med = {k: statistics.median(v) for k, v in times.items()}
    mb = size / 1e6
    return {
        "benchmark": "restore_ahv", "nproc": os.cpu_count(), "runs": args.runs,
        "disk_bytes": size, "data_bytes": data,
        "seconds_median": {k: round(v, 3) for k, v in med.items()},
        "seconds_each_run": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "disk_mb_per_s": {k: round(mb / v, 1) for k, v in med.items()},
        "iscsi_vs_curl": round(med["curl"] / med["iscsi_job"], 3),
        "iscsi_wall_vs_curl": round(med["curl"] / med["iscsi_wall"], 3),
        "rest_vs_curl": round(med["curl"] / med["rest_job"], 3),
        "raw_vs_curl": round(med["curl"] / med["raw_job"], 3),
        "goal": "iscsi_vs_curl >= 1.0",
    }


def curl_upload(http: httpx.Client, served: Served, image: Path, n: int) -> float:
    """Seconds for ``curl -T`` of the whole disk file into a new image (created first, not
    timed), as an operator would upload a disk."""
    image_id = str(uuid.uuid4())
    body = {"api_version": "3.1", "metadata": {"kind": "image", "uuid": image_id},
            "spec": {"name": f"curl-{n}", "resources": {"image_type": "DISK_IMAGE"}}}
    http.post(f"https://{served.pc}/api/nutanix/v3/images", json=body).raise_for_status()
    deadline = time.monotonic() + 60
    while http.get(f"https://{served.pc}/api/nutanix/v3/images/{image_id}").json()[
            "status"].get("state") != "COMPLETE":
        assert time.monotonic() < deadline, "the image never became ready"
        time.sleep(0.1)
    cmd = ["curl", "-sS", "--fail", "-T", str(image), "--cacert", served.ca,
           "-u", f"{ADMIN[0]}:{ADMIN[1]}", "-H", "Content-Type: application/octet-stream",
           f"https://{served.pc}/api/nutanix/v3/images/{image_id}/file"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    took = time.perf_counter() - start
    http.delete(f"https://{served.pc}/api/nutanix/v3/images/{image_id}")
    return took


if __name__ == "__main__":
    main()
