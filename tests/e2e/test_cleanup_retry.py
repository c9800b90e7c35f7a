"""What a job creates on the cluster is released before it ends, even when the cluster
answers a delete with an error for a while; what it truly cannot release is named."""

from __future__ import annotations

import json
import subprocess
import sys

import trio
from tests.e2e.e2e_world import MiB, World

from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.runtime import Runtime


async def test_a_500_on_the_image_delete_is_retried_and_the_job_ends_clean(
        world: World) -> None:
    world.add_vm("r", [(4 * MiB, [(0, MiB)])])
    rule = world.sim.faults.add(method="DELETE", path=r"/images/", status=500, count=3)
    rt = Runtime.from_config(world.config(vm="r", data_path="rest"))
    result = await BackupJob(rt).run()
    assert result.ok, result.failed
    assert rule.hits == 3
    assert world.sim.images == {}
    assert not list((world.tmp / "state" / "ledger").glob("*.json"))
    assert not [w for v in result.vms for w in v.warnings if "left on the cluster" in w]


async def _cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process([sys.executable, "-m", "ahvbackup.core.cli", *args],
                                  capture_stdout=True, capture_stderr=True, check=False)


async def test_an_image_that_cannot_be_deleted_is_named_and_swept_next_run(
        world: World) -> None:
    world.add_vm("stuck", [(4 * MiB, [(0, MiB)])])
    world.sim.faults.add(method="DELETE", path=r"/images/", status=500, count=None)
    first = await _cli("--json", "backup", *world.cli_args(vm="stuck", data_path="rest"))
    assert first.returncode == 0, first.stderr.decode()  # the backup itself is complete
    warnings = [w for v in json.loads(first.stdout)["vms"] for w in v["warnings"]]
    left = [w for w in warnings if "left on the cluster" in w]
    assert len(left) == 1 and left[0].startswith("image "), warnings
    assert len(world.sim.images) == 1
    world.sim.faults.clear()
    # the next run's sweep releases what the first one had to leave
    again = await _cli("backup", *world.cli_args(vm="stuck", data_path="rest"))
    assert again.returncode == 0, again.stderr.decode()
    assert world.sim.images == {}
    assert not list((world.tmp / "state" / "ledger").glob("*.json"))
