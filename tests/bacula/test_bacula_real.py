"""Real Bacula (Debian's 9.6.7 Director, Storage and File daemons, bconsole) backing up simulator
VMs through bpipe with the resources ``ahvbackup bacula fileset`` prints, and restoring them.

The simulator is served by this test process; the daemons, bconsole and the bpipe readers and
writers are real programs, run in worker threads so the simulator keeps serving.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from lab import BaculaLab
from tests.conftest import require_peer
from tests.e2e.e2e_world import MiB, World, same_as_sim

PROGRAMS = ("bacula-dir", "bacula-sd", "bacula-fd", "bconsole")
AHVBACKUP = Path(sys.executable).with_name("ahvbackup")

pytestmark = pytest.mark.peer


def write_config(world: World, path: Path) -> Path:
    keys = {**world.overrides(), "debug_log": str(world.tmp / "ahvbackup.log")}
    keys.pop("repository")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f'{k} = "{v}"\n' for k, v in keys.items()))
    return path


async def fileset(conf: Path, vm: str, *, client: str | None = None,
                  storage: str | None = None) -> str:
    """What `ahvbackup bacula fileset` prints for `vm` (a Job on `client` if given)."""
    done = await trio.to_thread.run_sync(lambda: subprocess.run(
        [str(AHVBACKUP), "bacula", "fileset", "-c", str(conf), "-o", f"vm={vm}",
         "--jobdefs", "LabDefs", "--command", str(AHVBACKUP)],
        capture_output=True, text=True, timeout=60, check=False))
    assert done.returncode == 0, done.stderr
    text = done.stdout
    if client:
        text = text.replace('JobDefs = "LabDefs"', f'JobDefs = "LabDefs"\n  Client = {client}'
                            f"\n  Storage = {storage}")
    return text


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


def lab_for(tmp: Path, **kw: Any) -> BaculaLab:
    programs = require_peer(*PROGRAMS)
    return BaculaLab(root=tmp / "lab", programs=programs, **kw)


async def test_full_backup_through_bpipe_restores_byte_identical_and_a_bad_reader_fails(
        world: World, tmp_path: Path) -> None:
    vm = world.add_vm("ra", [(24 * MiB, [(0, 3 * MiB), (20 * MiB, MiB)]), (8 * MiB, [])])
    conf = write_config(world, tmp_path / "ahvbackup.conf")
    broken = (f"bpipe:/@ahvbackup/broken/scsi.9.ahvd:{AHVBACKUP} bpipe backup -c {conf} "
              f"--vm ra --disk scsi.9:{AHVBACKUP} bpipe restore -c {conf} --where %w")
    lab = lab_for(tmp_path, filesets={"broken": broken}, resources=await fileset(conf, "ra"))
    where = tmp_path / "restored"
    await in_thread(lab.start)
    try:
        full = await in_thread(lab.run_job, "run job=ahv-ra level=Full yes")
        assert (full.status, full.errors) == ("T", 0), lab.job_log()
        assert full.files == 2 + lab.restore_objects(full.job_id), lab.job_log()  # 2 disks
        restore = await in_thread(lab.run_job, f"restore jobid={full.job_id} client=lab-fd "
                                               f"where={where} all done yes")
        assert (restore.status, restore.errors) == ("T", 0), lab.job_log()
        for i in range(2):
            assert same_as_sim(world.sim, vm.uuid, i, where / "ra" / f"scsi.{i}.raw")
        assert "restored ra scsi.0 (full)" in lab.job_log()

        bad = await in_thread(lab.run_job, "run job=broken level=Full yes")
        assert bad.errors > 0, lab.job_log()
        assert "VM ra has no disk scsi.9" in lab.job_log()
    finally:
        await in_thread(lab.stop)
    assert len(world.sim.snapshots) == 2  # each disk's reference for its next incremental
    assert world.sim.images == {}


async def test_two_file_daemons_back_up_different_vms_at_the_same_time(
        world: World, tmp_path: Path) -> None:
    vms = {name: world.add_vm(name, [(16 * MiB, [(0, 8 * MiB)])]) for name in ("va", "vb")}
    # jobs long enough that the Director (which takes a few seconds to start a queued job)
    # must run them side by side: snapshot and image tasks take 4 s each
    world.sim.task_seconds = 4
    conf = write_config(world, tmp_path / "ahvbackup.conf")
    resources = await fileset(conf, "va") + await fileset(conf, "vb", client="lab-fd2",
                                                  storage="LabFile2")
    first = "bpipe:/@lab/unused:/bin/true:/bin/sh -c 'cat > /dev/null'"
    lab = lab_for(tmp_path, filesets={"unused": first}, resources=resources, file_daemons=2)
    where = tmp_path / "restored"
    await in_thread(lab.start)
    try:
        out = await in_thread(lab.bconsole, "run job=ahv-va yes\nrun job=ahv-vb yes\n")
        ids = [int(x) for x in re.findall(r"Job queued\. JobId=(\d+)", out)]
        assert len(ids) == 2, out
        await in_thread(lab.bconsole, "".join(f"wait jobid={i}\n" for i in ids))
        rows = [lab.job_row(i) for i in ids]
        for row in rows:
            assert (row["JobStatus"], row["JobErrors"]) == ("T", 0), lab.job_log()
        assert [r["Client"] for r in rows] == ["lab-fd", "lab-fd2"]
        a, b = rows
        assert a["StartTime"] < b["EndTime"] and b["StartTime"] < a["EndTime"], rows
        for row, name in zip(rows, ("va", "vb"), strict=True):
            restore = await in_thread(lab.run_job, f"restore jobid={row['JobId']} "
                                                   f"client={row['Client']} where={where} "
                                                   "all done yes")
            assert (restore.status, restore.errors) == ("T", 0), lab.job_log()
            assert same_as_sim(world.sim, vms[name].uuid, 0, where / name / "scsi.0.raw")
    finally:
        await in_thread(lab.stop)



async def test_full_and_incremental_through_bpipe_restore_both_points(
        world: World, tmp_path: Path) -> None:
    size = 16 * MiB
    vm = world.add_vm("rc", [(size, [(0, 4 * MiB), (10 * MiB, 2 * MiB)])])
    conf = write_config(world, tmp_path / "ahvbackup.conf")
    spare = "bpipe:/@lab/unused:/bin/true:/bin/sh -c 'cat > /dev/null'"
    lab = lab_for(tmp_path, filesets={"unused": spare}, resources=await fileset(conf, "rc"))
    point1 = world.sim.read_disk(vm.uuid, 0, 0, size)
    at1, at2 = tmp_path / "at1", tmp_path / "at2"
    await in_thread(lab.start)
    try:
        full = await in_thread(lab.run_job, "run job=ahv-rc level=Full yes")
        assert (full.status, full.errors) == ("T", 0), lab.job_log()
        world.sim.write_disk(vm.uuid, 0, 12 * MiB, os.urandom(MiB))
        world.sim.write_disk(vm.uuid, 0, MiB, bytes(MiB))
        inc = await in_thread(lab.run_job, "run job=ahv-rc level=Incremental yes")
        assert (inc.status, inc.errors) == ("T", 0), lab.job_log()
        assert "backed up rc scsi.0: level=incremental" in lab.job_log()
        assert inc.bytes < full.bytes / 2, (inc, full)

        for where, jobs in ((at1, [full]), (at2, [full, inc])):
            for job in jobs:  # the chain, oldest first, into the same where
                done = await in_thread(lab.run_job, f"restore jobid={job.job_id} client=lab-fd "
                                                    f"where={where} all done yes")
                assert (done.status, done.errors) == ("T", 0), lab.job_log()
        assert (at1 / "rc" / "scsi.0.raw").read_bytes() == point1
        assert same_as_sim(world.sim, vm.uuid, 0, at2 / "rc" / "scsi.0.raw")
        assert "restored rc scsi.0 (incremental)" in lab.job_log()
    finally:
        await in_thread(lab.stop)
