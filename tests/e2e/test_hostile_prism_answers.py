"""A Prism whose answers parse but are wrong: a changed-regions map that goes backwards,
overlaps, has a negative extent or runs past the disk. A backup trusting it would store a disk
with bytes missing or misplaced, and say it succeeded. Each fails the disk with one line naming
the region, keeps no backup of the VM, and leaves nothing on the cluster."""

from __future__ import annotations

import pytest
from tests.e2e.e2e_world import MiB, World

from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.hypervisors.ahv.simulator.diskstore import ChangedRegions, Region

WRONG_MAPS = {
    "backwards": ([(2 * MiB, MiB), (0, MiB)], "region at 0 (+1048576) starts before"),
    "overlapping": ([(0, 2 * MiB), (MiB, 2 * MiB)], "region at 1048576 (+2097152) starts before"),
    "past-the-end": ([(0, MiB), (7 * MiB, 4 * MiB)], "ends past the disk's end (8388608)"),
    "negative-offset": ([(-4096, 8192)], "region at -4096 (+8192) has a negative"),
    "negative-length": ([(4096, -8192)], "region at 4096 (+-8192) has a negative"),
}


@pytest.mark.parametrize("case", sorted(WRONG_MAPS))
async def test_a_wrong_region_map_fails_the_disk_naming_the_region(
        world: World, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    world.add_vm("v", [(8 * MiB, [(0, 3 * MiB)])])
    regions, named = WRONG_MAPS[case]

    def lying_prism(snapshot_file_path: str, **_: object) -> ChangedRegions:
        return ChangedRegions([Region(o, n, "REGULAR") for o, n in regions], 8 * MiB, None)

    monkeypatch.setattr(world.sim, "changed_regions", lying_prism)
    rt = Runtime.from_config(world.config(vm="v", data_path="rest"))
    result = await BackupJob(rt).run()
    assert not result.ok and result.failed == ["v/scsi.0"]
    [vr] = result.vms
    [disk] = vr.disks
    assert "region map is wrong" in (disk.error or "") and named in (disk.error or ""), disk.error
    assert await rt.sink.backups() == []
    assert world.sim.snapshots == {} and world.sim.images == {}
