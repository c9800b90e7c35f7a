"""The Prism requests one backup of a 3-disk VM makes, exactly, from the simulator's counters.

At the default `prism_rate_rpm=30` every request costs two seconds of a job's window, so a
call that comes back (a volume group per disk again, a task polled before it can be done, a
GET of what an answer already said) is a regression a user pays for. Each job here backs up
one VM: two of the requests (`clusters/list`, `vms/list`) are the job's, the rest the VM's.
The simulator's tasks take 0.05 s, less than the first poll waits, so each task is polled once.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import trio
import trio.testing
from tests.e2e.e2e_world import IWorld, MiB

from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.hypervisors.ahv.client.pacing import TaskPacer

PC, PE = "pc ", "pe1 "
V3, V2 = "/api/nutanix/v3", "/api/nutanix/v2.0"
JOB = {f"{PC}POST {V3}/clusters/list": 1, f"{PC}POST {V3}/vms/list": 1}
#: the snapshot (create, one look at it) and a changed-regions map per disk
SNAPSHOT = {f"{PE}POST {V3}/vm_snapshots": 1, f"{PE}GET {V3}/vm_snapshots/{{uuid}}": 1,
            f"{PE}POST {V3}/data/changed_regions": 3}
#: one volume group for the VM's three disks: create, its task, the VG (for its target),
#: attach; at release detach, delete and its task
ISCSI = {f"{PE}POST {V2}/volume_groups": 1, f"{PE}GET {V2}/volume_groups/{{uuid}}": 1,
         f"{PE}POST {V2}/volume_groups/{{uuid}}/open": 1,
         f"{PE}POST {V2}/volume_groups/{{uuid}}/close": 1,
         f"{PE}DELETE {V2}/volume_groups/{{uuid}}": 1, f"{PE}GET {V3}/tasks/{{uuid}}": 2}
#: an image per disk (create, its task; delete, its task); its bytes are ranged GETs
REST = {f"{PC}POST {V3}/images": 3, f"{PC}GET {V3}/tasks/{{uuid}}": 6,
        f"{PC}DELETE {V3}/images/{{uuid}}": 3}
IMAGE_READ = f"{PC}GET {V3}/images/{{uuid}}/file"


async def _requests(world: IWorld, *, data_path: str, level: str) -> Counter[str]:
    vm = world.add_vm("calls", [(4 * MiB, [(0, MiB)]), (4 * MiB, [(MiB, MiB)]),
                                (4 * MiB, [(0, MiB // 2)])])
    cfg = dict(vm="calls", data_path=data_path, iscsi_initiator="iqn.2024-01.test:calls")
    if level == "incremental":
        assert (await BackupJob(Runtime.from_config(world.config(**cfg))).run()).ok
        world.sim.write_disk(vm.uuid, 1, 0, os.urandom(64 << 10))
    world.sim.stats.requests.clear()
    result = await BackupJob(Runtime.from_config(world.config(level=level, **cfg))).run()
    assert result.ok, result.failed
    return Counter(world.sim.stats.requests)


@pytest.mark.parametrize("level", ["full", "incremental"])
async def test_a_3_disk_vm_over_iscsi_makes_12_prism_requests(iworld: IWorld,
                                                               level: str) -> None:
    made = await _requests(iworld, data_path="iscsi", level=level)
    assert made == Counter({**JOB, **SNAPSHOT, **ISCSI})
    assert sum(made.values()) - sum(JOB.values()) == 12


@pytest.mark.parametrize(("level", "image_reads"), [("full", 3), ("incremental", 1)])
async def test_a_3_disk_vm_over_rest_makes_an_image_per_disk_and_nothing_more(
        iworld: IWorld, level: str, image_reads: int) -> None:
    made = await _requests(iworld, data_path="rest", level=level)
    assert made == Counter({**JOB, **SNAPSHOT, **REST, IMAGE_READ: image_reads})


async def test_a_task_is_polled_once_when_it_takes_as_long_as_the_last_of_its_kind(
        autojump_clock: trio.testing.MockClock) -> None:
    """Prism's slow tasks (seconds, not the simulator's 0.05): the first of a kind is polled
    until done, backing off; the next one as slow is looked at once, when it is done."""
    pacer = TaskPacer()

    async def polls(seconds: float) -> int:
        done_at, looks = trio.current_time() + seconds, []
        await pacer.until(lambda: _now(), lambda t: t >= done_at, expect="vg create",
                          poll=0.1, poll_cap=5.0, seen=looks)
        return len(looks)

    first = await polls(3.0)
    assert 3 < first < 12  # backing off from 0.1 s, not polling every 0.1 s (30)
    assert await polls(3.0) == 1
    assert await polls(2.0) == 1  # a quicker one costs one look too (a little late)


async def _now() -> float:
    return trio.current_time()
