"""Full backup end to end against the served simulator: what an operator sees."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.e2e.e2e_world import MiB, World, same_as_sim

from ahvbackup.core.errors import ConfigError
from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.restore import RestoreJob, VerifyJob, pick_backup
from ahvbackup.core.jobs.runtime import Runtime


async def test_multi_disk_vm_with_holes_restores_byte_identical(world: World) -> None:
    vm = world.add_vm("multi", [
        (64 * MiB, [(0, 3 * MiB), (40 * MiB + 4096, 5 * MiB)]),   # data, hole, data
        (32 * MiB, []),                                            # entirely sparse
        (16 * MiB + 512, [(16 * MiB - 1000, 1000)]),               # odd size, data at the end
    ])
    rt = Runtime.from_config(world.config(vm="multi", chunk_size_mib=2))
    result = await BackupJob(rt).run()
    assert result.ok, result.failed
    (vr,) = result.vms
    assert [d.label for d in vr.disks] == ["scsi.0", "scsi.1", "scsi.2"]
    # only allocated data was read: the holes were never transferred
    assert vr.bytes_read < 12 * MiB

    backup = await pick_backup(rt, vm="multi", backup_id=None)
    out = await RestoreJob(rt, backup, dest=world.tmp / "restore").run()
    assert out.ok
    for i, disk in enumerate(out.disks):
        assert same_as_sim(world.sim, vm.uuid, i, Path(disk.path)), disk.label
    # restored disks are sparse too: the empty one allocates nothing
    assert Path(out.disks[1].path).stat().st_blocks == 0
    # and nothing but the snapshot kept as the next incremental's reference was left on the cluster
    assert set(world.sim.snapshots) == rt.states.all()[0].snapshot_ids()
    assert world.sim.images == {}


async def test_selected_disks_only(world: World) -> None:
    world.add_vm("two", [(8 * MiB, [(0, MiB)]), (8 * MiB, [(MiB, MiB)])])
    rt = Runtime.from_config(world.config(vm="two"))
    assert (await BackupJob(rt).run()).ok
    backup = await pick_backup(rt, vm="two", backup_id=None)
    out = await RestoreJob(rt, backup, dest=world.tmp / "r", disks=["scsi.1"]).run()
    assert [d.label for d in out.disks] == ["scsi.1"]
    assert not (world.tmp / "r" / "two" / "scsi.0.raw").exists()
    with pytest.raises(ConfigError, match=r"has no disk scsi\.7 \(it has scsi\.0 \(disk-0\), "
                                          r"scsi\.1 \(disk-1\)\)"):
        RestoreJob(rt, backup, dest=world.tmp / "r", disks=["scsi.7"])
    # the whitepaper's names: disk-1 is the second data disk, in backup order
    again = await RestoreJob(rt, backup, dest=world.tmp / "w", disks=["disk-1"]).run()
    assert [d.label for d in again.disks] == ["scsi.1"]
    assert (world.tmp / "w" / "two" / "scsi.1.raw").read_bytes() == \
        (world.tmp / "r" / "two" / "scsi.1.raw").read_bytes()
    assert not (world.tmp / "w" / "two" / "scsi.0.raw").exists()


async def test_concurrency_limits_are_honoured(world: World) -> None:
    for n in range(4):
        world.add_vm(f"c{n}", [(16 * MiB, [(0, 8 * MiB)]), (16 * MiB, [(0, 8 * MiB)])])
    world.sim.faults.add(method="GET", path=r"/images/.*/file", latency=0.05, count=10_000)
    world.sim.task_seconds = 0.4  # snapshots long enough that two VMs' creations must overlap
    world.sim.stats.reset()
    rt = Runtime.from_config(world.config(vm="c*", concurrent_vms=1, concurrent_disks=1,
                                          chunk_size_mib=1))
    assert (await BackupJob(rt).run()).ok
    stats = world.sim.stats
    assert stats.peak_concurrent_snapshot_creations == 1
    # one disk at a time: its read-ahead window is the only source of parallel reads
    one_disk_peak = stats.peak_concurrent_image_reads
    assert 1 < one_disk_peak <= 8

    stats.reset()
    rt = Runtime.from_config(world.config(vm="c*", concurrent_vms=2, concurrent_disks=2,
                                          chunk_size_mib=1))
    assert (await BackupJob(rt).run()).ok
    assert stats.peak_concurrent_snapshot_creations == 2
    assert one_disk_peak < stats.peak_concurrent_image_reads <= 4 * 8


async def test_app_consistent_true_fails_only_the_vm_without_ngt(world: World) -> None:
    world.add_vm("with-ngt", [(4 * MiB, [(0, MiB)])], ngt=True)
    world.add_vm("no-ngt", [(4 * MiB, [(0, MiB)])])
    rt = Runtime.from_config(world.config(vm="with-ngt,no-ngt", application_consistent="true"))
    result = await BackupJob(rt).run()
    by_name = {v.vm_name: v for v in result.vms}
    assert by_name["with-ngt"].ok and by_name["with-ngt"].consistency == "application"
    assert not by_name["no-ngt"].ok
    assert "application_consistent=true" in (by_name["no-ngt"].error or "")
    assert result.failed == ["no-ngt"]
    assert [b.vm_name for b in await rt.sink.backups()] == ["with-ngt"]


async def test_app_consistent_try_falls_back_with_a_warning(world: World) -> None:
    world.add_vm("plain", [(4 * MiB, [(0, MiB)])])
    rt = Runtime.from_config(world.config(vm="plain", application_consistent="try"))
    result = await BackupJob(rt).run()
    assert result.ok
    assert result.vms[0].consistency == "crash"
    assert any("crash-consistent" in w for w in result.vms[0].warnings)


async def test_app_consistent_try_retries_crash_consistent_when_quiescing_fails(
    world: World,
) -> None:
    world.add_vm("vss", [(4 * MiB, [(0, MiB)])], ngt=True)
    # VSS fails inside the guest: the snapshot task ends in ERROR
    world.sim.faults.add(method="POST", path=r"/vm_snapshots$", task_fail=True, count=1)
    rt = Runtime.from_config(world.config(vm="vss", application_consistent="try"))
    result = await BackupJob(rt).run()
    assert result.ok
    assert result.vms[0].consistency == "crash"
    assert any("application-consistent snapshot failed" in w for w in result.vms[0].warnings)
    assert set(world.sim.snapshots) == rt.states.all()[0].snapshot_ids()  # the reference only


async def test_a_failing_disk_fails_its_vm_and_the_others_go_on(world: World) -> None:
    world.add_vm("bad", [(8 * MiB, [(0, 4 * MiB)]), (8 * MiB, [(0, 4 * MiB)])])
    world.add_vm("good", [(8 * MiB, [(0, 4 * MiB)])])
    # one VM and one disk at a time, so the first image Prism makes is bad's scsi.0
    world.sim.faults.add(method="POST", path=r"/images$", task_fail=True, count=1)
    rt = Runtime.from_config(world.config(vm="bad,good", concurrent_vms=1, concurrent_disks=1))
    result = await BackupJob(rt).run()
    by_name = {v.vm_name: v for v in result.vms}
    bad, good = by_name["bad"], by_name["good"]
    assert good.ok and not bad.ok
    assert result.failed == ["bad/scsi.0"]
    disks = {d.label: d for d in bad.disks}
    assert not disks["scsi.0"].ok and "FAILED" in (disks["scsi.0"].error or "")
    assert disks["scsi.1"].ok  # the other disk of the failed VM was still read
    assert "scsi.0" in (bad.error or "")
    # a VM with a failed disk has no backup that looks complete, and nothing is left behind
    assert [b.vm_name for b in await rt.sink.backups()] == ["good"]
    (good_state,) = rt.states.all()  # only good's snapshot stays, as its next reference
    assert set(world.sim.snapshots) == good_state.snapshot_ids() and world.sim.images == {}


async def test_verify_names_a_damaged_stream_and_restore_refuses_it(world: World) -> None:
    world.add_vm("v", [(8 * MiB, [(0, 3 * MiB)])])
    rt = Runtime.from_config(world.config(vm="v"))
    assert (await BackupJob(rt).run()).ok
    backup = await pick_backup(rt, vm="v", backup_id=None)
    assert (await VerifyJob(rt, backup).run()).ok
    stream = Path(rt.config.repository) / backup.vm_uuid / backup.backup_id / "scsi.0.ahvd"
    raw = bytearray(stream.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    stream.write_bytes(raw)
    checked = await VerifyJob(rt, backup).run()
    assert not checked.ok
    assert "checksum mismatch" in (checked.disks[0].error or "")
    restored = await RestoreJob(rt, backup, dest=world.tmp / "r").run()
    assert not restored.ok
    # the half-written disk is not left looking like a restore
    assert not (world.tmp / "r" / "v" / "scsi.0.raw").exists()


async def test_estimate_reports_sizes_without_reading_or_storing(world: World) -> None:
    world.add_vm("e", [(64 * MiB, [(0, 5 * MiB)]), (32 * MiB, [(MiB, 2 * MiB)])])
    world.sim.stats.reset()
    rt = Runtime.from_config(world.config(vm="e", mode="estimate"))
    result = await BackupJob(rt).run()
    assert result.ok
    disks = {d.label: d for d in result.vms[0].disks}
    assert disks["scsi.0"].estimated_bytes == 5 * MiB
    assert disks["scsi.1"].estimated_bytes == 2 * MiB
    assert disks["scsi.0"].size == 64 * MiB
    assert all(d.bytes_read == 0 and d.bytes_stored == 0 for d in disks.values())
    assert not any("/images" in route for route in world.sim.stats.by_route())
    assert await rt.sink.backups() == []
    assert world.sim.snapshots == {}
