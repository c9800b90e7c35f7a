"""A seed and ten delta pushes of a simulated AHV VM, read the way a backup reads it (the
hypervisor session's snapshots and region maps, the configured data path), to a receiver on
loopback TCP: every restore point on the receiver is byte-identical to its source snapshot,
also after the cluster deleted the reference snapshot (those disks are sent in full)."""

from __future__ import annotations

import random
import time

from tests.core.dr.dr_world import MiB, image_of, serve_receiver, tcp
from tests.e2e.e2e_world import World

from ahvbackup.core import hookimpl
from ahvbackup.core.dr.push import PushPoint, PushSettings, open_disk_sources, push_point
from ahvbackup.core.dr.receiver import ReceiverSettings
from ahvbackup.core.jobs.runtime import Runtime, resolve_data_path
from ahvbackup.core.ledger import ReleaseStack
from ahvbackup.core.plugins import Hooks


class _Metrics:
    def __init__(self) -> None:
        self.seen: list[tuple[str, float, dict[str, str]]] = []

    @hookimpl
    def ahvbackup_metric(self, name: str, value: float, labels: dict[str, str]) -> None:
        self.seen.append((name, value, labels))


async def test_seed_and_ten_deltas_restore_byte_identical_at_every_point(world: World) -> None:
    sizes = [6 * MiB, 2 * MiB]
    vm_sim = world.add_vm("dr-01", [(sizes[0], [(0, 2 * MiB)]), (sizes[1], [(MiB, MiB)])])
    metrics = _Metrics()
    hooks = Hooks(autoload=False, plugins=(metrics,))
    rt = Runtime.from_config(world.config(vm="dr-01", chunk_size_mib=1))
    rng = random.Random(12)
    expected: dict[int, list[bytes]] = {}
    settings = ReceiverSettings(state_dir=world.tmp / "receiver", restore_points=11,
                                sync_bytes=MiB)
    async with serve_receiver(settings) as (receiver, port), \
            rt.hypervisor.connect() as session:
        (vm,) = [v for v in await session.list_vms() if v.name == "dr-01"]
        datapath = await resolve_data_path(rt.config, session)
        references: dict[str, str] = {}
        base_snapshot = ""
        async with ReleaseStack(rt.ledger, owner=rt.job_id, releaser=session.release) as stack:
            for n in range(1, 12):
                if n > 1:  # random writes and zeroings between points
                    for i, size in enumerate(sizes):
                        for _ in range(rng.randrange(1, 4)):
                            length = rng.randrange(4096, 512 << 10)
                            off = rng.randrange(0, size - length)
                            if rng.random() < 0.25:
                                world.sim.zero_disk(vm_sim.uuid, i, off, length)
                            else:
                                world.sim.write_disk(vm_sim.uuid, i, off, rng.randbytes(length))
                if n == 7:  # the cluster's retention deletes the reference behind our back
                    world.sim.delete_vm_snapshot(base_snapshot)
                snap = await session.snapshot_vm(vm, application_consistent=False,
                                                 name=f"dr-{n}", stack=stack)
                expected[n] = [world.sim.read_disk(vm_sim.uuid, i, 0, s)
                               for i, s in enumerate(sizes)]
                async with open_disk_sources(session, datapath, snap, references=references,
                                             stack=stack) as disks:
                    point = PushPoint(vm_uuid=vm.uuid, vm_name=vm.name, point=n,
                                      snapshot_id=snap.id, base=n - 1,
                                      base_snapshot_id=base_snapshot, taken=time.time(),
                                      disks=disks)
                    result = await push_point(point, connect=tcp(port),
                                              settings=PushSettings(), hooks=hooks)
                if n == 7:  # healed: each disk sent in full (its allocation map)
                    assert all(d.full for d in disks)
                    assert result.data_bytes > 2 * MiB, result
                elif n > 1:  # a delta sends what changed, not the disks
                    assert not any(d.full for d in disks)
                    assert result.data_bytes < 2 * MiB, result
                references = {d.disk.uuid: d.handle for d in snap.disks}
                base_snapshot = snap.id
        points = receiver.points(vm.uuid)
        assert [p.point for p in points] == list(range(1, 12))
        for n, images in expected.items():
            for disk, want in zip(vm.disks, images, strict=True):
                assert image_of(receiver, vm.uuid, n, disk.uuid) == want, (n, disk.label)
    pushed = [m for m in metrics.seen if m[0] == "dr_bytes_pushed"]
    assert len(pushed) == 11 and all(v > 0 and lab == {"vm": "dr-01"} for _, v, lab in pushed)
    assert {m[0] for m in metrics.seen} >= {"dr_bytes_pushed", "dr_reconnects", "dr_lag_seconds"}
