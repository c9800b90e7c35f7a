"""The `ahvbackup` command against the served simulator, as an operator runs it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from tests.e2e.e2e_world import MiB, World

from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.runtime import Runtime

CLI = [sys.executable, "-m", "ahvbackup.core.cli"]


async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process([*CLI, *args], capture_stdout=True, capture_stderr=True,
                                  check=False)


async def test_backup_list_verify_restore_from_the_command_line(world: World) -> None:
    vm = world.add_vm("cli-vm", [(16 * MiB, [(MiB, 3 * MiB)])])
    done = await run_cli("--json", "backup", *world.cli_args(vm="cli-vm"))
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)
    assert result["ok"] and result["vms"][0]["vm_name"] == "cli-vm"
    assert b"backup/4u" not in done.stdout + done.stderr  # the inline password never shows

    listed = json.loads((await run_cli("--json", "list", *world.cli_args())).stdout)
    assert [r["vm"] for r in listed] == ["cli-vm"]

    checked = await run_cli("verify", "--vm", "cli-vm", *world.cli_args())
    assert checked.returncode == 0 and b"ok" in checked.stdout

    dest = world.tmp / "out"
    restored = await run_cli("restore", "--vm", "cli-vm", "--dest", str(dest), *world.cli_args())
    assert restored.returncode == 0, restored.stderr.decode()
    raw = (dest / "cli-vm" / "scsi.0.raw").read_bytes()
    assert raw == world.sim.read_disk(vm.uuid, 0, 0, 16 * MiB)


async def test_failures_give_their_exit_codes(world: World) -> None:
    bad_key = await run_cli("backup", *world.cli_args(concurent_vms=2))
    assert bad_key.returncode == 2
    assert b"concurent_vms: unknown key (did you mean 'concurrent_vms'?)" in bad_key.stderr

    no_vm = await run_cli("backup", *world.cli_args(vm="no-such-vm"))
    assert no_vm.returncode == 2 and b"selects no VM" in no_vm.stderr

    wrong_password = await run_cli("backup", *world.cli_args(password="nope"))
    assert wrong_password.returncode == 3
    assert b"401" in wrong_password.stderr and b"nope" not in wrong_password.stderr

    world.add_vm("plain", [(4 * MiB, [(0, MiB)])])
    vm_failed = await run_cli("backup", *world.cli_args(vm="plain", application_consistent="true"))
    assert vm_failed.returncode == 1 and b"plain" in vm_failed.stderr


async def test_sigkill_mid_disk_leaves_nothing_behind_after_the_next_run(world: World) -> None:
    world.add_vm("big", [(64 * MiB, [(0, 48 * MiB)])])
    world.sim.faults.add(method="GET", path=r"/images/.*/file", latency=0.5, count=None)
    proc = await trio.lowlevel.open_process(
        [*CLI, "backup", *world.cli_args(vm="big", chunk_size_mib=1)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(60):
            while world.sim.stats.active_image_reads == 0:
                await trio.sleep(0.05)
    finally:
        proc.kill()
        await proc.wait()
    # the killed job left its snapshot and image on the cluster, and a partial backup
    assert len(world.sim.snapshots) == 1 and len(world.sim.images) == 1
    repo = Path(world.tmp / "repo")
    assert list(repo.glob("*/.partial-*"))
    rt = Runtime.from_config(world.config(vm="big"))
    assert await rt.sink.backups() == []  # nothing half-done is listed as a backup

    world.sim.faults.clear()
    result = await BackupJob(rt).run()  # job_cleanup_on_abort=yes (the default) sweeps first
    assert result.ok
    # the killed job's snapshot was swept; the new one stays as the next reference
    assert len(world.sim.snapshots) == 1
    assert set(world.sim.snapshots) == rt.states.all()[0].snapshot_ids()
    assert world.sim.images == {}
    assert not list(repo.glob("*/.partial-*"))
    assert [b.vm_name for b in await rt.sink.backups()] == ["big"]
    assert not list((world.tmp / "state" / "ledger").glob("*.json"))


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_a_signal_mid_backup_releases_everything_and_exits_cleanly(
        world: World, signum: int, code: int) -> None:
    world.add_vm("sig", [(64 * MiB, [(0, 48 * MiB)])])
    world.sim.faults.add(method="GET", path=r"/images/.*/file", latency=0.5, count=None)
    proc = await trio.lowlevel.open_process(
        [*CLI, "backup", *world.cli_args(vm="sig", chunk_size_mib=1, data_path="rest")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    with trio.fail_after(60):
        while world.sim.stats.active_image_reads == 0:
            await trio.sleep(0.05)
    proc.send_signal(signum)
    assert proc.stderr is not None
    err = b""
    with trio.fail_after(30):
        async for chunk in proc.stderr:
            err += chunk
        assert await proc.wait() == code
    text = err.decode()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert f"interrupted by {signal.Signals(signum).name}" in text
    # released on the way out, not left for the next run's sweep
    assert world.sim.snapshots == {} and world.sim.images == {}
    assert not list((world.tmp / "state" / "ledger").glob("*.json"))
    assert not list((world.tmp / "repo").glob("*/.partial-*"))


async def test_a_restore_killed_mid_write_leaves_no_image_and_the_next_restore_cleans_up(
        world: World) -> None:
    vm = world.add_vm("rk", [(64 * MiB, [(0, 48 * MiB)])])
    rt = Runtime.from_config(world.config(vm="rk"))
    assert (await BackupJob(rt).run()).ok
    dest = world.tmp / "dest"
    proc = await trio.lowlevel.open_process(
        [*CLI, "restore", "--vm", "rk", "--dest", str(dest), *world.cli_args()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(60):
            while not list(dest.glob("rk/.scsi.0.raw.partial-*")):
                await trio.sleep(0.01)
    finally:
        proc.kill()
        await proc.wait()
    assert not (dest / "rk" / "scsi.0.raw").exists()  # no half image passes for a disk
    done = await run_cli("restore", "--vm", "rk", "--dest", str(dest), *world.cli_args())
    assert done.returncode == 0, done.stderr.decode()
    assert [p.name for p in (dest / "rk").iterdir()] == ["scsi.0.raw"]
    assert (dest / "rk" / "scsi.0.raw").read_bytes() == world.sim.read_disk(vm.uuid, 0, 0,
                                                                             64 * MiB)
