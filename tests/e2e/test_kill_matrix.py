"""A kill at every step: SIGKILL the backup at each lifecycle step in turn, then run the next
ordinary job. It must succeed, leave nothing on the cluster that the ledger knew (only the
snapshots kept as references), list no half backup, and keep the chain restorable.

The steps are not listed here: a first run records every hook event a job fires
(`resource_created` right after each ledger record, `resource_released`, `snapshot_created`,
`disk_started`, `disk_finished`, `vm_finished`), and the matrix kills at each of them. New
steps join the matrix by firing those hooks. The killer is a hook plugin installed for the
job's process only (a dist-info folder on PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from tests.e2e.e2e_world import MiB, World

from ahvbackup.hypervisors.ahv.simulator import Simulator, serve_simulator

CLI = [sys.executable, "-m", "ahvbackup.core.cli"]
#: pytest's record_property: the steps killed are listed at the end of the run (conftest.py)
Record = Callable[[str, object], None]
STEPS = ("resource_created", "resource_released", "snapshot_created", "disk_started",
         "disk_finished", "vm_finished")
_KILLER = '''
import json, os, signal
from ahvbackup.core import hookimpl

_AT = os.environ.get("KILL_AT", "")
_LOG = os.environ.get("KILL_EVENTS", "")
_seen = {}


def _step(name, detail):
    _seen[name] = _seen.get(name, 0) + 1
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(json.dumps([name, _seen[name], detail]) + "\\n")
    if _AT == f"{name}:{_seen[name]}":
        os.kill(os.getpid(), getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL")))


@hookimpl
def ahvbackup_resource_created(kind, resource_id, owner):
    _step("resource_created", kind)


@hookimpl
def ahvbackup_resource_released(kind, resource_id, owner, ok):
    _step("resource_released", kind)


@hookimpl
def ahvbackup_snapshot_created(job_id, vm_uuid, snapshot_id, consistency):
    _step("snapshot_created", "")


@hookimpl
def ahvbackup_disk_started(job_id, vm_name, disk, size):
    _step("disk_started", disk)


@hookimpl
def ahvbackup_disk_finished(job_id, vm_name, disk, ok, bytes_read, bytes_stored):
    _step("disk_finished", disk)


@hookimpl
def ahvbackup_vm_finished(job_id, vm_uuid, vm_name, ok, bytes_stored, error):
    _step("vm_finished", vm_name)
'''


def _site(tmp: Path) -> Path:
    site = tmp / "killer-site"
    info = site / "killmatrix-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: killmatrix\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[ahvbackup.hooks]\nkiller = killmatrix_hooks\n")
    (site / "killmatrix_hooks.py").write_text(_KILLER)
    return site


class Exit(int):
    """A job's exit code that shows the end of its stderr in a failed assertion."""

    stderr: str = ""

    def __repr__(self) -> str:
        return f"{int(self)} (stderr: ...{self.stderr[-1500:]})"


async def _run(world: World, site: Path, *args: str, **env: str) -> Exit:
    paths = [str(site), os.environ.get("PYTHONPATH", "")]
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths)), **env}
    done = await trio.run_process([*CLI, *args], env=full, capture_stdout=True,
                                  capture_stderr=True, check=False)
    code = Exit(done.returncode)
    code.stderr = done.stderr.decode(errors="replace")
    return code


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def _served(tmp: Path, *, iscsi: bool) -> AsyncIterator[tuple[World, list[str]]]:
    sim = Simulator(tmp / "sim", seed=True, task_seconds=0.01, sync=False)
    try:
        async with serve_simulator(sim, port=0, tls=True, iscsi_port=0, iscsi=iscsi) as ep:
            assert ep.ca_path is not None
            port = next(iter(ep.iscsi_portals.values()))[1] if iscsi else _free_port()
            world = World(sim=sim, pc=ep.pc_url.split("://", 1)[1], ca=ep.ca_path, tmp=tmp)
            yield world, ["-o", f"iscsi_port={port}"]
    finally:
        sim.close()


def _left_only_references(world: World) -> None:
    state = [json.loads(p.read_text()) for p in (world.tmp / "state").glob("*/state.json")]
    kept = {d[k] for s in state for d in s["disks"].values()
            for k in ("snapshot_id", "full_snapshot_id") if d.get(k)}
    assert set(world.sim.snapshots) == kept, (set(world.sim.snapshots), kept)
    assert world.sim.images == {}
    assert world.sim.volume_groups.groups == {}
    assert not list((world.tmp / "state" / "ledger").glob("*.json"))
    assert not list((world.tmp / "repo").glob("*/.partial-*"))


# a REST full fires the same steps as the REST incremental killed here (7, in the same order)
@pytest.mark.parametrize(("data_path", "level"), [("iscsi", "full"), ("rest", "incremental")])
async def test_a_kill_at_every_step_is_cleaned_up_by_the_next_run(
        tmp_path: Path, data_path: str, level: str, record_property: Record) -> None:
    await _matrix(tmp_path, data_path, level, signals=("SIGKILL",), record=record_property)


async def test_sigterm_and_ctrl_c_at_every_step_release_before_exit(
        tmp_path: Path, record_property: Record) -> None:
    """SIGTERM and SIGINT in turn, one at each step: the job itself releases what it made
    (checked before any next run) and exits 143 or 130."""
    await _matrix(tmp_path, "iscsi", "full", signals=("SIGTERM", "SIGINT"),
                  record=record_property)


async def _matrix(tmp_path: Path, data_path: str, level: str, *,
                  signals: tuple[str, ...], record: Record) -> None:
    site = _site(tmp_path)
    async with _served(tmp_path, iscsi=data_path == "iscsi") as (world, extra):
        world.add_vm("k", [(4 * MiB, [(0, MiB)])])
        args = ["backup", *world.cli_args(vm="k", data_path=data_path, chunk_size_mib=1), *extra]
        if level == "incremental":  # a reference to build on
            assert await _run(world, site, *args) == 0
        args += ["-o", f"level={level}"]
        events = tmp_path / "events.jsonl"
        assert await _run(world, site, *args, KILL_EVENTS=str(events)) == 0
        steps = [tuple(json.loads(line)[:2]) for line in events.read_text().splitlines()]
        assert {name for name, _ in steps} >= {"resource_created", "snapshot_created",
                                              "disk_finished"}
        killed = []
        for i, (name, n) in enumerate(steps):
            vm_uuid = next(v.uuid for v in world.sim.vms.values() if v.name == "k")
            world.sim.write_disk(vm_uuid, 0, (n % 4) * MiB, os.urandom(4096))  # a change
            sig = signals[i % len(signals)]
            code = await _run(world, site, *args, KILL_AT=f"{name}:{n}", KILL_SIGNAL=sig)
            want = {"SIGKILL": -9, "SIGTERM": 143, "SIGINT": 130}[sig]
            assert code == want, f"the {sig} at {name}:{n} did not end the job (exit {code!r})"
            if sig != "SIGKILL":  # the job released what it made before it exited
                _left_only_references(world)
            killed.append(f"{sig}@{name}:{n}")
            assert await _run(world, site, *args) == 0, f"the run after a kill at {name}:{n}"
            _left_only_references(world)
        verified = await trio.run_process([*CLI, "verify", "--all", *world.cli_args()],
                                          capture_stdout=True, capture_stderr=True, check=False)
        assert verified.returncode == 0, verified.stdout.decode()[-2000:]
        record("killed", f"{len(killed)} steps ({data_path} {level}): {', '.join(killed)}")
