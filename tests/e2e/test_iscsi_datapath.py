"""The `iscsi` data path end to end: jobs against the served simulator's volume groups and its
iSCSI target on the cluster's DSIP, a free port (3260 on a real cluster)."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from tests.e2e.e2e_world import IWorld, MiB, World, same_as_sim

from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.restore import RestoreJob, pick_backup
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.hypervisors.ahv.simulator import Simulator, serve_simulator
from ahvbackup.hypervisors.ahv.simulator.volume_groups import VolumeGroups, volume_groups

CLI = [sys.executable, "-m", "ahvbackup.core.cli"]
AUTO_LOG = "ahvbackup.datapath.auto"


def _nothing_left(world: World, rt: Runtime) -> None:
    vgs = volume_groups(world.sim)
    assert vgs.groups == {}
    assert set(world.sim.snapshots) == rt.states.all()[0].snapshot_ids()
    assert world.sim.images == {}
    assert not list((world.tmp / "state" / "ledger").glob("*.json"))


async def test_full_backup_over_iscsi_restores_byte_identical(iworld: IWorld) -> None:
    vm = iworld.add_vm("iscsi-vm", [
        (48 * MiB, [(0, 5 * MiB), (30 * MiB + 4096, 3 * MiB)]),
        (16 * MiB + 512, [(16 * MiB - 1000, 1000)]),  # odd size: the last read is unaligned
    ])
    vgs = volume_groups(iworld.sim)
    rt = Runtime.from_config(iworld.config(vm="iscsi-vm", data_path="iscsi", chunk_size_mib=2,
                                           iscsi_initiator="iqn.2024-01.test:backup-host"))
    result = await BackupJob(rt).run()
    assert result.ok, result.failed
    assert vgs.bytes_read >= 8 * MiB  # the bytes came over iSCSI ...
    assert iworld.sim.stats.peak_concurrent_image_reads == 0  # ... and not over REST
    backup = await pick_backup(rt, vm="iscsi-vm", backup_id=None)
    out = await RestoreJob(rt, backup, dest=iworld.tmp / "restore").run()
    assert out.ok
    for i, disk in enumerate(out.disks):
        assert same_as_sim(iworld.sim, vm.uuid, i, Path(disk.path)), disk.label
    _nothing_left(iworld, rt)


async def test_generated_initiator_name_is_stable(iworld: IWorld) -> None:
    iworld.add_vm("gen", [(4 * MiB, [(0, MiB)])])
    rt = Runtime.from_config(iworld.config(vm="gen", data_path="iscsi"))
    assert (await BackupJob(rt).run()).ok
    stored = iworld.tmp / "state" / "iscsi_initiator"
    if stored.exists():  # no /etc/iscsi/initiatorname.iscsi on this host
        first = stored.read_text()
        assert first.startswith("iqn.")
        assert (await BackupJob(rt).run()).ok
        assert stored.read_text() == first


async def test_auto_picks_iscsi_when_the_target_answers(
        iworld: IWorld, caplog: pytest.LogCaptureFixture) -> None:
    iworld.add_vm("auto", [(8 * MiB, [(0, 2 * MiB)])])
    caplog.set_level(logging.INFO, logger=AUTO_LOG)
    rt = Runtime.from_config(iworld.config(vm="auto", data_path="auto"))
    assert (await BackupJob(rt).run()).ok
    assert "data_path=auto: using iscsi" in caplog.text
    assert volume_groups(iworld.sim).bytes_read >= 2 * MiB


async def test_auto_picks_rest_when_no_target_answers(
        rest_only_world: IWorld, caplog: pytest.LogCaptureFixture) -> None:
    world = rest_only_world
    vm = world.add_vm("auto", [(8 * MiB, [(0, 2 * MiB)])])
    caplog.set_level(logging.INFO, logger=AUTO_LOG)
    rt = Runtime.from_config(world.config(vm="auto", data_path="auto"))
    assert (await BackupJob(rt).run()).ok
    assert "data_path=auto: using rest" in caplog.text
    assert volume_groups(world.sim).bytes_read == 0
    backup = await pick_backup(rt, vm="auto", backup_id=None)
    out = await RestoreJob(rt, backup, dest=world.tmp / "r").run()
    assert same_as_sim(world.sim, vm.uuid, 0, Path(out.disks[0].path))


async def test_auto_reads_a_disk_whose_target_is_not_offered_over_rest(
        iworld: IWorld, caplog: pytest.LogCaptureFixture) -> None:
    vm = iworld.add_vm("mixed", [(8 * MiB, [(0, 2 * MiB)]), (8 * MiB, [(MiB, 3 * MiB)])])
    vgs = volume_groups(iworld.sim)
    hidden = vm.data_disks[1]
    vgs.unoffered.add(hidden.uuid)  # the target of scsi.1's volume group does not list us
    caplog.set_level(logging.INFO, logger=AUTO_LOG)
    rt = Runtime.from_config(iworld.config(vm="mixed", data_path="auto"))
    result = await BackupJob(rt).run()
    assert result.ok, result.failed
    (warning,) = [r.getMessage() for r in caplog.records
                  if r.name == AUTO_LOG and r.levelno == logging.WARNING]
    assert f"reading disk scsi.1 (vmdisk {hidden.uuid}) over rest" in warning
    assert "does not offer" in warning
    assert 2 * MiB <= vgs.bytes_read < 5 * MiB  # scsi.0 came over iSCSI, scsi.1 did not ...
    assert iworld.sim.stats.peak_concurrent_image_reads >= 1  # ... it came over REST
    out = await RestoreJob(rt, await pick_backup(rt, vm="mixed", backup_id=None),
                           dest=iworld.tmp / "restore").run()
    for i, disk in enumerate(out.disks):
        assert same_as_sim(iworld.sim, vm.uuid, i, Path(disk.path)), disk.label
    _nothing_left(iworld, rt)


async def test_auto_is_not_fooled_by_another_iscsi_target_on_the_portal(
        iworld: IWorld, tmp_path: Path) -> None:
    """The newcomer's case: another simulator's iSCSI target answers where the job looks (the
    configured port on the DSIP). Every disk is read over REST, each with a warning."""
    vm = iworld.add_vm("fooled", [(8 * MiB, [(0, 2 * MiB)]), (4 * MiB, [(0, MiB)])])
    other = Simulator(tmp_path / "other", seed=False, task_seconds=0.05, sync=False)
    try:
        async with serve_simulator(other, port=0, tls=False, iscsi_port=0) as ep:
            ((_host, other_port),) = set(ep.iscsi_portals.values())
            fooled = replace(iworld, iscsi_port=other_port)
            done = await trio.run_process(
                [*CLI, "backup", *fooled.cli_args(vm="fooled", data_path="auto")],
                capture_stdout=True, capture_stderr=True, check=False)
            assert other.volume_groups.groups == {}  # nothing was staged over there
    finally:
        other.close()
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    fallbacks = sorted(line.split()[5] for line in stderr.splitlines()
                       if line.startswith("ahvbackup: warning: data_path=auto: reading disk")
                       and "does not offer" in line)
    assert fallbacks == ["scsi.0", "scsi.1"]
    assert volume_groups(iworld.sim).bytes_read == 0
    rt = Runtime.from_config(iworld.config(vm="fooled"))
    out = await RestoreJob(rt, await pick_backup(rt, vm="fooled", backup_id=None),
                           dest=iworld.tmp / "restore").run()
    for i, disk in enumerate(out.disks):
        assert same_as_sim(iworld.sim, vm.uuid, i, Path(disk.path)), disk.label
    _nothing_left(iworld, rt)


async def test_lun_smaller_than_the_api_said_is_a_clear_error(iworld: IWorld) -> None:
    iworld.add_vm("short", [(8 * MiB, [(0, MiB)])])
    vgs = volume_groups(iworld.sim)
    vgs.lun_shortfall = MiB
    rt = Runtime.from_config(iworld.config(vm="short", data_path="iscsi"))
    result = await BackupJob(rt).run()
    assert not result.ok
    message = " ".join(str(f) for f in result.failed) + " ".join(
        w for vr in result.vms for d in vr.disks for w in [d.error or ""])
    assert "holds 7340032 bytes, but the API said the disk has 8388608" in message
    assert vgs.groups == {}  # the VG and its attachment were released all the same
    assert not list((iworld.tmp / "state" / "ledger").glob("*.json"))


async def test_sigkill_during_an_iscsi_read_leaves_nothing_after_the_next_run(
        iworld: IWorld) -> None:
    iworld.add_vm("big", [(64 * MiB, [(0, 48 * MiB)])])
    vgs: VolumeGroups = volume_groups(iworld.sim)
    vgs.read_latency = 0.5
    proc = await trio.lowlevel.open_process(
        [*CLI, "backup", *iworld.cli_args(vm="big", chunk_size_mib=1, data_path="iscsi")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(60):
            while vgs.active_reads == 0:
                await trio.sleep(0.05)
    finally:
        proc.kill()
        await proc.wait()
    # the killed job left its snapshot, a VG and the VG's attachment behind
    assert len(iworld.sim.snapshots) == 1
    (vg,) = vgs.groups.values()
    assert len(vg.attachments) == 1
    vgs.read_latency = 0.0
    rt = Runtime.from_config(iworld.config(vm="big", data_path="iscsi"))
    result = await BackupJob(rt).run()  # job_cleanup_on_abort=yes sweeps first
    assert result.ok, result.failed
    _nothing_left(iworld, rt)
    assert len(iworld.sim.snapshots) == 1


async def test_cancelled_job_releases_attachment_vg_and_snapshot(iworld: IWorld) -> None:
    iworld.add_vm("cancel", [(32 * MiB, [(0, 24 * MiB)])])
    vgs = volume_groups(iworld.sim)
    vgs.read_latency = 0.3
    rt = Runtime.from_config(iworld.config(vm="cancel", data_path="iscsi", chunk_size_mib=1))
    seen: list[tuple[int, int]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(BackupJob(rt).run)
        with trio.fail_after(30):
            while vgs.active_reads == 0:
                await trio.sleep(0.02)
        seen.append((len(vgs.groups), len(next(iter(vgs.groups.values())).attachments)))
        nursery.cancel_scope.cancel()
    assert seen == [(1, 1)]  # it was cancelled mid-read, with a VG attached to us
    assert vgs.groups == {}
    assert iworld.sim.snapshots == {}
    assert not list((iworld.tmp / "state" / "ledger").glob("*.json"))


async def test_a_500_on_the_volume_group_delete_is_retried_and_the_job_ends_clean(
        iworld: IWorld) -> None:
    iworld.add_vm("vg-retry", [(4 * MiB, [(0, MiB)])])
    rule = iworld.sim.faults.add(method="DELETE", path=r"/volume_groups/", status=500, count=2)
    rt = Runtime.from_config(iworld.config(vm="vg-retry", data_path="iscsi"))
    result = await BackupJob(rt).run()
    assert result.ok, result.failed
    assert rule.hits == 2  # the cluster refused twice; the third delete worked
    assert not [w for v in result.vms for w in v.warnings if "left on the cluster" in w]
    _nothing_left(iworld, rt)
