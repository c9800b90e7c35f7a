"""Chains in the repository: consolidation gives the chain's bytes, retention never orphans a
delta, changed regions are followed across pages, estimates count changed bytes, the trust
check catches change tracking that lies, and the CLI restores a point in time."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trio
from tests.e2e.e2e_world import MiB, World

from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.consolidate import ConsolidateJob
from ahvbackup.core.jobs.restore import RestoreJob, VerifyJob, pick_backup
from ahvbackup.core.jobs.retention import apply_retention
from ahvbackup.core.jobs.runtime import Runtime

CLI = [sys.executable, "-m", "ahvbackup.core.cli"]


async def _run(world: World, vm: str, level: str, **extra: object) -> str:
    rt = Runtime.from_config(world.config(vm=vm, level=level, chunk_size_mib=1, **extra))
    result = await BackupJob(rt).run()
    assert result.ok, result.failed
    assert result.vms[0].backup_id is not None
    return result.vms[0].backup_id


def _image(world: World, vm_uuid: str) -> bytes:
    return world.sim.read_disk(vm_uuid, 0, 0, world.sim.vms[vm_uuid].data_disks[0].size)


async def _chain(world: World, name: str, n: int) -> tuple[str, list[str], list[bytes]]:
    vm = world.add_vm(name, [(16 * MiB, [(0, 3 * MiB)])])
    ids = [await _run(world, name, "full")]
    images = [_image(world, vm.uuid)]
    for i in range(n):
        world.sim.write_disk(vm.uuid, 0, (4 + i) * MiB + 4096, os.urandom(300_000))
        world.sim.zero_disk(vm.uuid, 0, i * 65536, 65536)
        ids.append(await _run(world, name, "incremental"))
        images.append(_image(world, vm.uuid))
    return vm.uuid, ids, images


async def test_consolidation_gives_the_chains_bytes_and_drops_old_links(world: World) -> None:
    vm_uuid, ids, images = await _chain(world, "con", 4)
    rt = Runtime.from_config(world.config(vm="con"))
    backups = {b.backup_id: b for b in await rt.sink.backups()}
    tip = backups[ids[3]]  # consolidate the middle of the chain: ids[4] builds on it
    before = await RestoreJob(rt, tip, dest=world.tmp / "before").run()
    assert before.ok and before.disks[0].chain == ids[:4]

    done = await ConsolidateJob(rt, tip).run()
    assert done.ok and done.disks[0]["links"] == 4
    # the full is still named by the state (differentials); the middle links went
    assert set(done.removed) == {ids[1], ids[2]}
    remaining = {b.backup_id: b for b in await rt.sink.backups()}
    assert set(remaining) == {ids[0], ids[3], ids[4]}
    assert remaining[ids[3]].level == "full"

    after = await RestoreJob(rt, remaining[ids[3]], dest=world.tmp / "after").run()
    assert after.ok and after.disks[0].chain == [ids[3]]
    assert Path(after.disks[0].path).read_bytes() == images[3]
    assert Path(after.disks[0].path).read_bytes() == Path(before.disks[0].path).read_bytes()
    # the incremental taken on top of it still restores through the synthetic full
    top = await RestoreJob(rt, remaining[ids[4]], dest=world.tmp / "top").run()
    assert top.ok and top.disks[0].chain == [ids[3], ids[4]]
    assert Path(top.disks[0].path).read_bytes() == images[4]
    assert (await VerifyJob(rt, remaining[ids[4]]).run()).ok
    # and the next incremental still chains onto the consolidated tip
    world.sim.write_disk(vm_uuid, 0, 15 * MiB, os.urandom(MiB))
    nxt = await _run(world, "con", "incremental")
    out = await RestoreJob(rt, (await pick_backup(rt, vm=None, backup_id=nxt)),
                           dest=world.tmp / "next").run()
    assert out.ok and Path(out.disks[0].path).read_bytes() == _image(world, vm_uuid)


async def test_retention_keeps_whole_chains(world: World) -> None:
    vm_uuid, ids, _ = await _chain(world, "ret", 2)           # full A + 2 incrementals
    ids.append(await _run(world, "ret", "full"))              # full B
    world.sim.write_disk(vm_uuid, 0, 9 * MiB, os.urandom(MiB))
    ids.append(await _run(world, "ret", "incremental"))       # on B
    rt = Runtime.from_config(world.config(vm="ret"))
    created = {b.backup_id: b.created for b in await rt.sink.backups()}

    # keep_days alone, measured from a time when only the newest backup is young: everything
    # the newest needs stays (full B), the older chain goes, newest first
    removed = await apply_retention(rt, vm_uuid=vm_uuid, keep_fulls=0, keep_days=1,
                                    now=created[ids[4]] + 86400 - 0.0001)
    assert removed == [ids[2], ids[1], ids[0]]
    assert [b.backup_id for b in await rt.sink.backups()] == [ids[3], ids[4]]


async def test_retention_keep_fulls_never_orphans(world: World) -> None:
    vm_uuid, ids, _ = await _chain(world, "kf", 1)
    ids.append(await _run(world, "kf", "full"))
    world.sim.write_disk(vm_uuid, 0, 9 * MiB, os.urandom(MiB))
    ids.append(await _run(world, "kf", "differential"))
    rt = Runtime.from_config(world.config(vm="kf", keep_fulls=1))
    # the backup job applies retention itself when keep_* is set
    world.sim.write_disk(vm_uuid, 0, 10 * MiB, os.urandom(MiB))
    ids.append(await _run(world, "kf", "incremental", keep_fulls=1))
    left = [b.backup_id for b in await rt.sink.backups()]
    assert left == ids[2:]
    for b in await rt.sink.backups():
        assert (await VerifyJob(rt, b).run()).ok


async def test_changed_regions_pagination_is_followed(world: World) -> None:
    vm = world.add_vm("pages", [(16 * MiB, [(0, MiB)])])
    await _run(world, "pages", "full")
    world.sim.changed_regions_page_size = 3
    for i in range(20):  # 20 separate changed regions: 7 pages of 3
        world.sim.write_disk(vm.uuid, 0, i * 512 * 1024 + 65536, os.urandom(4096))
    world.sim.stats.reset()
    rt = Runtime.from_config(world.config(vm="pages", level="incremental", chunk_size_mib=1))
    result = await BackupJob(rt).run()
    assert result.ok
    posts = world.sim.stats.by_route()["POST /api/nutanix/v3/data/changed_regions"]
    assert posts >= 7
    assert result.vms[0].disks[0].bytes_read == 20 * 65536  # block-granular, every page read
    out = await RestoreJob(rt, (await rt.sink.backups())[-1], dest=world.tmp / "r").run()
    assert Path(out.disks[0].path).read_bytes() == _image(world, vm.uuid)


async def test_estimate_of_an_incremental_counts_changed_bytes(world: World) -> None:
    vm = world.add_vm("est", [(16 * MiB, [(0, 4 * MiB)])])
    await _run(world, "est", "full")
    world.sim.write_disk(vm.uuid, 0, 8 * MiB, os.urandom(3 * 65536))
    world.sim.zero_disk(vm.uuid, 0, 0, MiB)
    rt = Runtime.from_config(world.config(vm="est", level="incremental", mode="estimate"))
    n_backups = len(await rt.sink.backups())
    snaps = set(world.sim.snapshots)
    result = await BackupJob(rt).run()
    disk = result.vms[0].disks[0]
    assert disk.kind == "incremental"
    assert disk.estimated_bytes == 3 * 65536 and disk.zero_bytes == MiB
    assert len(await rt.sink.backups()) == n_backups and set(world.sim.snapshots) == snaps


async def test_trust_check_reports_a_change_tracking_miss_and_forces_a_full(
    world: World,
) -> None:
    vm = world.add_vm("trust", [(8 * MiB, [(0, 8 * MiB)])])
    await _run(world, "trust", "full")
    # a change the disk store's tracking never saw: written straight into the live file
    disk_id = world.sim.vms[vm.uuid].data_disks[0].uuid
    live = next(Path(world.tmp / "sim").rglob(f"disks/{disk_id}/live.img"))
    with live.open("r+b") as f:
        f.seek(5 * MiB)
        f.write(os.urandom(MiB))
    rt = Runtime.from_config(world.config(vm="trust", level="incremental",
                                          verify_unchanged_sample=100))
    result = await BackupJob(rt).run()
    disk = result.vms[0].disks[0]
    assert disk.trust_mismatch and disk.sampled_bytes == 8 * MiB
    assert any("TRUST CHECK FAILED" in w and "offset 5242880" in w for w in result.vms[0].warnings)
    nxt = await BackupJob(rt).run()
    assert nxt.vms[0].disks[0].kind == "full"
    assert any("change tracking missed" in w for w in nxt.vms[0].disks[0].warnings)
    # and with honest tracking the check passes quietly
    world.sim.write_disk(vm.uuid, 0, 0, os.urandom(MiB))
    ok = await BackupJob(rt).run()
    assert ok.vms[0].disks[0].kind == "incremental" and not ok.vms[0].disks[0].trust_mismatch
    assert ok.vms[0].disks[0].sampled_bytes == 7 * MiB


async def test_cli_restore_at_a_time_and_consolidate(world: World) -> None:
    _, ids, images = await _chain(world, "cli", 2)
    rt = Runtime.from_config(world.config(vm="cli"))
    created = {b.backup_id: b.created for b in await rt.sink.backups()}
    out = world.tmp / "pit"
    proc = await trio.run_process(
        [*CLI, "restore", *world.cli_args(), "--vm", "cli", "--at",
         str(created[ids[1]] + 0.001), "--dest", str(out)],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert f"chain: {ids[0]} -> {ids[1]}" in proc.stdout.decode()
    assert (out / "cli" / "scsi.0.raw").read_bytes() == images[1]
    proc = await trio.run_process(
        [*CLI, "--json", "consolidate", *world.cli_args(), "--vm", "cli"],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert ids[1] in proc.stdout.decode()  # the middle link was removed
