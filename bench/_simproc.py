"""Shared by the benchmarks: a simulator in its own process, so it does not share our CPU time
slice and event loop with the code being measured."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ahvbackup.hypervisors.ahv.simulator import Simulator
from ahvbackup.hypervisors.ahv.simulator.model import Disk, Vm

MiB = 1 << 20
CLI = [sys.executable, "-m", "ahvbackup.core.cli"]


@dataclass
class Served:
    pc: str  # host:port
    ca: str
    state: Path


def add_vm(state: Path, name: str, size: int, extents: list[tuple[int, int]]) -> str:
    """Create (offline) a VM with one disk holding pseudo-random data in `extents`."""
    sim = Simulator(state, seed=True, sync=False)
    try:
        cluster = next(iter(sim.clusters.values()))
        vm = Vm(uuid=str(uuid.uuid4()), name=name, cluster_uuid=cluster.uuid,
                disks=[Disk(uuid=str(uuid.uuid4()), device_type="DISK", adapter_type="SCSI",
                            device_index=0, size=size,
                            container_uuid=cluster.containers[0].uuid)])
        sim.create_vm(vm)
        block = os.urandom(8 * MiB)
        for off, length in extents:
            for pos in range(off, off + length, len(block)):
                n = min(len(block), off + length - pos)
                # vary each block so nothing dedups or compresses by accident
                data = bytes([pos // len(block) % 251]) + block[1:n]
                sim.write_disk(vm.uuid, 0, pos, data)
        sim.save()
        return vm.uuid
    finally:
        sim.close()


@contextmanager
def serve(state: Path) -> Iterator[Served]:
    proc = subprocess.Popen(
        [*CLI, "--json", "simulator", "serve", "--state", str(state), "--port", "0",
         "--task-seconds", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        lines = []
        assert proc.stdout is not None
        while True:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("simulator exited before printing its endpoints")
            lines.append(line)
            try:
                info = json.loads("".join(lines))
                break
            except ValueError:
                continue
        yield Served(pc=info["prism_central"].split("://", 1)[1], ca=info["ca_cert"],
                     state=state)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def job_args(s: Served, work: Path, **extra: object) -> list[str]:
    opts = {
        "prism_central": s.pc, "user": "backup", "password": "backup/4u",
        "prism_ca_cert": s.ca, "state_dir": work / "state", "repository": work / "repo",
        "working_dir": work, "debug_log": "", "verbose": "0", "prism_rate_rpm": "100000",
        **extra,
    }
    return [a for k, v in opts.items() for a in ("-o", f"{k}={v}")]


RSS_WRAPPER = (
    "import atexit, os, resource\n"
    "atexit.register(lambda: os.write(int(os.environ['RSS_FD']), str(resource.getrusage("
    "resource.RUSAGE_SELF).ru_maxrss).encode()))\n"
    "from ahvbackup.core.cli import main\n"
    "main()\n"
)


def run_cli_measured(args: list[str]) -> tuple[dict[str, object], int]:
    """Run `ahvbackup --json ...`; return its JSON answer and its peak RSS in KiB."""
    r, w = os.pipe()
    try:
        done = subprocess.run(
            [sys.executable, "-c", RSS_WRAPPER, "--json", *args], pass_fds=(w,),
            env={**os.environ, "RSS_FD": str(w)}, capture_output=True, text=True, check=False,
        )
        os.close(w)
        w = -1
        rss = int(os.read(r, 64) or 0)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    if done.returncode != 0:
        raise RuntimeError(f"ahvbackup {args[0]} failed: {done.stderr.strip()}")
    return json.loads(done.stdout), rss
