"""One configuration, four ways in: a driver key (the ahv driver's ``iscsi_port``) and a hook
plugin's key behave the same from ``-o``, ``--plugin-string``, a metaplugin ``Params`` block
(this harness plays the file daemon) and a bpipe command line. Also: a third-party plugin
that fails to import is named in a warning and breaks nothing else, and ``mode=`` picks the
job through the metaplugin backend."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from harness import HERE, Backend, job_fields
from tests.e2e.e2e_world import MiB, World, same_as_sim

from ahvbackup.hypervisors.ahv.simulator import Simulator, serve_simulator

AHVBACKUP = Path(sys.executable).with_name("ahvbackup")
Spawn = Callable[..., Backend]

#: a third-party distribution: a hook plugin with a key of its own, and a target driver that
#: raises on import
_PLUGIN = '''
from ahvbackup.core import hookimpl
from ahvbackup.core.config.fields import Int

@hookimpl
def ahvbackup_config_fields():
    return {"walk_tag": Int(minimum=1, load_default=1)}
'''
_ENTRY_POINTS = """[ahvbackup.hooks]
walkhooks = walkplug_hooks
brokenhooks = walkplug_missing_module

[ahvbackup.target]
brokentarget = walkplug_broken:BrokenTarget
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A folder to put on PYTHONPATH that installs the third-party distribution."""
    root = tmp_path / "site"
    info = root / "walkplug-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: walkplug\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(_ENTRY_POINTS)
    (root / "walkplug_hooks.py").write_text(_PLUGIN)
    (root / "walkplug_broken.py").write_text(
        'raise ImportError("walkplug_broken is broken on purpose")\n')
    return root


@dataclass
class Served:
    world: World
    iscsi_port: int
    site: Path

    def keys(self, **extra: object) -> dict[str, str]:
        keys = self.world.overrides(**extra)
        keys.pop("repository")  # the Bacula paths keep no repository
        return keys

    def env(self) -> dict[str, str]:
        paths = [str(self.site), str(HERE), os.environ.get("PYTHONPATH", "")]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}

    async def run(self, *args: str) -> Ran:
        """The ahvbackup program, in a thread (this test's event loop serves the simulator)."""
        done = await trio.to_thread.run_sync(lambda: subprocess.run(
            [str(AHVBACKUP), *args], capture_output=True, timeout=120, check=False,
            env=self.env()))
        return Ran(done.returncode, done.stdout, done.stderr.decode(errors="replace"))


@dataclass
class Ran:
    returncode: int
    stdout: bytes  # a bpipe reader's stream
    stderr: str


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def served(tmp_path: Path, site: Path) -> AsyncIterator[Served]:
    sim = Simulator(tmp_path / "sim", seed=True, task_seconds=0.05, sync=False)
    try:
        async with serve_simulator(sim, port=0, tls=True, iscsi_port=0) as ep:
            assert ep.ca_path is not None
            ((_host, port),) = set(ep.iscsi_portals.values())
            world = World(sim=sim, pc=ep.pc_url.split("://", 1)[1], ca=ep.ca_path,
                          tmp=tmp_path)
            world.add_vm("pvm", [(2 * MiB, [(0, MiB)])])
            yield Served(world, port, site)
    finally:
        sim.close()


def _conf(served: Served, path: Path) -> Path:
    text = "".join(f'{k} = "{v}"\n' for k, v in served.keys().items())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


# the four ways in ------------------------------------------------------------------------------

@dataclass
class Outcome:
    ok: bool
    text: str  # what the operator reads: stderr, or the job's messages


async def by_option(served: Served, keys: dict[str, str]) -> Outcome:
    sets = [a for k, v in {**served.keys(), **keys}.items() for a in ("-o", f"{k}={v}")]
    done = await served.run("backup", "-o", "vm=pvm", "-o", f"repository={served.world.tmp}/r",
                            *sets)
    return Outcome(done.returncode == 0, done.stderr)


async def by_plugin_string(served: Served, keys: dict[str, str]) -> Outcome:
    sets = [a for k, v in served.keys().items() for a in ("-o", f"{k}={v}")]
    body = " ".join(f"{k}={v}" for k, v in keys.items())
    done = await served.run("backup", "--plugin-string", f"ahvbackup: vm=pvm {body}",
                            "-o", f"repository={served.world.tmp}/r", *sets)
    return Outcome(done.returncode == 0, done.stderr)


async def by_params(served: Served, keys: dict[str, str]) -> Outcome:
    params = [f"{k}={v}" for k, v in {**served.keys(vm="pvm"), **keys}.items()]

    def session() -> Outcome:
        b = Backend.spawn(handlers=None, env={"PYTHONPATH": served.env()["PYTHONPATH"]})
        try:
            b.hello()
            b.job(**job_fields("B"))
            answer = b.params(params)
            if answer.kind != "F":
                return Outcome(False, answer.text)
            b.start("BackupStart")
            files = b.files(data=True)
            errors = [p.text for p in b.messages if p.kind in "EA"]
            assert b.end() == 0
            return Outcome(not errors and len(files) == 2, "\n".join(errors))
        finally:
            b.kill()

    return await trio.to_thread.run_sync(session)


async def by_bpipe(served: Served, keys: dict[str, str]) -> Outcome:
    conf = _conf(served, served.world.tmp / "bpipe.conf")
    sets = [a for k, v in keys.items() for a in ("-o", f"{k}={v}")]
    done = await served.run("bpipe", "backup", "-c", str(conf), "--vm", "pvm", "--disk",
                            "scsi.0", *sets)
    return Outcome(done.returncode == 0 and len(done.stdout) > MiB // 2, done.stderr)


WAYS = {"option": by_option, "plugin_string": by_plugin_string, "params": by_params,
        "bpipe": by_bpipe}


@pytest.mark.parametrize("way", sorted(WAYS))
async def test_a_driver_key_and_a_hook_plugin_key_work_the_same_every_way(
        served: Served, way: str) -> None:
    run = WAYS[way]
    good = {"data_path": "iscsi", "iscsi_port": str(served.iscsi_port), "walk_tag": "5"}
    ok = await run(served, good)
    assert ok.ok, ok.text
    # the driver reads its key: pointed at a port where nothing listens, the iSCSI read fails
    nowhere = _unused_port()
    wrong = await run(served, {**good, "iscsi_port": str(nowhere)})
    assert not wrong.ok, wrong.text
    # the job log of a Bacula job says which VM failed; the command line says where it looked
    assert f":{nowhere}" in wrong.text or "VM pvm: backup failed" in wrong.text, wrong.text
    # the hook plugin's key is checked by its own field, with the one-line error of ours
    bad = await run(served, {**good, "walk_tag": "0"})
    assert not bad.ok
    assert "walk_tag: must be a positive whole number (got '0')" in bad.text, bad.text
    for outcome in (ok, wrong, bad):
        assert "unknown key" not in outcome.text, outcome.text


async def test_a_plugin_that_fails_to_import_is_named_and_breaks_only_what_needs_it(
        served: Served, tmp_path: Path) -> None:
    sets = [a for k, v in served.world.overrides(vm="pvm").items() for a in ("-o", f"{k}={v}")]
    backup = await served.run("backup", *sets)
    assert backup.returncode == 0, backup.stderr
    warning = next(line for line in backup.stderr.splitlines() if "brokentarget" in line)
    assert "failed to load" in warning and "broken on purpose" in warning, warning
    hook = next(line for line in backup.stderr.splitlines() if "brokenhooks" in line)
    assert "failed to load" in hook and "walkplug_missing_module" in hook, hook

    restore = await served.run("restore", "--vm", "pvm", "--dest", str(tmp_path / "out"),
                               "-o", "target=brokentarget", *sets)
    assert restore.returncode == 2, restore.stderr
    assert ("target: driver 'brokentarget' is installed but failed to load"
            in restore.stderr), restore.stderr
    assert "Traceback" not in restore.stderr
    plain = await served.run("restore", "--vm", "pvm", "--dest", str(tmp_path / "out"), *sets)
    assert plain.returncode == 0, plain.stderr


def _opened(spawn: Spawn, params: list[str], kind: str, **job: object) -> tuple[Backend, object]:
    b = spawn(handlers=None)
    b.hello()
    b.job(**job_fields(kind, **job))
    return b, b.params(params)


async def test_mode_restore_in_a_plugin_string_restores_through_the_backend(
        served: Served, spawn: Spawn, base_params: list[str], tmp_path: Path) -> None:
    world = served.world
    vm = next(v for v in world.sim.vms.values() if v.name == "pvm")
    keys = {k: v for k, v in served.keys(vm="pvm").items()
            if k not in {"state_dir", "working_dir", "debug_log", "verbose"}}
    params = [*base_params, *(f"{k}={v}" for k, v in keys.items())]
    where = tmp_path / "restore"

    def scenario() -> tuple[str, str, list[str]]:
        wrong, answer = _opened(spawn, [*params, "mode=restore"], "B")
        refused = f"{answer.kind}: {answer.text}"  # type: ignore[attr-defined]
        wrong.terminate()

        b, answer = _opened(spawn, params, "B")
        assert answer.kind == "F", answer  # type: ignore[attr-defined]
        b.start("BackupStart")
        files = b.files(data=True)
        assert b.end() == 0

        r, answer = _opened(spawn, [*params, "mode=restore"], "R", where=str(where))
        assert answer.kind == "F", answer  # type: ignore[attr-defined]
        r.start("RestoreStart")
        answers = [r.restore(f"{where}{f.fname}", f.data).text for f in files]
        r.command("FINISH")
        r.expect_ack()
        assert r.end() == 0

        d, answer = _opened(spawn, [*params, "mode=failover-test"], "R", where=str(where))
        dr = f"{answer.kind}: {answer.text}"  # type: ignore[attr-defined]
        d.terminate()
        return refused, dr, answers

    refused, dr, answers = await trio.to_thread.run_sync(scenario)
    assert refused == ("E: plugin string: mode: 'restore' disagrees with a Bacula Backup job, "
                       "which runs backup or estimate")
    assert dr.startswith("E: plugin string: mode: failover-test (")
    assert dr.endswith("this version does not do that yet")
    assert answers == ["OK", "OK"]
    images = list(where.rglob("scsi.0.raw"))
    assert len(images) == 1 and same_as_sim(world.sim, vm.uuid, 0, images[0])


def test_vm_keys_for_a_file_target_fail_a_bacula_job_before_anything_is_touched(
        spawn: Spawn, base_params: list[str], tmp_path: Path) -> None:
    b = spawn()
    b.hello()
    b.job(**job_fields("R", where=str(tmp_path / "w")))
    answer = b.params([*base_params, "mode=restore", "target=raw", "target_cluster=dr-01",
                       "power_on=yes"])
    assert answer.kind == "E"
    assert answer.text.split("; ") == [  # a job log message is one line
        "plugin string: target_cluster: shapes the VM a restore creates on a cluster "
        "(target=ahv), but target=raw writes disk images",
        "plugin string: power_on: shapes the VM a restore creates on a cluster (target=ahv), "
        "but target=raw writes disk images",
    ]
    b.command("RestoreStart")
    refused = b.receive()
    assert refused.kind == "A" and "the parameters were refused" in refused.text
    assert not (tmp_path / "w").exists()
