"""Prism requests per VM and per disk, from the simulator's own counters, and the wall time of
a backup at the default `prism_rate_rpm` (30 a minute), printed as JSON.

    .venv/bin/python bench/prism_calls.py [--no-wall] [--rate-rpm 30]

For each API (v3, v4), data path (iscsi, rest) and level (full, incremental), jobs run against
a served simulator (its iSCSI target on the DSIP) with 1 VM of 1 disk, 1 VM of 3 disks and
2 VMs of 3 disks, so the counts split into what a job costs once (`per_job`: discovery, the
VM list), what each VM costs (`per_vm`, 3 disks) and what each disk adds (`per_extra_disk`).
An incremental is counted after a full, with one disk changed. REST's ranged GETs of image
bytes are data, not Prism calls: they are counted apart (`data_requests`).
`endpoints` lists every request of the 1-VM, 3-disk job by endpoint.

The wall-time part backs up one 3-disk VM over iscsi and over rest at `--rate-rpm`, the
simulator's tasks taking 0.3 s (its default), and reports seconds and requests; the peer is
the same job at an unlimited rate (`unlimited_seconds`), so the difference is the rate cap's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ahvbackup.core.config import ConfigSources, ModeView, assemble_config
from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.core.plugins import Hooks
from ahvbackup.hypervisors.ahv.simulator import Simulator, serve_simulator
from ahvbackup.hypervisors.ahv.simulator.model import Disk, Vm

MiB = 1 << 20
INITIATOR = "iqn.2024-01.bench.ahvbackup:prism-calls"
#: a request that moves disk bytes (REST image reads), not a Prism control call
DATA_SUFFIX = "/file"


@dataclass
class World:
    sim: Simulator
    pc: str
    ca: Path
    tmp: Path
    iscsi_port: int

    def config(self, **extra: Any) -> Any:
        base = {
            "prism_central": self.pc, "prism_ca_cert": str(self.ca), "user": "backup",
            "password": "backup/4u", "state_dir": str(self.tmp / "state"),
            "repository": str(self.tmp / "repo"), "debug_log": "", "working_dir": str(self.tmp),
            "iscsi_port": str(self.iscsi_port), "iscsi_initiator": INITIATOR,
            "prism_rate_rpm": "0",
        }
        base.update({k: str(v) for k, v in extra.items()})
        return assemble_config(ConfigSources(overrides=base), hooks=Hooks(),
                               view=ModeView("a benchmark job"))


@asynccontextmanager
async def served(tmp: Path, *, task_seconds: float) -> AsyncIterator[World]:
    """A simulator (seeded clusters, no VMs of interest yet) served with iSCSI on its DSIPs."""
    sim = Simulator(tmp / "sim", seed=True, task_seconds=task_seconds, sync=False)
    try:
        async with serve_simulator(sim, port=0, tls=True, iscsi_port=0) as ep:
            assert ep.ca_path is not None
            ((_host, port),) = set(ep.iscsi_portals.values())
            yield World(sim=sim, pc=ep.pc_url.split("://", 1)[1], ca=ep.ca_path, tmp=tmp,
                        iscsi_port=port)
    finally:
        sim.close()


def add_vm(sim: Simulator, name: str, sizes: list[int], *, written: int = MiB) -> Vm:
    """A VM with a disk of each size, `written` bytes of random data at the start of each."""
    cluster = next(iter(sim.clusters.values()))
    vm = Vm(uuid=str(uuid.uuid4()), name=name, cluster_uuid=cluster.uuid,
            disks=[Disk(uuid=str(uuid.uuid4()), device_type="DISK", adapter_type="SCSI",
                        device_index=i, size=size, container_uuid=cluster.containers[0].uuid)
                   for i, size in enumerate(sizes)])
    sim.create_vm(vm)
    for i, size in enumerate(sizes):
        sim.write_disk(vm.uuid, i, 0, os.urandom(min(written, size)))
    return vm


async def backup(world: World, **extra: Any) -> None:
    result = await BackupJob(Runtime.from_config(world.config(**extra))).run()
    if not result.ok:
        raise SystemExit(f"bench job failed: {result.failed} {[v.error for v in result.vms]}")


def split(requests: Counter[str]) -> tuple[Counter[str], int]:
    """(Prism calls by endpoint, data requests)."""
    calls = Counter({k: v for k, v in requests.items() if not k.endswith(DATA_SUFFIX)})
    return calls, sum(v for k, v in requests.items() if k.endswith(DATA_SUFFIX))


async def count(*, api: str, path: str, level: str, vms: int, disks: int,
                task_seconds: float = 0.05, **extra: Any) -> tuple[Counter[str], int, float]:
    """Requests of one job (after a full first, for an incremental), and its seconds."""
    with tempfile.TemporaryDirectory(prefix="prism-calls-") as tmp:
        async with served(Path(tmp), task_seconds=task_seconds) as world:
            made = [add_vm(world.sim, f"pc-{i}", [4 * MiB] * disks) for i in range(vms)]
            # v4 REST reads through a VM cloned from the recovery point: a user that may
            # create VMs (docs/restore-ahv.md); everything else is the backup user
            who = {"user": "admin", "password": "nutanix/4u"} if (api, path) == (
                "v4", "rest") else {}
            cfg = dict(vm=",".join(v.name for v in made), data_path=path,
                       prism_api_version=api, **who)
            if level == "incremental":
                await backup(world, **cfg)
                for v in made:
                    world.sim.write_disk(v.uuid, 0, 0, os.urandom(64 << 10))
            world.sim.stats.requests.clear()
            t0 = time.monotonic()
            await backup(world, **cfg, level=level, **extra)
            seconds = time.monotonic() - t0
            calls, data = split(Counter(world.sim.stats.requests))
            return calls, data, seconds


async def matrix() -> list[dict[str, Any]]:
    out = []
    for api in ("v3", "v4"):
        for path in ("iscsi", "rest"):
            for level in ("full", "incremental"):
                one_disk, _, _ = await count(api=api, path=path, level=level, vms=1, disks=1)
                three, data, _ = await count(api=api, path=path, level=level, vms=1, disks=3)
                two_vms, _, _ = await count(api=api, path=path, level=level, vms=2, disks=3)
                total, per_vm = sum(three.values()), sum(two_vms.values()) - sum(
                    three.values())
                out.append({
                    "api": api, "data_path": path, "level": level,
                    "requests_1vm_3disks": total, "per_job": total - per_vm, "per_vm": per_vm,
                    "per_extra_disk": (total - sum(one_disk.values())) / 2,
                    "task_polls_per_vm": sum(v for k, v in two_vms.items() if "/tasks/" in k)
                    - sum(v for k, v in three.items() if "/tasks/" in k),
                    "data_requests": data, "endpoints": dict(sorted(three.items())),
                })
    return out


async def wall(rate_rpm: int) -> list[dict[str, Any]]:
    out = []
    for path, level in (("iscsi", "full"), ("iscsi", "incremental"), ("rest", "full")):
        calls, data, seconds = await count(api="v3", path=path, level=level, vms=1, disks=3,
                                           task_seconds=0.3, prism_rate_rpm=rate_rpm)
        _, _, free = await count(api="v3", path=path, level=level, vms=1, disks=3,
                                 task_seconds=0.3)
        out.append({"api": "v3", "data_path": path, "level": level, "prism_rate_rpm": rate_rpm,
                    "seconds": round(seconds, 2), "unlimited_seconds": round(free, 2),
                    "requests": sum(calls.values()), "data_requests": data})
    return out


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.ERROR)
    result: dict[str, Any] = {"counts": await matrix()}
    if not args.no_wall:
        result["wall"] = await wall(args.rate_rpm)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-wall", action="store_true", help="counts only (fast)")
    parser.add_argument("--rate-rpm", type=int, default=30)
    trio.run(main, parser.parse_args())
