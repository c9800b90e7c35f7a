"""Incremental and differential backups end to end against the served simulator: deltas read
only what changed, chains restore byte-identical at every point, and every case where a delta is
impossible heals itself per disk with a warning instead of failing the job."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import httpx
import pytest
from tests.e2e.e2e_world import MiB, World

from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.restore import RestoreJob, VerifyJob, pick_backup
from ahvbackup.core.jobs.results import JobResult
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.hypervisors.ahv.simulator import pe_app
from ahvbackup.hypervisors.ahv.simulator.model import Disk


async def _backup(world: World, vm: str, level: str, **extra: object) -> tuple[Runtime, JobResult]:
    rt = Runtime.from_config(world.config(vm=vm, level=level, chunk_size_mib=1, **extra))
    result = await BackupJob(rt).run()
    assert result.ok, result.failed
    return rt, result


def _image(world: World, vm_uuid: str, index: int) -> bytes:
    size = world.sim.vms[vm_uuid].data_disks[index].size
    return world.sim.read_disk(vm_uuid, index, 0, size)


async def _restore_equals(rt: Runtime, world: World, backup_id: str, images: list[bytes],
                          where: str) -> None:
    backup = await pick_backup(rt, vm=None, backup_id=backup_id)
    out = await RestoreJob(rt, backup, dest=world.tmp / where).run()
    assert out.ok, [d.error for d in out.disks]
    for disk, want in zip(out.disks, images, strict=True):
        assert Path(disk.path).read_bytes() == want, (backup_id, disk.label)


async def test_incrementals_read_only_changes_and_every_point_restores(world: World) -> None:
    vm = world.add_vm("inc", [(32 * MiB, [(0, 4 * MiB), (20 * MiB, 2 * MiB)])])
    rt, full = await _backup(world, "inc", "full")
    points = [(full.vms[0].backup_id, _image(world, vm.uuid, 0))]

    world.sim.write_disk(vm.uuid, 0, 8 * MiB, os.urandom(256 << 10))   # new data in a hole
    world.sim.zero_disk(vm.uuid, 0, 1 * MiB, 512 << 10)                  # zeroed data
    rt, inc1 = await _backup(world, "inc", "incremental")
    d = inc1.vms[0].disks[0]
    assert d.kind == "incremental" and d.reference_backup == points[0][0]
    assert d.bytes_read == 256 << 10  # only the written bytes moved; the zeroing is a record
    assert d.zero_bytes == 512 << 10
    points.append((inc1.vms[0].backup_id, _image(world, vm.uuid, 0)))

    world.sim.trim_disk(vm.uuid, 0, 20 * MiB, MiB)
    world.sim.write_disk(vm.uuid, 0, 31 * MiB, os.urandom(MiB))
    rt, inc2 = await _backup(world, "inc", "incremental")
    assert inc2.vms[0].disks[0].reference_backup == points[1][0]
    points.append((inc2.vms[0].backup_id, _image(world, vm.uuid, 0)))

    # the stream names its reference, and the manifest says what it is
    manifest = json.loads((Path(rt.config.repository) / vm.uuid / points[2][0] /
                           "manifest.json").read_text())
    assert manifest["level"] == "incremental"
    assert manifest["disks"][0]["kind"] == "incremental"
    assert manifest["disks"][0]["reference_backup"] == points[1][0]

    for i, (bid, image) in enumerate(points):
        await _restore_equals(rt, world, bid, [image], f"r{i}")
    # only the newest snapshot stays on the cluster (the full's too: differentials need it)
    state = rt.states.all()[0]
    assert set(world.sim.snapshots) == state.snapshot_ids()
    assert len(world.sim.snapshots) == 2
    assert not list((world.tmp / "state" / "ledger").glob("*.json"))


async def test_differential_builds_on_the_last_full(world: World) -> None:
    vm = world.add_vm("dif", [(16 * MiB, [(0, 2 * MiB)])])
    rt, full = await _backup(world, "dif", "full")
    full_id = full.vms[0].backup_id
    world.sim.write_disk(vm.uuid, 0, 4 * MiB, os.urandom(MiB))
    _, d1 = await _backup(world, "dif", "differential")
    world.sim.write_disk(vm.uuid, 0, 8 * MiB, os.urandom(MiB))
    _, d2 = await _backup(world, "dif", "differential")
    disk = d2.vms[0].disks[0]
    assert disk.kind == "differential" and disk.reference_backup == full_id
    assert disk.bytes_read == 2 * MiB  # both changes since the full
    await _restore_equals(rt, world, d2.vms[0].backup_id, [_image(world, vm.uuid, 0)], "r")
    # an incremental after differentials builds on the newest backup
    world.sim.write_disk(vm.uuid, 0, 12 * MiB, os.urandom(MiB))
    _, inc = await _backup(world, "dif", "incremental")
    assert inc.vms[0].disks[0].reference_backup == d2.vms[0].backup_id
    assert inc.vms[0].disks[0].bytes_read == MiB
    assert d1.vms[0].backup_id != d2.vms[0].backup_id


async def test_failed_incremental_keeps_the_old_reference(world: World) -> None:
    vm = world.add_vm("keep", [(8 * MiB, [(0, MiB)])])
    rt, full = await _backup(world, "keep", "full")
    before = set(world.sim.snapshots)
    world.sim.write_disk(vm.uuid, 0, 2 * MiB, os.urandom(MiB))
    world.sim.faults.add(method="GET", path=r"/images/.*/file", drop=True, count=10_000)
    rt = Runtime.from_config(world.config(vm="keep", level="incremental", chunk_size_mib=1))
    failed = await BackupJob(rt).run()
    assert not failed.ok
    assert set(world.sim.snapshots) == before  # the new snapshot went, the reference stayed
    assert rt.states.load(vm.uuid)[0].last_backup_id == full.vms[0].backup_id  # type: ignore[union-attr]
    world.sim.faults.clear()
    _, ok = await _backup(world, "keep", "incremental")
    assert ok.vms[0].disks[0].kind == "incremental"
    assert ok.vms[0].disks[0].bytes_read == MiB


async def test_deleted_reference_resized_added_and_removed_disks_heal(world: World) -> None:
    vm = world.add_vm("heal", [(8 * MiB, [(0, MiB)]), (8 * MiB, [(0, MiB)]),
                               (4 * MiB, [(0, MiB)])])
    rt, _ = await _backup(world, "heal", "full")
    # the cluster's retention deletes our reference behind our back
    (ref,) = rt.states.all()[0].snapshot_ids()
    world.sim.delete_vm_snapshot(ref)
    _, healed = await _backup(world, "heal", "incremental")
    disks = {d.label: d for d in healed.vms[0].disks}
    assert all(d.kind == "full" for d in disks.values())
    assert all("is gone on the cluster" in w for d in disks.values() for w in d.warnings)
    assert any("reference snapshot" in w and "gone" in w for w in healed.vms[0].warnings)

    # resize scsi.1, add a disk, remove scsi.2
    cur = world.sim.vms[vm.uuid]
    disks_now = [dataclasses.replace(d) for d in cur.disks]
    disks_now[1].size = 12 * MiB
    removed = disks_now.pop(2)
    disks_now.append(Disk(uuid="added-disk-0000", device_type="DISK", adapter_type="SCSI",
                          device_index=3, size=4 * MiB,
                          container_uuid=disks_now[0].container_uuid))
    world.sim.update_vm(dataclasses.replace(cur, disks=disks_now), spec_version=None)
    world.sim.write_disk(vm.uuid, 2, 0, os.urandom(MiB))           # the added disk
    world.sim.write_disk(vm.uuid, 1, 10 * MiB, os.urandom(MiB))    # past the old end
    world.sim.write_disk(vm.uuid, 0, 4 * MiB, os.urandom(MiB))
    rt, mixed = await _backup(world, "heal", "incremental")
    vr = mixed.vms[0]
    disks = {d.label: d for d in vr.disks}
    assert disks["scsi.0"].kind == "incremental" and disks["scsi.0"].bytes_read == MiB
    assert disks["scsi.1"].kind == "full"
    assert any("resized from 8388608 to 12582912" in w for w in disks["scsi.1"].warnings)
    assert disks["scsi.3"].kind == "full"
    assert any("disk added" in w for w in disks["scsi.3"].warnings)
    assert any(f"disk scsi.2 ({removed.uuid}) was removed" in w for w in vr.warnings)
    manifest = json.loads((Path(rt.config.repository) / vm.uuid / vr.backup_id /
                           "manifest.json").read_text())
    assert [d["uuid"] for d in manifest["removed_disks"]] == [removed.uuid]
    await _restore_equals(rt, world, vr.backup_id,
                          [_image(world, vm.uuid, i) for i in range(3)], "r")


async def test_corrupt_or_missing_state_takes_a_full_with_a_warning(world: World) -> None:
    vm = world.add_vm("st", [(8 * MiB, [(0, MiB)])])
    _, first = await _backup(world, "st", "incremental")  # no state yet
    assert first.vms[0].disks[0].kind == "full"
    assert any("no previous backup" in w for w in first.vms[0].warnings)
    state = world.tmp / "state" / vm.uuid / "state.json"
    state.write_text("{ not json")
    _, second = await _backup(world, "st", "incremental")
    assert second.vms[0].disks[0].kind == "full"
    assert any("unreadable" in w for w in second.vms[0].warnings)
    # and the state is whole again: the next one is a delta
    _, third = await _backup(world, "st", "incremental")
    assert third.vms[0].disks[0].kind == "incremental"


async def test_restore_at_a_time_and_chain_verify_names_a_missing_link(world: World) -> None:
    vm = world.add_vm("pit", [(8 * MiB, [(0, MiB)])])
    rt, full = await _backup(world, "pit", "full")
    images = [_image(world, vm.uuid, 0)]
    world.sim.write_disk(vm.uuid, 0, 2 * MiB, os.urandom(MiB))
    _, inc1 = await _backup(world, "pit", "incremental")
    images.append(_image(world, vm.uuid, 0))
    world.sim.write_disk(vm.uuid, 0, 4 * MiB, os.urandom(MiB))
    _, inc2 = await _backup(world, "pit", "incremental")
    ids = [full.vms[0].backup_id, inc1.vms[0].backup_id, inc2.vms[0].backup_id]
    backups = {b.backup_id: b for b in await rt.sink.backups()}

    at = backups[ids[1]].created + 0.001  # between inc1 and inc2
    picked = await pick_backup(rt, vm="pit", backup_id=None, at=at)
    assert picked.backup_id == ids[1]
    out = await RestoreJob(rt, picked, dest=world.tmp / "at").run()
    assert out.ok and Path(out.disks[0].path).read_bytes() == images[1]
    assert out.disks[0].chain == ids[:2]

    verified = await VerifyJob(rt, backups[ids[2]]).run()
    assert verified.ok and verified.disks[0].chain == ids

    # a damaged middle link is named, and restore writes nothing that looks complete
    stream = Path(rt.config.repository) / vm.uuid / ids[1] / "scsi.0.ahvd"
    raw = bytearray(stream.read_bytes())
    raw[-200] ^= 0x40
    stream.write_bytes(raw)
    bad = await VerifyJob(rt, backups[ids[2]]).run()
    assert not bad.ok and f"backup {ids[1]}" in (bad.disks[0].error or "")

    # a missing link is named too
    await rt.sink.remove(backups[ids[1]])  # type: ignore[attr-defined]
    gone = await RestoreJob(rt, backups[ids[2]], dest=world.tmp / "gone").run()
    assert not gone.ok
    assert f"reference backup {ids[1]} is not in the repository" in (gone.disks[0].error or "")
    assert not (world.tmp / "gone" / "pit" / "scsi.0.raw").exists()


async def test_changed_regions_of_a_deleted_reference_is_a_404_naming_it(world: World) -> None:
    vm = world.add_vm("crt", [(4 * MiB, [(0, MiB)])])
    cluster = vm.cluster_uuid
    old = world.sim.create_vm_snapshot(vm_uuid=vm.uuid, name="a", snapshot_type="CRASH_CONSISTENT",
                                       cluster_uuid=cluster)
    new = world.sim.create_vm_snapshot(vm_uuid=vm.uuid, name="b", snapshot_type="CRASH_CONSISTENT",
                                       cluster_uuid=cluster)
    ref, path = old.files[0].snapshot_file_path, new.files[0].snapshot_file_path
    world.sim.delete_vm_snapshot(old.uuid)
    transport = httpx.ASGITransport(app=pe_app(world.sim))
    async with httpx.AsyncClient(transport=transport, base_url="http://pe:9440",
                                 auth=("admin", "nutanix/4u")) as pe:
        r = await pe.post("/api/nutanix/v3/data/changed_regions",
                          json={"snapshot_file_path": path, "reference_snapshot_file_path": ref})
        assert r.status_code == 404 and ref in r.text
        assert (await pe.post("/api/nutanix/v3/data/changed_regions",
                              content=b"")).status_code == 422


async def test_state_write_failure_keeps_the_old_reference_and_snapshots(
    world: World, monkeypatch: pytest.MonkeyPatch,
) -> None:
    vm = world.add_vm("sw", [(8 * MiB, [(0, MiB)])])
    rt, full = await _backup(world, "sw", "full")
    refs = rt.states.all()[0].snapshot_ids()
    world.sim.write_disk(vm.uuid, 0, 2 * MiB, os.urandom(MiB))
    rt = Runtime.from_config(world.config(vm="sw", level="incremental", chunk_size_mib=1))

    def no_space(state: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rt.states, "save", no_space)
    result = await BackupJob(rt).run()
    assert not result.ok
    assert "cannot write its state" in (result.vms[0].error or "")
    # the old reference is untouched on the cluster, the new snapshot is gone, nothing on the
    # ledger, and the state still names the full
    assert set(world.sim.snapshots) == refs
    assert not list((world.tmp / "state" / "ledger").glob("*.json"))
    state, _ = rt.states.load(vm.uuid)
    assert state is not None and state.last_backup_id == full.vms[0].backup_id
    monkeypatch.undo()
    _, nxt = await _backup(world, "sw", "incremental")
    assert nxt.vms[0].disks[0].kind == "incremental"


async def test_an_incremental_whose_every_disk_was_read_in_full_is_listed_as_full(
        world: World) -> None:
    world.add_vm("first", [(4 * MiB, [(0, MiB)]), (4 * MiB, [(MiB, MiB)])])
    rt, first = await _backup(world, "first", "incremental")  # no reference yet: heals to full
    assert [d.kind for d in first.vms[0].disks] == ["full", "full"]
    (listed,) = await rt.sink.backups("first")
    assert listed.level == "full"
    world.sim.write_disk(first.vms[0].vm_uuid, 0, 0, os.urandom(4096))
    rt, second = await _backup(world, "first", "incremental")
    assert second.vms[0].disks[0].kind == "incremental"
    assert [b.level for b in await rt.sink.backups("first")] == ["full", "incremental"]
