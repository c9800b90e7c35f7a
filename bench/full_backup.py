"""Full backup throughput over the REST data path, against a plain download of the same data.

Both read the same allocated bytes of the same multi-GiB, partly sparse disk from the same
simulator process in the same run: the peers are one streaming HTTP GET per data extent of an
image of that disk, discarded as it comes (httpx), and `curl -o FILE` of the same ranges into
files on the repository's filesystem, fsynced. Ours runs twice, with compression=none (the same
work as the peers) and with the repository's default (compression=auto, zstd:1).
Ours is the whole job: snapshot, image staging (the simulator copies the allocated data to make
the image, as an image service would), ranged reads in flight, encoding and checksums, and
writing the stream into the directory repository. `ratio` compares the whole job with the plain
download; `read_phase_ratio` only the part after the image exists, as the plain download does.
Prints JSON; the ratios are what matter on a shared machine.

    .venv/bin/python bench/full_backup.py [--gib 4] [--data-gib 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from _simproc import MiB, add_vm, job_args, run_cli_measured, serve


def plain_download(pc: str, ca: str, vm_uuid: str, extents: list[tuple[int, int]],
                   work: Path) -> tuple[float, float]:
    """Seconds to stream the extents of an image of the VM's disk, after the image exists:
    discarded as they come (httpx), and with `curl -o FILE` into files on the same
    filesystem as the repository, fsynced (as the repository's streams are)."""
    base = f"https://{pc}/api/nutanix/v3"
    auth = ("backup", "backup/4u")
    with httpx.Client(verify=ca, auth=auth, timeout=600) as c:
        vm = c.get(f"{base}/vms/{vm_uuid}").json()
        disk = vm["spec"]["resources"]["disk_list"][0]
        cluster = c.get(f"{base}/clusters/{vm['spec']['cluster_reference']['uuid']}").json()
        ip = cluster["status"]["resources"]["network"]["external_ip"]
        container = disk["storage_config"]["storage_container_reference"]["name"]
        src = f"nfs://{ip}/{container}/.acropolis/vmdisk/{disk['uuid']}"
        made = c.post(f"{base}/images", json={
            "metadata": {"kind": "image"},
            "spec": {"name": "bench-plain", "resources": {"image_type": "DISK_IMAGE",
                                                          "source_uri": src}}}).json()
        image = made["metadata"]["uuid"]
        if "metadata" not in made or "status" not in made:
            raise RuntimeError(f"image create refused: {made}")
        task = made["status"]["execution_context"]["task_uuid"]
        task = task[0] if isinstance(task, list) else task
        while c.get(f"{base}/tasks/{task}").json()["status"] not in ("SUCCEEDED", "FAILED"):
            time.sleep(0.1)
        started = time.perf_counter()
        got = 0
        for off, length in extents:
            headers = {"Range": f"bytes={off}-{off + length - 1}"}
            with c.stream("GET", f"{base}/images/{image}/file", headers=headers) as resp:
                resp.raise_for_status()
                for chunk in resp.iter_raw(1 << 20):
                    got += len(chunk)
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        for i, (off, length) in enumerate(extents):
            out = work / f"curl-{i}.raw"
            subprocess.run(["curl", "-sSf", "--cacert", ca, "-u", ":".join(auth),
                            "-r", f"{off}-{off + length - 1}", "-o", str(out),
                            f"{base}/images/{image}/file"], check=True)
            fd = os.open(out, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            assert out.stat().st_size == length
            out.unlink()
        curl_seconds = time.perf_counter() - started
        c.delete(f"{base}/images/{image}")
    assert got == sum(n for _, n in extents), got
    return seconds, curl_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=4.0, help="disk size")
    ap.add_argument("--data-gib", type=float, default=2.0, help="allocated data on it")
    ap.add_argument("--chunk-mib", type=int, default=4, help="chunk_size_mib of the job")
    args = ap.parse_args()
    size = int(args.gib * 1024) * MiB
    data = int(args.data_gib * 1024) * MiB
    # four data extents with holes between them
    step = size // 4
    extents = [(i * step, data // 4) for i in range(4)]
    with tempfile.TemporaryDirectory(prefix="ahvbackup-bench-") as tmp:
        work = Path(tmp)
        vm_uuid = add_vm(work / "sim", "bench-vm", size, extents)
        with serve(work / "sim") as served:
            plain_s, curl_s = plain_download(served.pc, served.ca, vm_uuid, extents, work)
            runs = {}
            for compression in ("none", "auto"):
                runs[compression] = run_cli_measured(
                    ["backup", *job_args(served, work, vm="bench-vm", level="full",
                                         chunk_size_mib=args.chunk_mib,
                                         compression=compression)])
    by_compression = {}
    for compression, (result, rss_kib) in runs.items():
        by_compression[compression] = summary(result, rss_kib, data, plain_s, curl_s)
    out = {
        "disk_bytes": size,
        "data_bytes": data,
        "chunk_size_mib": args.chunk_mib,
        "plain_download_discard_seconds": round(plain_s, 3),
        "plain_download_discard_mb_s": round(data / plain_s / 1e6, 1),
        "curl_o_file_seconds": round(curl_s, 3),
        "curl_o_file_mb_s": round(data / curl_s / 1e6, 1),
        "compression_none": by_compression["none"],  # the same work as the peers
        "compression_default": by_compression["auto"],
        "bench_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(out, indent=2))


def summary(result: dict[str, object], rss_kib: int, data: int, plain_s: float,
            curl_s: float) -> dict[str, object]:
    ours_s = float(result["seconds"])  # type: ignore[arg-type]
    read_s = sum(d["read_seconds"] for v in result["vms"] for d in v["disks"])  # type: ignore[attr-defined,index]
    read = int(result["bytes_read"])  # type: ignore[call-overload]
    assert read == data, (read, data)
    return {
        "backup_seconds": round(ours_s, 3),
        "backup_mb_s": round(data / ours_s / 1e6, 1),
        "ratio_vs_discard": round(plain_s / ours_s, 3),
        "ratio_vs_curl_o_file": round(curl_s / ours_s, 3),
        "backup_read_phase_seconds": round(read_s, 3),
        "backup_read_phase_mb_s": round(data / read_s / 1e6, 1),
        "read_phase_ratio_vs_discard": round(plain_s / read_s, 3),
        "read_phase_ratio_vs_curl_o_file": round(curl_s / read_s, 3),
        "backup_peak_rss_mib": round(rss_kib / 1024, 1),
        "bytes_stored": result["bytes_stored"],
    }


if __name__ == "__main__":
    main()
