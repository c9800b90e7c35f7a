"""Property: whatever the workload does between backups (writes, zeroing, trims at any offset,
disks growing, disks added), every backup point of a long chain restores byte-identical to the
disk as it was when that backup was taken, and so does a consolidation of the chain."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import uuid
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.e2e.e2e_world import MiB, World

from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.consolidate import ConsolidateJob
from ahvbackup.core.jobs.restore import RestoreJob, pick_backup
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.hypervisors.ahv.simulator import Simulator, serve_simulator
from ahvbackup.hypervisors.ahv.simulator.model import Disk

KiB = 1024

op = st.tuples(
    st.sampled_from(["write", "write", "write", "zero", "trim", "resize", "add"]),
    st.floats(0, 1),                  # where (fraction of the disk)
    st.integers(1, 320 * KiB),        # how much
    st.integers(0, 7),                # which disk (modulo the count)
)
step = st.tuples(st.lists(op, min_size=0, max_size=5),
                 st.sampled_from(["incremental"] * 6 + ["differential"]))


def _digests(world: World, vm_uuid: str) -> dict[str, str]:
    out = {}
    for d in world.sim.vms[vm_uuid].data_disks:
        i = world.sim.vms[vm_uuid].data_disks.index(d)
        out[f"scsi.{d.device_index}"] = hashlib.sha256(
            world.sim.read_disk(vm_uuid, i, 0, d.size)).hexdigest()
    return out


def _apply(world: World, vm_uuid: str, ops: list[tuple[str, float, int, int]],
           rng: random.Random) -> None:
    for kind, where, amount, which in ops:
        vm = world.sim.vms[vm_uuid]
        disks = vm.data_disks
        i = which % len(disks)
        size = disks[i].size
        if kind == "resize":
            grown = [dataclasses.replace(d) for d in vm.disks]
            grown[i].size = size + (amount // 4096 + 1) * 4096
            world.sim.update_vm(dataclasses.replace(vm, disks=grown), spec_version=None)
        elif kind == "add" and len(disks) < 4:
            new = Disk(uuid=str(uuid.UUID(int=rng.getrandbits(128))), device_type="DISK",
                       adapter_type="SCSI", device_index=max(d.device_index for d in disks) + 1,
                       size=(1 + amount % 3) * MiB, container_uuid=disks[0].container_uuid)
            world.sim.update_vm(dataclasses.replace(vm, disks=[*vm.disks, new]),
                                spec_version=None)
            world.sim.write_disk(vm_uuid, len(disks), 0, rng.randbytes(min(amount, MiB)))
        elif kind in ("write", "zero", "trim"):
            off = int(where * (size - 1))
            n = min(amount, size - off)
            if kind == "write":
                world.sim.write_disk(vm_uuid, i, off, rng.randbytes(n))
            elif kind == "zero":
                world.sim.zero_disk(vm_uuid, i, off, n)
            else:
                world.sim.trim_disk(vm_uuid, i, off, n)


@settings(max_examples=2, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(steps=st.lists(step, min_size=20, max_size=22), seed=st.integers(0, 2**32))
def test_every_point_of_a_long_chain_restores(
    tmp_path_factory: pytest.TempPathFactory, steps: list, seed: int
) -> None:
    # each example runs its own trio loop and served simulator (a fixture's server would live
    # in another loop)
    tmp = tmp_path_factory.mktemp("prop")

    async def main() -> None:
        sim = Simulator(tmp / "sim", seed=True, task_seconds=0.01, sync=False)
        try:
            async with serve_simulator(sim, port=0, tls=True) as ep:
                assert ep.ca_path is not None
                world = World(sim=sim, pc=ep.pc_url.split("://", 1)[1], ca=ep.ca_path, tmp=tmp)
                await _chain_restores(world, steps, seed)
        finally:
            sim.close()

    trio.run(main)


async def _chain_restores(world: World, steps: list, seed: int) -> None:
    rng = random.Random(seed)
    name = "prop"
    vm = world.add_vm(name, [(2 * MiB, [(0, 256 * KiB)]), (3 * MiB + 4096, [(MiB, MiB)])])
    points: list[tuple[str, dict[str, str]]] = []

    async def backup(level: str) -> None:
        rt = Runtime.from_config(world.config(vm=name, level=level, chunk_size_mib=1))
        result = await BackupJob(rt).run()
        assert result.ok, result.failed
        points.append((result.vms[0].backup_id or "", _digests(world, vm.uuid)))

    await backup("full")
    for n, (ops, level) in enumerate(steps):
        forced = {7: [("resize", 0.0, 100_000, 0)], 13: [("add", 0.0, 200_000, 0)]}.get(n, [])
        _apply(world, vm.uuid, [*ops, *forced], rng)  # every example resizes and adds a disk
        await backup(level)
    assert len(world.sim.vms[vm.uuid].data_disks) >= 3

    rt = Runtime.from_config(world.config(vm=name))
    for n, (bid, want) in enumerate(points):
        backup_ = await pick_backup(rt, vm=None, backup_id=bid)
        out = await RestoreJob(rt, backup_, dest=world.tmp / "restore" / str(n)).run()
        assert out.ok, [d.error for d in out.disks]
        got = {d.label: hashlib.sha256(Path(d.path).read_bytes()).hexdigest() for d in out.disks}
        assert got == want, f"backup point {n} ({bid})"

    tip = await pick_backup(rt, vm=name, backup_id=None)
    assert (await ConsolidateJob(rt, tip).run()).ok
    out = await RestoreJob(rt, await pick_backup(rt, vm=name, backup_id=None),
                           dest=world.tmp / "restore" / "consolidated").run()
    assert out.ok and all(len(d.chain) == 1 for d in out.disks)
    got = {d.label: hashlib.sha256(Path(d.path).read_bytes()).hexdigest() for d in out.disks}
    assert got == points[-1][1]
