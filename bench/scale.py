"""How a backup job's time, memory and Prism calls grow from 20 to 300 VMs, printed as JSON.

    .venv/bin/python bench/scale.py [--vms 20,100,300] [--data-path iscsi] [--concurrent-vms 8]

For each count the simulator is seeded (offline) with that many small VMs (1 to 3 disks of 2
to 4 MiB, 256 KiB to 1 MiB of data each) and served in its own process (its iSCSI target on
the DSIP, tasks of 0.1 s). A fresh child process then runs a full backup of every VM and an
incremental after one disk of each VM changed, with `concurrent_vms`, at an unlimited Prism
rate (at 30 a minute the rate cap alone decides: see bench/prism_calls.py). Each run reports
wall time, seconds per VM, peak RSS (VmHWM, reset before each run), Prism requests (the
simulator's counters) and the open files and sockets of the job's process, sampled every
20 ms: the peak, and what is left after the run beside what was open before (a leak).

`per_vm_spread` is the largest over the smallest seconds per VM across the counts (goal: at
most 1.2); `simulator_cpu_share` is the simulator process's CPU seconds over the wall time
(near 1.0: the simulator is the bottleneck, not the job).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

MiB = 1 << 20
KiB = 1 << 10
CLI = [sys.executable, "-m", "ahvbackup.core.cli"]
INITIATOR = "iqn.2024-01.bench.ahvbackup:scale"


def seed(state: Path, count: int) -> list[str]:
    """`count` small VMs in a fresh simulator state; their uuids."""
    from ahvbackup.hypervisors.ahv.simulator import Simulator
    from ahvbackup.hypervisors.ahv.simulator.model import Disk, Vm

    rng = random.Random(count)
    sim = Simulator(state, seed=True, sync=False)
    names = []
    try:
        cluster = next(iter(sim.clusters.values()))
        for i in range(count):
            sizes = [rng.choice((2, 3, 4)) * MiB for _ in range(rng.randint(1, 3))]
            vm = Vm(uuid=str(uuid.uuid4()), name=f"scale-{i:04d}", cluster_uuid=cluster.uuid,
                    disks=[Disk(uuid=str(uuid.uuid4()), device_type="DISK",
                                adapter_type="SCSI", device_index=d, size=size,
                                container_uuid=cluster.containers[0].uuid)
                           for d, size in enumerate(sizes)])
            sim.create_vm(vm)
            for d, size in enumerate(sizes):
                sim.write_disk(vm.uuid, d, 0, rng.randbytes(min(size, rng.choice((256, 512,
                                                                                  1024)) * KiB)))
            names.append(vm.uuid)
        sim.save()
    finally:
        sim.close()
    return names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(state: Path, iscsi_port: int) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen(
        [*CLI, "--json", "simulator", "serve", "--state", str(state), "--port", "0",
         "--iscsi-port", str(iscsi_port), "--task-seconds", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("simulator exited before printing its endpoints")
        lines.append(line)
        try:
            return proc, json.loads("".join(lines))
        except ValueError:
            continue


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the child: runs the jobs, measures itself ----------------------------------------------------

def _fds() -> tuple[int, int]:
    """(open descriptors, of which sockets) of this process."""
    total = sockets = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        total += 1
        sockets += target.startswith("socket:")
    return total, sockets


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> None:
    import logging

    import httpx
    import trio

    from ahvbackup.core.config import ConfigSources, ModeView, assemble_config
    from ahvbackup.core.jobs.backup import BackupJob
    from ahvbackup.core.jobs.runtime import Runtime
    from ahvbackup.core.plugins import Hooks

    logging.basicConfig(level=logging.ERROR)
    info = json.loads(args.child)
    tmp = Path(info["tmp"])
    pc = info["prism_central"]
    control = httpx.Client(base_url=pc + "/api/simulator/v1", verify=info["ca_cert"],
                           auth=("admin", "nutanix/4u"))

    def config(level: str) -> Any:
        overrides = {
            "prism_central": pc.split("://", 1)[1], "prism_ca_cert": info["ca_cert"],
            "user": "backup", "password": "backup/4u", "state_dir": str(tmp / "state"),
            "repository": str(tmp / "repo"), "debug_log": "", "working_dir": str(tmp),
            "iscsi_port": str(info["iscsi_port"]), "iscsi_initiator": INITIATOR,
            "prism_rate_rpm": "0", "prism_api_version": "v3", "vm": "scale-*",
            "data_path": info["data_path"], "concurrent_vms": str(info["concurrent_vms"]),
            "level": level,
        }
        return assemble_config(ConfigSources(overrides=overrides), hooks=Hooks(),
                               view=ModeView("a benchmark job"))

    async def run(level: str) -> dict[str, Any]:
        control.delete("/stats").raise_for_status()
        before = _fds()  # the control client's connection is open by now
        peak = list(before)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
        done = trio.Event()

        async def sample() -> None:
            while not done.is_set():
                now = _fds()
                peak[0], peak[1] = max(peak[0], now[0]), max(peak[1], now[1])
                with trio.move_on_after(0.02):
                    await done.wait()

        t0 = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            result = await BackupJob(Runtime.from_config(config(level))).run()
            done.set()
        seconds = time.monotonic() - t0
        after = _fds()
        stats = control.get("/stats").json()
        return {"level": level, "ok": result.ok, "failed": len(result.failed),
                "seconds": round(seconds, 2),
                "seconds_per_vm": round(seconds / max(1, len(result.vms)), 4),
                "peak_rss_mib": round(_hwm_kib() / 1024, 1),
                "prism_requests": sum(n for k, n in stats["requests"].items()
                                      if not k.endswith("/file")),
                "prism_requests_per_vm": round(sum(
                    n for k, n in stats["requests"].items() if not k.endswith("/file"))
                    / max(1, len(result.vms)), 2),
                "peak_fds": peak[0], "peak_sockets": peak[1],
                "fds_left": after[0] - before[0], "sockets_left": after[1] - before[1]}

    async def main() -> None:
        full = await run("full")
        # one disk of each VM changes before the incremental
        for vm_uuid in info["vms"]:
            control.put(f"/vms/{vm_uuid}/disks/0/data", params={"offset": 0},
                        content=os.urandom(64 * KiB)).raise_for_status()
        incremental = await run("incremental")
        print(json.dumps([full, incremental]))

    trio.run(main)


# -- the parent ---------------------------------------------------------------------------------

def one(count: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="scale-") as d:
        tmp = Path(d)
        names = seed(tmp / "sim", count)
        iscsi_port = _free_port()
        proc, info = serve(tmp / "sim", iscsi_port)
        try:
            cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
            out = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps({
                    "tmp": str(tmp), "prism_central": info["prism_central"],
                    "ca_cert": info["ca_cert"], "iscsi_port": iscsi_port,
                    "data_path": args.data_path, "concurrent_vms": args.concurrent_vms,
                    "vms": names})],
                capture_output=True, text=True, check=False)
            wall = time.monotonic() - t0
            sim_cpu = _cpu_seconds(proc.pid) - cpu0
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        if out.returncode != 0:
            raise SystemExit(f"scale child failed at {count} VMs:\n{out.stderr[-3000:]}")
        runs = json.loads(out.stdout.strip().splitlines()[-1])
        return {"vms": count, "runs": runs,
                "simulator_cpu_share": round(sim_cpu / wall, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", default="20,100,300")
    parser.add_argument("--data-path", default="iscsi", choices=("iscsi", "rest"))
    parser.add_argument("--concurrent-vms", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    results = [one(int(n), args) for n in args.vms.split(",")]
    spread = {}
    for level in ("full", "incremental"):
        per = [r["seconds_per_vm"] for res in results for r in res["runs"]
               if r["level"] == level]
        spread[level] = round(max(per) / min(per), 3) if per else None
    print(json.dumps({"data_path": args.data_path, "concurrent_vms": args.concurrent_vms,
                      "results": results, "per_vm_spread": spread}, indent=2))


if __name__ == "__main__":
    main()
