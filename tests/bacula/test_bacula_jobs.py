"""The metaplugin backend's real handlers against a served Prism simulator, played from the
file daemon's side over pipes (the conformance harness): backup, estimate, restore byte for
byte, a missing VM, and cancel by SIGUSR1 releasing what the job held on the cluster."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import trio
from harness import Backend, job_fields
from tests.e2e.e2e_world import MiB, World, same_as_sim

Spawn = Callable[..., Backend]


def prism_params(world: World, base: list[str], **extra: str) -> list[str]:
    keys = {"prism_central": world.pc, "user": "backup", "password": "backup/4u",
            "prism_ca_cert": str(world.ca), "prism_rate_rpm": "100000", **extra}
    return [*base, *(f"{k}={v}" for k, v in keys.items())]


def opened(spawn: Spawn, params: list[str], kind: str = "B", **job: object) -> Backend:
    b = spawn(handlers=None)  # the built-in job handlers
    b.hello()
    b.job(**job_fields(kind, **job))
    answer = b.params(params)
    assert answer.kind == "F", f"Params refused: {answer!r}"
    return b


def cluster_name(world: World) -> str:
    return next(iter(world.sim.clusters.values())).name


async def test_backup_then_restore_through_the_protocol_is_byte_identical(
        world: World, spawn: Spawn, base_params: list[str], tmp_path: Path) -> None:
    vm = world.add_vm("bvm", [(8 * MiB, [(0, MiB), (5 * MiB, 512 * 1024)]), (4 * MiB, [])])
    params = prism_params(world, base_params, vm="bvm", chunk_size_mib="1")
    where = tmp_path / "restore"
    root = f"/@ahvbackup/{cluster_name(world)}/bvm"

    def scenario() -> tuple[list, list, list]:
        b = opened(spawn, params)
        b.start("BackupStart")
        files = b.files(data=True)
        backup_messages = [p.text for p in b.messages]
        assert b.end() == 0

        r = opened(spawn, params, kind="R", where=str(where))
        r.start("RestoreStart")
        answers = [r.restore(f"{where}{f.fname}", f.data) for f in files]
        r.command("FINISH")
        r.expect_ack()
        restore_messages = [p.text for p in r.messages]
        assert r.end() == 0
        return files, answers, backup_messages + restore_messages

    files, answers, messages = await trio.to_thread.run_sync(scenario)
    manifest = json.loads(files[-1].data or b"")
    # each backup's files under its own folder; disks in the order they were read
    # (concurrently), vm.json last: the VM is complete
    here = f"{root}/{manifest['backup_id']}"
    assert sorted(f.fname for f in files[:2]) == [f"{here}/disks/scsi.0.ahvd",
                                                  f"{here}/disks/scsi.1.ahvd"]
    assert files[2].fname == f"{here}/vm.json"
    for f in files:
        assert f.error is None
        assert f.stat.split()[:2] == ["F", str(len(f.data or b""))], f.fname  # exact size
    assert manifest["vm"]["uuid"] == vm.uuid
    assert [d["label"] for d in manifest["disks"]] == ["scsi.0", "scsi.1"]
    assert any(m.startswith("VM backed up: vm=bvm") for m in messages), messages
    assert [a.text for a in answers] == ["OK", "OK", "OK"]
    for i in range(2):
        image = where / root.lstrip("/") / f"scsi.{i}.raw"
        assert same_as_sim(world.sim, vm.uuid, i, image), image
    assert json.loads((where / here.lstrip("/") / "vm.json").read_text()) == manifest
    # only the snapshot kept as the next incremental's reference stays on the cluster
    assert list(world.sim.snapshots) == [manifest["snapshot"]["id"]]
    assert world.sim.images == {}
    assert not list((tmp_path / "work").glob("ahvbackup-spool-*/*")), "spool left behind"


async def test_a_damaged_stream_is_refused_and_leaves_no_image(
        world: World, spawn: Spawn, base_params: list[str], tmp_path: Path) -> None:
    world.add_vm("dvm", [(4 * MiB, [(0, 2 * MiB)])])
    params = prism_params(world, base_params, vm="dvm")
    where = tmp_path / "restore"

    def scenario() -> tuple[str, str]:
        b = opened(spawn, params)
        b.start("BackupStart")
        disk = b.files(data=True)[0]
        assert b.end() == 0
        assert disk.data is not None
        cut = disk.data[: len(disk.data) - 100]  # the trailer is missing
        r = opened(spawn, params, kind="R", where=str(where))
        r.start("RestoreStart")
        answer = r.restore(f"{where}{disk.fname}", cut)
        r.command("FINISH")
        r.expect_ack()
        assert r.end() == 0
        return answer.kind, answer.text

    kind, text = await trio.to_thread.run_sync(scenario)
    assert kind == "E"
    assert "truncated" in text
    assert not list(where.rglob("*.raw")), "a half-restored image was left"


async def test_estimate_sizes_files_by_what_a_backup_would_read(
        world: World, spawn: Spawn, base_params: list[str]) -> None:
    world.add_vm("evm", [(16 * MiB, [(0, 3 * MiB)]), (4 * MiB, [])])
    params = prism_params(world, base_params, vm="evm", keep_fulls="2")

    def scenario() -> tuple[list, list[str]]:
        b = opened(spawn, params, kind="E")
        b.start("EstimateStart")
        files = b.files(data=False)
        warnings = [p.text for p in b.messages if p.kind == "W"]
        assert b.end() == 0
        return files, warnings

    files, warnings = await trio.to_thread.run_sync(scenario)
    assert any(w.startswith("keep_fulls/keep_days do not apply to Bacula") for w in warnings)
    sizes = {f.fname.rsplit("/", 1)[1]: int(f.stat.split()[1]) for f in files}
    assert sizes["scsi.0.ahvd"] == 3 * MiB
    assert sizes["scsi.1.ahvd"] == 0
    assert "vm.json" in sizes


async def test_no_matching_vm_fails_the_job_naming_the_selection(
        world: World, spawn: Spawn, base_params: list[str]) -> None:
    params = prism_params(world, base_params, vm="no-such-vm")

    def scenario() -> tuple[str, str]:
        b = opened(spawn, params)
        b.start("BackupStart")
        answer = b.receive()
        assert b.end() == 0
        return answer.kind, answer.text

    kind, text = await trio.to_thread.run_sync(scenario)
    assert kind == "A"
    assert "'no-such-vm' selects no VM" in text


async def test_sigusr1_cancels_and_releases_the_snapshot_and_image(
        world: World, spawn: Spawn, base_params: list[str]) -> None:
    world.add_vm("slow", [(64 * MiB, [(0, 32 * MiB)])])
    world.sim.faults.add(method="GET", path=r"/images/.*/file", latency=0.5, count=10_000)
    params = prism_params(world, base_params, vm="slow")

    def scenario() -> tuple[int, float]:
        b = opened(spawn, params)
        b.start("BackupStart")
        deadline = time.monotonic() + 30
        while not world.sim.images:  # the disk is staged and being read
            assert time.monotonic() < deadline, "the backup never staged its disk"
            time.sleep(0.05)
        time.sleep(0.3)
        t0 = time.monotonic()
        b.signal(signal.SIGUSR1)
        code = b.wait(30)
        b.check_stderr()
        return code, time.monotonic() - t0

    code, seconds = await trio.to_thread.run_sync(scenario)
    assert code == 0
    assert seconds < 10
    assert world.sim.snapshots == {} and world.sim.images == {}


async def test_full_then_incremental_restore_both_points_byte_identical(
        world: World, spawn: Spawn, base_params: list[str], tmp_path: Path) -> None:
    size = 8 * MiB
    vm = world.add_vm("ivm", [(size, [(0, 2 * MiB)]), (4 * MiB, [(MiB, MiB)])])
    params = prism_params(world, base_params, vm="ivm")
    point1 = [world.sim.read_disk(vm.uuid, 0, 0, size), world.sim.read_disk(vm.uuid, 1, 0, 4 * MiB)]

    def backup(level: str) -> tuple[list, list[str]]:
        b = opened(spawn, params, level=level)
        b.start("BackupStart")
        files = b.files(data=True)
        messages = [p.text for p in b.messages]
        assert b.end() == 0
        return files, messages

    def restore(where: Path, jobs: list[list]) -> list[str]:
        said = []
        for files in jobs:  # one restore job per backup job, oldest first
            r = opened(spawn, params, kind="R", where=str(where))
            r.start("RestoreStart")
            for f in files:
                answer = r.restore(f"{where}{f.fname}", f.data)
                assert answer.text == "OK", answer
            r.command("FINISH")
            r.expect_ack()
            said += [p.text for p in r.messages]
            assert r.end() == 0
        return said

    full, _ = await trio.to_thread.run_sync(backup, "F")
    world.sim.write_disk(vm.uuid, 0, 6 * MiB, b"\x5a" * MiB)  # new data
    world.sim.write_disk(vm.uuid, 0, 0, bytes(512 * 1024))  # zeroed
    inc, said = await trio.to_thread.run_sync(backup, "I")
    manifest = json.loads(inc[-1].data or b"")
    assert [d["kind"] for d in manifest["disks"]] == ["incremental", "incremental"]
    assert any("disks=scsi.0:incremental" in m or "scsi.0:incremental" in m for m in said), said
    # the incremental carries about the change only, not the disk
    inc_disk0 = next(f for f in inc if f.fname.endswith("scsi.0.ahvd"))
    assert len(inc_disk0.data or b"") < 2 * MiB

    root = f"@ahvbackup/{cluster_name(world)}/ivm"
    at1, at2 = tmp_path / "at1", tmp_path / "at2"
    await trio.to_thread.run_sync(restore, at1, [full])
    said = await trio.to_thread.run_sync(restore, at2, [full, inc])
    for i in range(2):
        assert (at1 / root / f"scsi.{i}.raw").read_bytes() == point1[i]
        assert same_as_sim(world.sim, vm.uuid, i, at2 / root / f"scsi.{i}.raw")
    assert any("(incremental" in m for m in said), said

    def lone() -> tuple[str, list[str]]:  # the incremental alone, into an empty where
        at3 = tmp_path / "at3"
        r = opened(spawn, params, kind="R", where=str(at3))
        r.start("RestoreStart")
        answer = r.restore(f"{at3}{inc_disk0.fname}", inc_disk0.data)
        r.command("FINISH")
        r.expect_ack()
        said = [f"{p.kind} {p.text}" for p in r.messages]
        assert r.end() == 0
        return answer.text, said

    answer, said = await trio.to_thread.run_sync(lone)
    assert answer == "OK"  # received whole; applied (and refused) once every file is in
    assert any(m.startswith("Q ") and "has no restored full to apply it to" in m
               for m in said), said
    assert not list((tmp_path / "at3").rglob("*.raw"))


async def test_listing_shows_clusters_then_their_vms(world: World, spawn: Spawn,
                                                     base_params: list[str]) -> None:
    world.add_vm("lvm-a", [(MiB, [])])
    world.add_vm("lvm-b", [(MiB, [])])
    cluster = cluster_name(world)

    def listing(path: str) -> list[str]:
        b = opened(spawn, [*prism_params(world, base_params, vm="lvm-*"), f"listing={path}"],
                   kind="E")
        b.start("ListingStart")
        files = b.files(data=False)
        assert b.end() == 0
        return [f.fname for f in files]

    top = await trio.to_thread.run_sync(listing, "/")
    vms = await trio.to_thread.run_sync(listing, f"/@ahvbackup/{cluster}")
    assert top == [f"/@ahvbackup/{cluster}/"]
    assert sorted(vms) == [f"/@ahvbackup/{cluster}/lvm-a/", f"/@ahvbackup/{cluster}/lvm-b/"]


async def test_restore_refuses_an_fname_that_climbs_out_of_where(
        world: World, spawn: Spawn, base_params: list[str], tmp_path: Path) -> None:
    world.add_vm("tvm", [(2 * MiB, [(0, MiB)])])
    params = prism_params(world, base_params, vm="tvm")
    where = tmp_path / "w" / "restore"

    def scenario() -> list[str]:
        b = opened(spawn, params)
        b.start("BackupStart")
        disk = b.files(data=True)[0]
        assert b.end() == 0
        r = opened(spawn, params, kind="R", where=str(where))
        r.start("RestoreStart")
        hostile = [f"{where}/@ahvbackup/../../../../escaped/v/disks/scsi.0.ahvd",
                   f"{where}/../escaped/v/disks/scsi.0.ahvd",
                   f"{where}/@ahvbackup/c/v/../../../x.json"]
        answers = [r.restore(fname, disk.data).text for fname in hostile]
        r.command("FINISH")
        r.expect_ack()
        assert r.end() == 0
        return answers + [m.text for m in r.messages]

    said = await trio.to_thread.run_sync(scenario)
    assert said[:3] == ["SKIP", "SKIP", "SKIP"], said  # each refused alone, the job goes on
    assert sum("not a plain file name" in m and "refused" in m for m in said[3:]) == 3, said
    assert list(tmp_path.rglob("escaped")) == [] and list(tmp_path.rglob("x.json")) == []
    assert list(tmp_path.rglob("*.raw")) == []


async def test_restore_disks_only_by_position_picks_the_disk_from_vm_json(
        world: World, spawn: Spawn, base_params: list[str], tmp_path: Path) -> None:
    vm = world.add_vm("pvm", [(2 * MiB, [(0, MiB)]), (2 * MiB, [(MiB, MiB)])])
    params = prism_params(world, base_params, vm="pvm")
    where = tmp_path / "restore"

    def scenario() -> list[str]:
        b = opened(spawn, params)
        b.start("BackupStart")
        files = b.files(data=True)
        assert b.end() == 0
        r = opened(spawn, [*params, "restore_disks_only=disk-1"], kind="R", where=str(where))
        r.start("RestoreStart")
        answers = [r.restore(f"{where}{f.fname}", f.data).text for f in files]
        r.command("FINISH")
        r.expect_ack()
        assert r.end() == 0
        return answers

    answers = await trio.to_thread.run_sync(scenario)
    assert answers == ["OK", "OK", "OK"]  # disk-N is the Nth disk of vm.json, known at FINISH
    images = list(where.rglob("*.raw"))
    assert [p.name for p in images] == ["scsi.1.raw"]
    assert same_as_sim(world.sim, vm.uuid, 1, images[0])
