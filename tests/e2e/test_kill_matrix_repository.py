"""A kill at every step of what rewrites the repository: consolidation (a chain becomes a
synthetic full in place) and retention (old backups removed after a backup). These steps touch
no cluster, so no hook marks them; the killer counts the process's own filesystem steps under
the repository (rename, replace, unlink, rmdir, mkdir, rmtree) and SIGKILLs the job just before
the N-th one, for every N a clean run takes.

After each kill: the next job sweeps what the killed one left (no `.partial-`, `.replaced-` or
`.removing-` folder stays), `verify --all` passes, the newest point restores byte-identical, and
the next consolidation (or backup) succeeds.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio
from tests.e2e.e2e_world import MiB, World, same_as_sim
from tests.e2e.test_kill_matrix import Record

from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.restore import RestoreJob, VerifyJob, pick_backup
from ahvbackup.core.jobs.runtime import Runtime

CLI = [sys.executable, "-m", "ahvbackup.core.cli"]
_KILLER = '''
import json, os, shutil, signal

_ROOT = os.environ.get("KILL_FS_ROOT", "")
_AT = int(os.environ.get("KILL_FS_AT", "0") or 0)
_LOG = os.environ.get("KILL_FS_LOG", "")
_n = 0


def _wrap(name, fn, owner):
    def step(path, *args, **kwargs):
        global _n
        if _ROOT and str(os.fspath(path)).startswith(_ROOT) and "dir_fd" not in kwargs:
            _n += 1
            if _LOG:
                with open(_LOG, "a") as f:
                    rel = os.path.relpath(os.fspath(path), _ROOT)
                    f.write(json.dumps([_n, name, rel]) + "\\n")
            if _n == _AT:
                os.kill(os.getpid(), signal.SIGKILL)
        return fn(path, *args, **kwargs)
    setattr(owner, name, step)


if _ROOT:
    for _name in ("rename", "replace", "unlink", "remove", "rmdir", "mkdir"):
        _wrap(_name, getattr(os, _name), os)
    _wrap("rmtree", shutil.rmtree, shutil)
'''


def _site(tmp: Path) -> Path:
    site = tmp / "fs-killer-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_KILLER)
    return site


async def _cli(site: Path, root: Path, *args: str, **env: str) -> int:
    paths = [str(site), os.environ.get("PYTHONPATH", "")]
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths)),
            "KILL_FS_ROOT": str(root), **env}
    done = await trio.run_process([*CLI, *args], env=full, capture_stdout=True,
                                  capture_stderr=True, check=False)
    return done.returncode


def _steps(log: Path) -> list[tuple[int, str, str]]:
    return [tuple(json.loads(line)) for line in log.read_text().splitlines()]  # type: ignore[misc]


def _no_debris(repo: Path) -> None:
    left = [p.name for p in repo.glob("*/.*")]
    assert left == [], left


async def _check(world: World, vm_uuid: str) -> None:
    """Every listed backup verifies, and the newest point is the VM's disks as they are."""
    rt = Runtime.from_config(world.config())
    for backup in await rt.sink.backups():
        verified = await VerifyJob(rt, backup).run()
        assert verified.ok, verified.to_json()
    newest = await pick_backup(rt, vm="k", backup_id=None)
    out = await RestoreJob(rt, newest, dest=world.tmp / "restored").run()
    assert out.ok and all(same_as_sim(world.sim, vm_uuid, i, Path(d.path))
                          for i, d in enumerate(out.disks))


async def _change_and_back_up(world: World, vm_uuid: str, n: int, **keys: str) -> None:
    world.sim.write_disk(vm_uuid, n % 2, (n % 6) * MiB, os.urandom(64 << 10))
    result = await BackupJob(Runtime.from_config(world.config(
        vm="k", level="incremental", **keys))).run()
    assert result.ok, result.to_json()


async def test_a_kill_at_every_step_of_a_consolidation(world: World, tmp_path: Path,
                                                       record_property: Record) -> None:
    vm = world.add_vm("k", [(8 * MiB, [(0, 2 * MiB)]), (8 * MiB, [(MiB, MiB)])])
    assert (await BackupJob(Runtime.from_config(world.config(vm="k"))).run()).ok
    site, repo, log = _site(tmp_path), world.tmp / "repo", tmp_path / "fs.jsonl"
    consolidate = ["consolidate", "--vm", "k", *world.cli_args()]
    for n in range(2):
        await _change_and_back_up(world, vm.uuid, n)
    assert await _cli(site, repo, *consolidate, KILL_FS_LOG=str(log)) == 0
    steps = _steps(log)
    assert {name for _, name, _ in steps} >= {"rename", "rmtree"}, steps
    for at, name, path in steps:
        for n in range(2):  # the same shape again: the synthetic full plus two incrementals
            await _change_and_back_up(world, vm.uuid, at * 2 + n)
        code = await _cli(site, repo, *consolidate, KILL_FS_AT=str(at))
        assert code == -9, f"the kill before step {at} ({name} {path}) did not happen ({code})"
        await _check(world, vm.uuid)
        assert await _cli(site, repo, *consolidate) == 0, f"after a kill before {name} {path}"
        _no_debris(repo)  # the next consolidation swept what the killed one left
        await _check(world, vm.uuid)
    record_property("killed", f"{len(steps)} repository steps of a consolidation: "
                    + ", ".join(f"{name} {path}" for _, name, path in steps))


async def test_a_kill_at_every_step_of_retention(world: World, tmp_path: Path,
                                                 record_property: Record) -> None:
    vm = world.add_vm("k", [(8 * MiB, [(0, MiB)]), (8 * MiB, [])])
    keys = {"keep_fulls": "1"}  # a new full lets the previous full and its deltas go
    assert (await BackupJob(Runtime.from_config(world.config(vm="k", **keys))).run()).ok
    site, repo, log = _site(tmp_path), world.tmp / "repo", tmp_path / "fs.jsonl"
    await _change_and_back_up(world, vm.uuid, 0, **keys)
    backup = ["backup", "--level", "full", *world.cli_args(vm="k", **keys)]
    assert await _cli(site, repo, *backup, KILL_FS_LOG=str(log)) == 0
    steps = [s for s in _steps(log) if s[1] in ("rename", "rmtree")]
    assert steps, "retention removed nothing"
    for at, name, path in steps:
        await _change_and_back_up(world, vm.uuid, at, **keys)
        code = await _cli(site, repo, *backup, KILL_FS_AT=str(at))
        assert code == -9, f"the kill before step {at} ({name} {path}) did not happen ({code})"
        await _check(world, vm.uuid)
        assert await _cli(site, repo, *backup) == 0, f"after a kill before {name} {path}"
        _no_debris(repo)  # the next backup swept what the killed one left
        await _check(world, vm.uuid)
    record_property("killed", f"{len(steps)} repository steps of retention: "
                    + ", ".join(f"{name} {path}" for _, name, path in steps))
