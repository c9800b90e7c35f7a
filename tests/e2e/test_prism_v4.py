"""Jobs through Prism v4 against the served simulator: recovery points, compute-changed-regions
and VGs from disk recovery points over iSCSI; `prism_api_version=auto` following what Prism
serves; a chain that spans a switch from v3 to v4; a restore to AHV through vmm and volumes;
nothing left on the simulator after each job."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from tests.e2e.e2e_world import IWorld, MiB, same_as_sim
from tests.e2e.test_restore_ahv import Dr, assert_disks, restored
from tests.e2e.test_restore_ahv import dr as dr_world  # noqa: F401 - a fixture

from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.restore import RestoreJob, pick_backup
from ahvbackup.core.jobs.results import VmResult
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.hypervisors.ahv.simulator.volume_groups import volume_groups

KiB = 1 << 10
IQN = "iqn.2024-01.test:v4-host"
LAYOUT = [(4 * MiB, [(0, 512 * KiB), (3 * MiB, 256 * KiB)]), (2 * MiB, [(MiB, 128 * KiB)])]


def nothing_left(w: IWorld, rt: Runtime) -> None:
    """No VG, image, v3 snapshot (but those the recovery points hold) or ledger record; the
    recovery points are the state's."""
    sim = w.sim
    assert sim.volume_groups.groups == {}
    assert sim.images == {}
    held = {v.snapshot_uuid for p in sim.recovery_points.points.values() for v in p.vms}
    assert set(sim.snapshots) == held
    points = {f"v4:{p}" for p in sim.recovery_points.points}
    (state,) = rt.states.all()
    assert points == state.snapshot_ids() and points  # the references (last and last full)
    assert not list((w.tmp / "state" / "ledger").glob("*.json"))


async def backup(w: IWorld, **keys: str) -> tuple[Runtime, VmResult]:
    keys = {"data_path": "iscsi", **keys}
    rt = Runtime.from_config(w.config(vm="v4-vm", iscsi_initiator=IQN, **keys))
    result = await BackupJob(rt).run()
    assert result.ok, result.to_json()
    return rt, result.vms[0]


async def restores_identical(w: IWorld, rt: Runtime, vm_uuid: str, dest: str) -> None:
    backup_ = await pick_backup(rt, vm="v4-vm", backup_id=None)
    out = await RestoreJob(rt, backup_, dest=w.tmp / dest).run()
    assert out.ok
    for i, disk in enumerate(out.disks):
        assert same_as_sim(w.sim, vm_uuid, i, Path(disk.path)), disk.label


async def test_a_v4_chain_reads_only_changes_and_restores(
        iworld: IWorld, caplog: pytest.LogCaptureFixture) -> None:
    iworld.api = "v4"
    iworld.sim.changed_regions_page_size = 1  # compute-changed-regions pages: one region each
    vm = iworld.add_vm("v4-vm", LAYOUT, ngt=True)
    caplog.set_level(logging.INFO, logger="ahvbackup")
    rt, done = await backup(iworld, level="full")
    assert "api=v4" in caplog.text
    assert done.consistency == "application"
    assert [p.recovery_point_type for p in iworld.sim.recovery_points.points.values()] == [
        "APPLICATION_CONSISTENT"]
    vgs = volume_groups(iworld.sim)
    assert vgs.bytes_read >= 896 * KiB  # the data came over iSCSI from VGs of disk RPs
    full_read = done.bytes_read
    assert full_read == 896 * KiB  # the allocation map: no zero region is read
    nothing_left(iworld, rt)

    iworld.sim.write_disk(vm.uuid, 0, 2 * MiB, os.urandom(64 * KiB))
    iworld.sim.write_disk(vm.uuid, 1, 0, os.urandom(4 * KiB))
    iworld.sim.write_disk(vm.uuid, 1, MiB + 64 * KiB, b"\0" * (64 * KiB))  # zeroed: not read
    rt, incr = await backup(iworld, level="incremental")
    assert [d.kind for d in incr.disks] == ["incremental", "incremental"]
    assert incr.bytes_read == 64 * KiB + 64 * KiB  # the changed blocks, nothing else
    nothing_left(iworld, rt)
    await restores_identical(iworld, rt, vm.uuid, "restore")


async def test_a_v4_chain_over_rest_restores(rest_only_world: IWorld) -> None:
    """REST on v4: each disk read from an image of a VM disk cloned from the disk recovery
    point (v4 has no byte read of its own); the VM and the image go after each disk. Making
    that VM needs a user that may create VMs (the simulator's Backup Admin may not)."""
    w = rest_only_world
    w.api = "v4"
    vm = w.add_vm("v4-vm", LAYOUT)
    seeded = set(w.sim.vms)
    admin = {"data_path": "rest", "user": "admin", "password": "nutanix/4u"}
    await backup(w, level="full", **admin)
    w.sim.write_disk(vm.uuid, 1, 0, os.urandom(64 * KiB))
    rt, incr = await backup(w, level="incremental", **admin)
    assert [d.kind for d in incr.disks] == ["incremental", "incremental"]
    assert incr.bytes_read == 64 * KiB
    assert w.sim.stats.peak_concurrent_image_reads >= 1 and volume_groups(w.sim).bytes_read == 0
    assert set(w.sim.vms) == seeded  # the clones are gone
    nothing_left(w, rt)
    await restores_identical(w, rt, vm.uuid, "restore")


async def test_auto_follows_prism_and_a_chain_spans_v3_to_v4(
        iworld: IWorld, caplog: pytest.LogCaptureFixture) -> None:
    iworld.api = "auto"
    vm = iworld.add_vm("v4-vm", LAYOUT)
    caplog.set_level(logging.INFO, logger="ahvbackup")
    iworld.sim.v4 = False  # a Prism that speaks only v3
    await backup(iworld, level="full")
    assert "api=v3" in caplog.text and "serves no v4 API" in caplog.text
    v3_snap = set(iworld.sim.snapshots)
    assert len(v3_snap) == 1 and not iworld.sim.recovery_points.points

    caplog.clear()
    iworld.sim.v4 = True  # upgraded: the next job speaks v4
    iworld.sim.write_disk(vm.uuid, 0, MiB, os.urandom(64 * KiB))
    rt, done = await backup(iworld, level="incremental")
    assert "api=v4" in caplog.text and "/api/actuator/versionroutes lists" in caplog.text
    disks = done.disks
    assert [d.kind for d in disks] == ["full", "full"]  # self-healed, with a warning each
    assert all("taken through the original API and this one through v4" in d.warnings[0]
               for d in disks)
    nothing_left(iworld, rt)  # the v3 reference snapshot was released through v3
    await restores_identical(iworld, rt, vm.uuid, "restore")


async def test_v4_against_a_v3_only_prism_fails_in_one_line(iworld: IWorld) -> None:
    iworld.add_vm("v4-vm", LAYOUT)
    iworld.sim.v4 = False
    cmd = [sys.executable, "-m", "ahvbackup.core.cli", "backup",
           *iworld.cli_args(vm="v4-vm", prism_api_version="v4")]
    done = await trio.to_thread.run_sync(
        lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=60))
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "prism_api_version=v4" in line]
    assert len(errors) == 1 and "serves no v4 API" in errors[0], done.stderr
    assert iworld.sim.snapshots == {} and iworld.sim.recovery_points.points == {}


async def test_a_restore_to_ahv_through_v4(
        dr_world: Dr, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811 - the fixture
    """Backed up and restored through v4: VGs with an empty disk over iSCSI (volumes), or an
    image upload (v3: v4 has none), the VM made, given its disks and powered on (vmm)."""
    dr = dr_world  # test_restore_ahv's world: two clusters, a source VM with two disks
    dr.world.api = "v4"
    caplog.set_level(logging.INFO, logger="ahvbackup")
    await dr.backup()
    expect = dr.disks_now()
    c1 = dr.cluster(0)
    for keys, name in (({"data_path": "iscsi", "power_on": "yes"}, "v4-iscsi"),
                       ({"data_path": "rest"}, "v4-rest")):
        out = await dr.restore(restore_vm_name=name, **keys)
        assert out.ok, out.to_json()
        vm = restored(dr, name)
        assert out.path == vm.uuid and vm.cluster_uuid == c1.uuid
        assert_disks(dr, vm, expect, container=c1.containers[0].uuid)
        assert (vm.num_sockets, vm.num_vcpus_per_socket, vm.memory_mib) == (2, 2, 2048)
        assert (vm.boot_type, [dr.sim.subnets[n.subnet_uuid].name for n in vm.nics]) == (
            "UEFI", ["vlan0"])
        assert vm.power_state == ("ON" if name == "v4-iscsi" else "OFF")
    assert "api=v4" in caplog.text
    assert dr.leftovers() == ["vm v4-iscsi", "vm v4-rest"]
    assert dr.ledger() == []
