"""A repository or restore destination that fills up mid-stream: that VM fails with one line
naming the path and the free space, nothing partial is kept, and the chain stays correct.

The filesystem is real: a small tmpfs mounted for the test (root is needed, as in CI)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.e2e.e2e_world import MiB, World

from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.restore import RestoreJob, pick_backup
from ahvbackup.core.jobs.runtime import Runtime


@contextlib.contextmanager
def small_fs(path: Path, size_mib: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs",
                           str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        why = f"cannot mount a tmpfs here ({done.stderr.strip()})"
        if os.environ.get("AHVBACKUP_REQUIRE_PEERS"):
            pytest.fail(why)
        pytest.skip(why)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_a_repository_that_fills_up_fails_the_vm_and_keeps_the_chain(
        world: World) -> None:
    vm = world.add_vm("big", [(32 * MiB, [(0, 2 * MiB)])])
    with small_fs(world.tmp / "repo", 8):
        rt = Runtime.from_config(world.config(vm="big", chunk_size_mib=1))
        full = await BackupJob(rt).run()
        assert full.ok, full.failed
        reference = rt.states.all()[0].snapshot_ids()
        world.sim.write_disk(vm.uuid, 0, 4 * MiB, os.urandom(12 * MiB))  # more than is free
        inc = await BackupJob(Runtime.from_config(
            world.config(vm="big", level="incremental", chunk_size_mib=1))).run()
        assert not inc.ok
        error = inc.vms[0].error or ""
        assert "No space left on device" in error and str(world.tmp / "repo") in error, error
        assert "free" in error
        # nothing half-written, the previous reference kept: the next incremental is right
        assert not list((world.tmp / "repo").glob("*/.partial-*"))
        assert [b.backup_id for b in await rt.sink.backups()] == [full.vms[0].backup_id]
        assert rt.states.all()[0].snapshot_ids() == reference
        assert set(world.sim.snapshots) == reference and world.sim.images == {}
        world.sim.zero_disk(vm.uuid, 0, 4 * MiB, 12 * MiB)
        again = await BackupJob(Runtime.from_config(
            world.config(vm="big", level="incremental", chunk_size_mib=1))).run()
        assert again.ok, again.failed
        out = await RestoreJob(rt, await pick_backup(rt, vm="big", backup_id=None),
                               dest=world.tmp / "out").run()
        assert out.ok
        assert Path(out.disks[0].path).read_bytes() == world.sim.read_disk(vm.uuid, 0, 0,
                                                                            32 * MiB)


async def test_a_restore_destination_that_fills_up_leaves_nothing(world: World) -> None:
    world.add_vm("wide", [(16 * MiB, [(0, 6 * MiB)]), (16 * MiB, [(0, 6 * MiB)])])
    rt = Runtime.from_config(world.config(vm="wide"))
    assert (await BackupJob(rt).run()).ok
    with small_fs(world.tmp / "dest", 8) as dest:
        out = await RestoreJob(rt, await pick_backup(rt, vm="wide", backup_id=None),
                               dest=dest).run()
        assert not out.ok
        errors = " ".join(d.error or "" for d in out.disks)
        assert "No space left on device" in errors and str(dest) in errors, errors
        assert [p for p in dest.rglob("*") if p.is_file()] == []  # the VM restore was aborted
