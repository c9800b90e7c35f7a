"""Read one tgtd LUN into a raw file with our initiator and with `qemu-img convert` (libiscsi,
in C), in the same run, and print JSON: MB/s, ratio, CPU seconds per GiB, peak RSS. Then the
full backup pipeline over `data_path=iscsi` against a raw read of the same disk over iSCSI.

    .venv/bin/python bench/iscsi_read.py [--size-gib 2] [--runs 3] [--queue-depth 4]
                                         [--pipeline-gib 2] [--no-tgtd]

The pipeline part serves the Prism simulator (with its iSCSI target on the DSIP) in its own
process. The raw read is our initiator reading a volume group cloned from the VM's disk into a
raw file; the pipeline is `ahvbackup backup` of that VM (snapshot, VG staged from the snapshot,
login, reads in flight, encoding, the directory repository). `pipeline_ratio` compares the
job's read phase (staging excluded, as the raw read's VG exists beforehand) with the raw read;
`pipeline_whole_job_ratio` compares the whole job.

Needs root, tgt, qemu-utils and qemu-block-extra. Each reader runs as its own child process so
CPU time and peak RSS are its own (wait4). The LUN holds non-zero data (qemu-img would skip
writing zero blocks), and both outputs are compared byte for byte with the LUN image.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
INITIATOR_IQN = "iqn.2024-01.bench.ahvbackup:initiator"


def make_image(path: Path, size: int) -> None:
    block = os.urandom(16 * MiB)
    with open(path, "wb") as f:
        for pos in range(0, size, len(block)):
            f.write(block[: min(len(block), size - pos)])
        # stamp every MiB so a misplaced chunk cannot compare equal
        for mib in range(size // MiB):
            f.seek(mib * MiB)
            f.write(mib.to_bytes(8, "little"))


def same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(64 * MiB), fb.read(64 * MiB)
            if x != y:
                return False
            if not x:
                return True


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_child(cmd: list[str], *, tgtd_pid: int) -> dict[str, float]:
    t_cpu0 = proc_cpu(tgtd_pid)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # ru_maxrss of a child also counts the parent's RSS at fork, so sample the child's own
    # high-water mark (VmHWM, reset at exec) until it exits.
    hwm_kib = 0
    while True:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm_kib = max(hwm_kib, int(line.split()[1]))
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.01)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {err[-2000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": hwm_kib / 1024, "tgtd_cpu_s": proc_cpu(tgtd_pid) - t_cpu0}


def child_sim(args: argparse.Namespace) -> None:
    """Serve the simulator state in this process; print the endpoints as one JSON line."""
    import trio

    from ahvbackup.hypervisors.ahv.simulator import Simulator, serve_simulator

    async def main() -> None:
        sim = Simulator(Path(args.state), sync=False, task_seconds=0.05)
        async with serve_simulator(sim, port=0, tls=True, iscsi_port=0) as ep:
            (portal,) = ep.iscsi_portals.values()
            print(json.dumps({"pc": ep.pc_url.split("://", 1)[1], "pe": ep.pe_url,
                              "ca": str(ep.ca_path), "portal": list(portal)}), flush=True)
            await trio.sleep_forever()

    trio.run(main)


def pipeline(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """Raw iSCSI read of a VG vs the full backup job over data_path=iscsi, same disk."""
    import ssl
    import uuid

    import httpx

    sys.path.insert(0, str(Path(__file__).parent))
    from _simproc import Served, add_vm, job_args, run_cli_measured

    size = int(args.pipeline_gib * GiB) // MiB * MiB
    vm_uuid = add_vm(work / "sim", "bench-vm", size, [(0, size)])
    sim = subprocess.Popen([sys.executable, __file__, "--child-sim", "--state",
                            str(work / "sim")], stdout=subprocess.PIPE, text=True)
    try:
        assert sim.stdout is not None
        info = json.loads(sim.stdout.readline())
        host, port = info["portal"]
        served = Served(pc=info["pc"], ca=info["ca"], state=work / "sim")
        tls = ssl.create_default_context(cafile=info["ca"])
        auth = ("backup", "backup/4u")
        with httpx.Client(verify=tls, auth=auth, timeout=600) as c:
            vm = c.get(f"https://{info['pc']}/api/nutanix/v3/vms/{vm_uuid}").json()
            disk_uuid = vm["spec"]["resources"]["disk_list"][0]["uuid"]
            vgs = f"{info['pe']}/api/nutanix/v2.0/volume_groups"
            vg_uuid = str(uuid.uuid4())
            c.post(vgs, json={"uuid": vg_uuid, "name": "bench-raw", "disk_list": [
                {"vmdisk_clone_spec": {"vmdisk_uuid": disk_uuid}}]}).raise_for_status()
            target = c.get(f"{vgs}/{vg_uuid}").json()["iscsi_target"]
            c.post(f"{vgs}/{vg_uuid}/open", json={"iscsi_client": {
                "client_address": INITIATOR_IQN}, "operation": "ATTACH"}).raise_for_status()
            out = work / "raw.out"
            raw = run_child([sys.executable, __file__, "--child-ours", "--host", host,
                             "--port", str(port), "--iqn", target, "--out", str(out),
                             "--queue-depth", str(args.queue_depth),
                             "--chunk-mib", str(args.chunk_mib),
                             "--segment-kib", str(args.segment_kib)], tgtd_pid=sim.pid)
            assert out.stat().st_size == size
            out.unlink()
            c.delete(f"{vgs}/{vg_uuid}").raise_for_status()
        result, rss_kib = run_cli_measured([
            "backup", *job_args(served, work, vm="bench-vm", data_path="iscsi",
                                iscsi_port=port, iscsi_initiator=INITIATOR_IQN,
                                chunk_size_mib=args.pipeline_chunk_mib)])
    finally:
        sim.terminate()
        sim.wait(timeout=30)
    job_s = float(result["seconds"])  # type: ignore[arg-type]
    read_s = sum(d["read_seconds"] for v in result["vms"]  # type: ignore[attr-defined]
                 for d in v["disks"])
    assert int(result["bytes_read"]) == size, result["bytes_read"]  # type: ignore[call-overload]
    raw_mbs = size / raw["wall_s"] / 1e6
    return {
        "disk_bytes": size,
        "raw_read": {"mb_per_s": round(raw_mbs, 1),
                     "cpu_s_per_gib": round(raw["cpu_s"] / (size / GiB), 3),
                     "peak_rss_mib": round(raw["peak_rss_mib"], 1),
                     "queue_depth": args.queue_depth, "chunk_mib": args.chunk_mib},
        "pipeline": {"read_phase_mb_per_s": round(size / read_s / 1e6, 1),
                     "whole_job_mb_per_s": round(size / job_s / 1e6, 1),
                     "whole_job_seconds": round(job_s, 3),
                     "chunk_size_mib": args.pipeline_chunk_mib,
                     "peak_rss_mib": round(rss_kib / 1024, 1)},
        "pipeline_ratio": round(raw["wall_s"] / read_s, 3),
        "pipeline_whole_job_ratio": round(raw["wall_s"] / job_s, 3),
        "simulator_cpu_s_per_gib_raw": round(raw["tgtd_cpu_s"] / (size / GiB), 3),
    }


def child_ours(args: argparse.Namespace) -> None:
    import trio

    from ahvbackup.transports.iscsi import IscsiSession

    async def main() -> None:
        async with IscsiSession.connect(
            portal=(args.host, args.port), target_iqn=args.iqn, initiator_iqn=INITIATOR_IQN,
            queue_depth=args.queue_depth, max_transfer=args.chunk_mib * MiB,
            max_recv_segment=args.segment_kib * 1024, digests=args.digests,
        ) as s:
            size = s.size
            chunk = args.chunk_mib * MiB
            fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, size)
                offsets = iter(range(0, size, chunk))

                async def worker() -> None:
                    buf = bytearray(chunk)
                    view = memoryview(buf)
                    for off in offsets:
                        n = min(chunk, size - off)
                        await s.read_into(off, view[:n])
                        if args.write_in_thread:
                            await trio.to_thread.run_sync(os.pwrite, fd, view[:n], off)
                        else:
                            os.pwrite(fd, view[:n], off)

                async with trio.open_nursery() as nursery:
                    for _ in range(args.queue_depth):
                        nursery.start_soon(worker)
            finally:
                os.close(fd)

    trio.run(main)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--queue-depth", type=int, default=4)
    ap.add_argument("--chunk-mib", type=int, default=1)
    ap.add_argument("--segment-kib", type=int, default=256,
                    help="our MaxRecvDataSegmentLength (bounds each Data-In PDU)")
    ap.add_argument("--digests", action="store_true", help="CRC32C header+data digests")
    ap.add_argument("--write-in-thread", action="store_true")
    ap.add_argument("--dir", default=None, help="where the LUN image and outputs go")
    ap.add_argument("--pipeline-gib", type=float, default=2.0,
                    help="disk size of the pipeline comparison (0: skip it)")
    ap.add_argument("--pipeline-chunk-mib", type=int, default=4,
                    help="chunk_size_mib of the backup job")
    ap.add_argument("--no-tgtd", action="store_true", help="skip the tgtd/qemu-img part")
    ap.add_argument("--child-ours", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-sim", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    ap.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--iqn", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_ours:
        child_ours(args)
        return
    if args.child_sim:
        child_sim(args)
        return
    report: dict[str, object] = {"benchmark": "iscsi_read", "nproc": os.cpu_count()}
    if not args.no_tgtd:
        report.update(tgtd_vs_qemu_img(args))
    if args.pipeline_gib > 0:
        work = Path(tempfile.mkdtemp(prefix="iscsi-pipeline-", dir=args.dir))
        try:
            report["pipeline_over_iscsi"] = pipeline(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


def tgtd_vs_qemu_img(args: argparse.Namespace) -> dict[str, object]:
    from ahvbackup.transports.iscsi.testing import TgtdTarget

    if not shutil.which("qemu-img"):
        raise SystemExit("qemu-img not found (apt-get install qemu-utils qemu-block-extra)")
    size = int(args.size_gib * GiB) // MiB * MiB
    work = Path(tempfile.mkdtemp(prefix="iscsi-bench-", dir=args.dir))
    image = work / "lun.img"
    make_image(image, size)
    params = {"HeaderDigest": "CRC32C", "DataDigest": "CRC32C"} if args.digests else {}
    target = TgtdTarget(image=image, log_path=work / "tgtd.log", params=params).start()
    url = f"iscsi://127.0.0.1:{target.port}/{target.iqn}/1"
    results: dict[str, list[dict[str, float]]] = {"ours": [], "qemu_img": []}
    try:
        assert target.pid is not None
        for _ in range(args.runs):
            for name in ("qemu_img", "ours"):
                out = work / f"{name}.raw"
                if name == "ours":
                    cmd = [sys.executable, __file__, "--child-ours", "--port", str(target.port),
                           "--iqn", target.iqn, "--out", str(out),
                           "--queue-depth", str(args.queue_depth),
                           "--chunk-mib", str(args.chunk_mib),
                           "--segment-kib", str(args.segment_kib)]
                    cmd += ["--digests"] if args.digests else []
                    cmd += ["--write-in-thread"] if args.write_in_thread else []
                else:
                    cmd = ["qemu-img", "convert", "-O", "raw", url, str(out)]
                r = run_child(cmd, tgtd_pid=target.pid)
                r["byte_identical"] = same_file(out, image)
                results[name].append(r)
                out.unlink()
    finally:
        target.stop()
        shutil.rmtree(work, ignore_errors=True)

    def summary(runs: list[dict[str, float]]) -> dict[str, object]:
        mbs = [size / r["wall_s"] / 1e6 for r in runs]
        return {
            "mb_per_s_median": round(statistics.median(mbs), 1),
            "mb_per_s_runs": [round(x, 1) for x in mbs],
            "cpu_s_per_gib": round(statistics.median(r["cpu_s"] for r in runs) / (size / GiB),
                                   3),
            "tgtd_cpu_s_per_gib": round(
                statistics.median(r["tgtd_cpu_s"] for r in runs) / (size / GiB), 3),
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs), 1),
            "byte_identical": all(r["byte_identical"] for r in runs),
        }

    ours, peer = summary(results["ours"]), summary(results["qemu_img"])
    return {
        "lun_bytes": size,
        "output": "raw file (same filesystem) for both",
        "runs": args.runs,
        "ours": {**ours, "queue_depth": args.queue_depth, "chunk_mib": args.chunk_mib,
                 "segment_kib": args.segment_kib, "digests": args.digests},
        "qemu_img_convert": peer,
        "ratio_ours_vs_qemu_img": round(
            float(ours["mb_per_s_median"]) / float(peer["mb_per_s_median"]), 3),  # type: ignore[arg-type]
    }


if __name__ == "__main__":
    main()
