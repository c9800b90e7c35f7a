"""One-job chain restores through the metaplugin backend, played from the file daemon's side
(the conformance harness) against a served simulator: several backup jobs' files in one
restore session, in Bacula's order, not ours, restore the newest point received; a point in
the middle of the chain restores as that point; backups named before files were named per
backup still restore."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import trio
from harness import Backend, BackupFile
from test_bacula_jobs import cluster_name, opened, prism_params
from test_bacula_sink_stream import RecordingEmitter
from tests.e2e.e2e_world import MiB, World

from ahvbackup.bacula.sink import BaculaSink
from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.runtime import Runtime

Spawn = Callable[..., Backend]


async def backup(world: World, **keys: str) -> tuple[list[BackupFile], str]:
    """A backup job's files as the metaplugin sink hands them to the file daemon (the job
    runs in this process: the protocol itself is the harness tests' business)."""
    rt = Runtime.from_config(world.config(sink="bacula", **keys))
    emitter = RecordingEmitter()
    sink = rt.sink
    assert isinstance(sink, BaculaSink)
    sink.attach_emitter(emitter, path_of=lambda *p: "/@ahvbackup/" + "/".join(p),
                        messages=emitter)
    result = await BackupJob(rt).run()
    assert result.ok, result.to_json()
    files = [BackupFile(f.fname, f"F {len(f.data)} 0 0 100640 1", "0 0 0", f.data)
             for f in emitter.files]
    return files, json.loads(files[-1].data or b"")["backup_id"]


def restore_session(spawn: Spawn, params: list[str], where: Path,
                    files: list[BackupFile]) -> tuple[list[str], list[str]]:
    """One restore job offering `files`; (the answer to each file, the job-log messages)."""
    r = opened(spawn, params, kind="R", where=str(where))
    r.start("RestoreStart")
    answers = [r.restore(f"{where}{f.fname}", f.data).text for f in files]
    r.command("FINISH")
    r.expect_ack()
    said = [f"{p.kind} {p.text}" for p in r.messages]
    assert r.end() == 0
    return answers, said


async def test_the_newest_backup_and_its_chain_restore_in_one_job(
        world: World, spawn: Spawn, base_params: list[str], tmp_path: Path) -> None:
    size = 8 * MiB
    vm = world.add_vm("cvm", [(size, [(0, 2 * MiB)]), (2 * MiB, [(MiB, MiB)])])
    params = prism_params(world, base_params, vm="cvm", chunk_size_mib="1")

    def disks() -> list[bytes]:
        return [world.sim.read_disk(vm.uuid, 0, 0, size),
                world.sim.read_disk(vm.uuid, 1, 0, 2 * MiB)]

    points = []
    jobs = []
    for level, change in [("full", None), ("incremental", (6 * MiB, os.urandom(MiB))),
                          ("differential", (MiB, os.urandom(512 * 1024))),
                          ("incremental", (0, bytes(MiB)))]:
        if change is not None:
            world.sim.write_disk(vm.uuid, 0, *change)
        jobs.append(await backup(world, vm="cvm", level=level))
        points.append(disks())
    (full, f_id), (inc1, i1_id), (diff, d_id), (inc2, i2_id) = jobs
    # every backup's files are named apart: bconsole's "most recent" tree holds them all
    names = [f.fname for files, _ in jobs for f in files]
    assert len(set(names)) == len(names) == 12
    root = Path(f"@ahvbackup/{cluster_name(world)}/cvm")

    # most recent: the Full, the Differential and the Incremental after it. Bacula hands
    # them over in its own order (here the newest first), and an Incremental it did not
    # select (before the Differential) is in the job too: applied oldest to newest, each
    # range once, the stray one named and left out
    newest = tmp_path / "newest"
    offered = [*reversed(inc2), *diff, *inc1, *full]
    answers, said = await trio.to_thread.run_sync(restore_session, spawn, params, newest,
                                                  offered)
    assert answers == ["OK"] * len(offered)
    for i in range(2):
        assert (newest / root / f"scsi.{i}.raw").read_bytes() == points[3][i]
    assert any(f"chain {f_id}+{d_id}+{i2_id})" in m and "scsi.0.raw (incremental" in m
               for m in said), said
    assert sum(f"/{i1_id}/disks/" in m and "not applied" in m for m in said) == 2, said
    assert not any(m.startswith(("E ", "Q ")) for m in said), said
    assert not list((tmp_path / "work").glob("ahvbackup-restore-*")), "spool left behind"

    # the point in the middle: the Full and the first Incremental
    middle = tmp_path / "middle"
    _, said = await trio.to_thread.run_sync(restore_session, spawn, params, middle,
                                            [*full, *inc1])
    for i in range(2):
        assert (middle / root / f"scsi.{i}.raw").read_bytes() == points[1][i]

    # the newest Incremental without its chain, restored to a new VM: refused in one line
    # naming what is missing, nothing made (a raw target would apply it link by link)
    _, said = await trio.to_thread.run_sync(
        restore_session, spawn, [*params, "target_cluster=sim-cluster-1"], tmp_path / "lone",
        inc2)
    (err,) = [m for m in said if m.startswith("Q ")]
    assert f"needs backup {d_id}" in err and "most recent" in err, err
    assert "\n" not in err
    assert [v.name for v in world.sim.vms.values() if v.name.startswith("cvm-")] == []


async def test_a_backup_named_before_per_backup_folders_still_restores(
        world: World, spawn: Spawn, base_params: list[str], tmp_path: Path) -> None:
    vm = world.add_vm("ovm", [(4 * MiB, [(0, MiB), (3 * MiB, 512 * 1024)])])
    params = prism_params(world, base_params, vm="ovm")

    files, backup_id = await backup(world, vm="ovm")
    # as the backend named them before: <vm>/disks/<label>.ahvd and <vm>/vm.json
    old = [BackupFile(f.fname.replace(f"/{backup_id}/", "/"), f.stat, f.tstamp, f.data)
           for f in files]
    assert old[-1].fname.endswith("/ovm/vm.json")
    answers, said = await trio.to_thread.run_sync(restore_session, spawn, params,
                                                  tmp_path / "old", old)
    assert answers == ["OK", "OK"]
    image = tmp_path / "old" / "@ahvbackup" / cluster_name(world) / "ovm" / "scsi.0.raw"
    assert image.read_bytes() == world.sim.read_disk(vm.uuid, 0, 0, 4 * MiB)
    assert any("disk restored: " in m for m in said), said
