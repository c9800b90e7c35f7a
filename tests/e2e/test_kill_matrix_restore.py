"""A kill at every step of a restore to AHV, over each data path: SIGKILL the restore at each hook
event in turn (test_kill_matrix.py explains the killer), then restore again under the same VM
name. The next run must succeed, the half VM, volume groups and images of the killed one must be
gone (only the restored VMs stay), and the ledger must be empty. A kill after the VM was made
(its last steps) leaves that VM complete: then the next run refuses the name, as it must."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from tests.e2e.test_kill_matrix import CLI, Record, _run, _site
from tests.e2e.test_restore_ahv import ADMIN, SRC, Dr, assert_disks, dr, restored  # noqa: F401


@pytest.mark.parametrize("data_path", ["iscsi", "rest"])
async def test_a_kill_at_every_step_of_a_restore_to_ahv_is_swept_by_the_next(
        dr: Dr, tmp_path: Path, data_path: str,  # noqa: F811 - the imported fixture
        record_property: Record) -> None:
    await dr.backup()
    expect = dr.disks_now()
    site = _site(tmp_path)

    def args(name: str) -> list[str]:
        return ["restore", "--target", "ahv", "--vm", SRC, *dr.world.cli_args(
            iscsi_port=dr.iscsi_port, verbose=0, data_path=data_path, restore_vm_name=name,
            **ADMIN)]

    events = tmp_path / "events.jsonl"
    assert await _run(dr.world, site, *args("first"), KILL_EVENTS=str(events)) == 0
    # one kill per kind of step: the second disk's steps are the first one's again
    steps, kinds = [], set()
    for step, n, detail in (json.loads(line) for line in events.read_text().splitlines()):
        kind = (step, detail if step.startswith("resource") else "")
        if kind not in kinds:
            kinds.add(kind)
            steps.append((step, n))
    assert {name for name, _ in steps} >= {"resource_created", "disk_finished"}, steps
    made = ["vm first"]
    for step, n in steps:
        name = f"{step}-{n}".replace("_", "-")
        code = await _run(dr.world, site, *args(name), KILL_AT=f"{step}:{n}")
        assert code == -9, f"the kill at {step}:{n} did not happen (exit {code})"
        again = await trio.run_process([*CLI, *args(name)], capture_stdout=True,
                                       capture_stderr=True, check=False)
        if again.returncode == 2:  # the killed run had finished the VM: the name is taken
            assert b"already exists" in again.stderr, again.stderr.decode()
        else:
            assert again.returncode == 0, f"after a kill at {step}:{n}: {again.stderr.decode()}"
        made.append(f"vm {name}")
        assert dr.leftovers() == sorted(made), f"after a kill at {step}:{n}"
        assert dr.ledger() == []
        assert_disks(dr, restored(dr, name), expect,
                     container=dr.cluster(0).containers[0].uuid)
    record_property("killed", f"{len(steps)} steps of a restore to AHV over {data_path}: "
                    + ", ".join(f"{name}:{n}" for name, n in steps))
