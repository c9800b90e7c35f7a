"""End-to-end helpers: the simulated world a test runs jobs in, and byte comparisons."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ahvbackup.core.config import Config, ConfigSources, ModeView, assemble_config
from ahvbackup.core.plugins import Hooks
from ahvbackup.hypervisors.ahv.simulator import Simulator, serve_simulator
from ahvbackup.hypervisors.ahv.simulator.model import Disk, Vm

MiB = 1 << 20


@dataclass
class World:
    sim: Simulator
    pc: str  # host:port of Prism Central
    ca: Path
    tmp: Path
    #: the Prism API jobs speak (the tests written before v4 check v3 snapshots; v4 and auto
    #: have tests/e2e/test_prism_v4.py)
    api: str = "v3"

    def overrides(self, **extra: Any) -> dict[str, str]:
        base = {
            "prism_central": self.pc, "prism_api_version": self.api, "user": "backup",
            "password": "backup/4u",
            "prism_ca_cert": str(self.ca), "state_dir": str(self.tmp / "state"),
            "repository": str(self.tmp / "repo"), "debug_log": "", "verbose": "1",
            "prism_rate_rpm": "100000", "working_dir": str(self.tmp),
        }
        base.update({k: str(v) for k, v in extra.items()})
        return base

    def config(self, **extra: Any) -> Config:
        """The configuration a job of this world runs with, assembled as every caller's is
        (plugin keys such as iscsi_port included; keys not done yet refused)."""
        return assemble_config(ConfigSources(overrides=self.overrides(**extra)), hooks=Hooks(),
                               view=ModeView("a test job"))

    def cli_args(self, **extra: Any) -> list[str]:
        return [a for k, v in self.overrides(**extra).items() for a in ("-o", f"{k}={v}")]

    def add_vm(self, name: str, disks: list[tuple[int, list[tuple[int, int]]]],
               *, ngt: bool = False) -> Vm:
        """A VM with disks of the given sizes and (offset, length) extents of random data."""
        cluster = next(iter(self.sim.clusters.values()))
        vm = Vm(
            uuid=str(uuid.uuid4()), name=name, cluster_uuid=cluster.uuid,
            ngt_installed=ngt, ngt_enabled=ngt, ngt_capabilities=["VSS_SNAPSHOT"] if ngt else [],
            disks=[Disk(uuid=str(uuid.uuid4()), device_type="DISK", adapter_type="SCSI",
                        device_index=i, size=size, container_uuid=cluster.containers[0].uuid)
                   for i, (size, _) in enumerate(disks)],
        )
        self.sim.create_vm(vm)
        for i, (_, extents) in enumerate(disks):
            for off, length in extents:
                for pos in range(off, off + length, 8 * MiB):
                    n = min(8 * MiB, off + length - pos)
                    self.sim.write_disk(vm.uuid, i, pos, os.urandom(n))
        return vm



def same_as_sim(sim: Simulator, vm_uuid: str, index: int, path: Path) -> bool:
    """Byte-compare a restored raw file with a simulator VM disk, 4 MiB at a time."""
    size = sim.vms[vm_uuid].data_disks[index].size
    if path.stat().st_size != size:
        return False
    with path.open("rb") as f:
        for off in range(0, size, 4 * MiB):
            n = min(4 * MiB, size - off)
            if f.read(n) != sim.read_disk(vm_uuid, index, off, n):
                return False
    return True


@dataclass
class IWorld(World):
    """A world whose jobs know the port the simulator serves iSCSI on (a free one, so test
    runs side by side do not collide on 3260)."""

    iscsi_port: int = 3260

    def overrides(self, **extra: Any) -> dict[str, str]:
        return super().overrides(iscsi_port=self.iscsi_port, **extra)


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def iscsi_world(tmp_path: Path, *, iscsi: bool) -> AsyncIterator[IWorld]:
    sim = Simulator(tmp_path / "sim", seed=True, task_seconds=0.05, sync=False)
    try:
        async with serve_simulator(sim, port=0, tls=True, iscsi_port=0, iscsi=iscsi) as ep:
            assert ep.ca_path is not None
            if iscsi:
                ((_host, port),) = set(ep.iscsi_portals.values())
                assert {h for h, _ in ep.iscsi_portals.values()} == {
                    c.dsip for c in sim.clusters.values()}
            else:
                assert ep.iscsi_portals == {}
                port = _unused_port()
            yield IWorld(sim=sim, pc=ep.pc_url.split("://", 1)[1], ca=ep.ca_path,
                         tmp=tmp_path, iscsi_port=port)
    finally:
        sim.close()
