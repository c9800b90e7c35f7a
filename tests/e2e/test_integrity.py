"""Integrity and containment, tried as a hostile or careless operator would: VM names that
climb out of the restore folder, planted symlinks, and manifests edited by hand. A restore
either writes the exact bytes of the point, strictly inside its destination, or refuses."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.e2e_world import MiB, World

from ahvbackup.core.errors import AhvBackupError, StreamFormatError
from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.restore import RestoreJob, pick_backup
from ahvbackup.core.jobs.runtime import Runtime

CLI = [sys.executable, "-m", "ahvbackup.core.cli"]
Doc = dict[str, Any]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120,
                          check=False)


async def _backup(world: World, vm: str, level: str = "full") -> str:
    rt = Runtime.from_config(world.config(vm=vm, level=level, chunk_size_mib=1))
    result = await BackupJob(rt).run()
    assert result.ok, result.failed
    return str(result.vms[0].backup_id)


def _disk(world: World, vm_uuid: str, index: int) -> bytes:
    size = world.sim.vms[vm_uuid].data_disks[index].size
    return world.sim.read_disk(vm_uuid, index, 0, size)


# containment ---------------------------------------------------------------------------------

async def test_hostile_vm_names_restore_strictly_inside_dest(world: World) -> None:
    names = ["../../../../tmp/x", "/tmp/abs", "nul\x00name", "n" * 300, "__/tmp/x"]
    vms = [world.add_vm(n, [(2 * MiB, [(0, MiB)])]) for n in names]
    for vm in vms:
        await _backup(world, vm.uuid)
    dest = world.tmp / "dest"
    seen = set()
    for vm in vms:
        rt = Runtime.from_config(world.config())
        out = await RestoreJob(rt, await pick_backup(rt, vm=vm.uuid, backup_id=None),
                               dest=dest).run()
        assert out.ok, [d.error for d in out.disks]
        path = Path(out.disks[0].path)
        assert path.resolve().parent.parent == dest.resolve(), path
        assert path.read_bytes() == _disk(world, vm.uuid, 0)
        seen.add(path)
    assert len(seen) == len(vms)  # ../x and __/x are different VMs: different folders
    assert sorted(p.name for p in world.tmp.iterdir() if p.name in {"tmp", "abs"}) == []
    assert not Path("/tmp/tmp/x").exists() and not Path("/tmp/abs/scsi.0.raw").exists()


async def test_a_symlink_planted_in_dest_is_never_written_through(world: World) -> None:
    vm = world.add_vm("web", [(2 * MiB, [(0, MiB)])])
    await _backup(world, "web")
    outside = world.tmp / "outside"
    outside.mkdir()
    (outside / "scsi.0.raw").write_bytes(b"precious")
    rt = Runtime.from_config(world.config())
    backup = await pick_backup(rt, vm=vm.uuid, backup_id=None)
    linked = world.tmp / "linked"
    linked.mkdir()
    (linked / "web").symlink_to(outside)  # the VM's folder is a link: refused
    out = await RestoreJob(rt, backup, dest=linked).run()
    assert not out.ok and "symlink" in (out.disks[0].error or "")
    dest = world.tmp / "dest"  # the image itself is a link: replaced, never written through
    (dest / "web").mkdir(parents=True)
    (dest / "web" / "scsi.0.raw").symlink_to(outside / "scsi.0.raw")
    out = await RestoreJob(rt, backup, dest=dest).run()
    assert out.ok, [d.error for d in out.disks]
    image = dest / "web" / "scsi.0.raw"
    assert not image.is_symlink() and image.read_bytes() == _disk(world, vm.uuid, 0)
    assert (outside / "scsi.0.raw").read_bytes() == b"precious"
    assert sorted(p.name for p in outside.iterdir()) == ["scsi.0.raw"]


# the manifest bound to its streams -----------------------------------------------------------

def _resign(doc: Doc) -> None:
    """What a deliberate editor would do: recompute the manifest's own digest."""
    body = {k: v for k, v in doc.items() if k != "digest"}
    doc["digest"] = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _manifest_path(world: World, vm_uuid: str, backup_id: str) -> Path:
    return world.tmp / "repo" / vm_uuid / backup_id / "manifest.json"


def _drop_ref(doc: Doc) -> None:
    del doc["disks"][0]["reference_backup"]


def _drop_ref_and_kind(doc: Doc) -> None:
    del doc["disks"][0]["reference_backup"]
    del doc["disks"][0]["kind"]


def _kind_full(doc: Doc) -> None:
    doc["disks"][0]["kind"] = "full"


def _drop_disk(doc: Doc) -> None:
    del doc["disks"][1]


def _stream_id(doc: Doc) -> None:
    doc["disks"][0]["stream_id"] = "0" * 32


def _bad_shape(doc: Doc) -> None:
    doc["disks"] = "scsi.0"


EDITS: dict[str, tuple[Callable[[Doc], None], str]] = {
    "reference removed": (_drop_ref, "reference_backup"),
    "reference and kind removed": (_drop_ref_and_kind, "kind"),
    "kind changed": (_kind_full, "kind"),
    "disk dropped": (_drop_disk, "scsi.1.ahvd is not in the manifest"),
    "stream id changed": (_stream_id, "stream_id"),
    "wrong JSON shape": (_bad_shape, "disks must be a list"),
}


@pytest.fixture
async def chain(world: World) -> tuple[World, str, list[str]]:
    vm = world.add_vm("db", [(4 * MiB, [(0, 2 * MiB)]), (4 * MiB, [(MiB, MiB)])])
    full = await _backup(world, "db")
    world.sim.write_disk(vm.uuid, 0, 3 * MiB, os.urandom(64 << 10))
    world.sim.write_disk(vm.uuid, 1, 0, os.urandom(64 << 10))
    inc = await _backup(world, "db", "incremental")
    return world, vm.uuid, [full, inc]


@pytest.mark.parametrize("resign", [False, True], ids=["as-edited", "re-signed"])
@pytest.mark.parametrize("edit", list(EDITS))
async def test_an_edited_manifest_fails_verify_naming_the_field_and_restore_refuses(
        chain: tuple[World, str, list[str]], edit: str, resign: bool) -> None:
    world, vm_uuid, (_, inc) = chain
    change, field = EDITS[edit]
    path = _manifest_path(world, vm_uuid, inc)
    doc = json.loads(path.read_text())
    change(doc)
    if resign:
        _resign(doc)
    path.write_text(json.dumps(doc))
    why = field if resign else "digest does not match"

    checked = _cli("verify", "--backup", inc, *world.cli_args())
    assert checked.returncode == 4, checked.stdout + checked.stderr
    assert why in checked.stdout + checked.stderr

    rt = Runtime.from_config(world.config())
    dest = world.tmp / "out"
    try:
        out = await RestoreJob(rt, await pick_backup(rt, vm=None, backup_id=inc),
                               dest=dest).run()
        refusals = [d.error or "" for d in out.disks if not d.ok]
    except AhvBackupError as err:  # refused before any disk was opened
        refusals = [str(err)]
    assert refusals and any(why in r for r in refusals), refusals
    # nothing half-written is left looking like a restored disk of the damaged point
    leftovers = [p for p in dest.rglob("scsi.0.raw")] if dest.exists() else []
    assert leftovers == []


async def test_a_manifest_copied_over_another_backup_is_damage(
        chain: tuple[World, str, list[str]]) -> None:
    world, vm_uuid, (full, inc) = chain
    shutil.copy(_manifest_path(world, vm_uuid, full), _manifest_path(world, vm_uuid, inc))
    checked = _cli("verify", "--backup", inc, *world.cli_args())
    assert checked.returncode == 4
    assert "belongs elsewhere" in checked.stderr
    listed = _cli("list", *world.cli_args())
    assert "DAMAGED" in listed.stdout and inc in listed.stdout


async def test_verify_all_counts_damaged_and_unreadable_entries(world: World) -> None:
    for name in ("good-1", "good-2", "bad", "lost"):
        world.add_vm(name, [(2 * MiB, [(0, MiB)])])
        await _backup(world, name)
    repo = world.tmp / "repo"
    by_name = {json.loads(m.read_text())["vm"]["name"]: m for m in repo.glob("*/*/manifest.json")}
    by_name["bad"].write_text(by_name["bad"].read_text()[:100])  # truncated
    by_name["lost"].unlink()
    by_name["lost"].mkdir()  # cannot be read at all

    done = _cli("--json", "verify", "--all", *world.cli_args())
    assert done.returncode == 4, done.stderr
    doc = json.loads(done.stdout)
    assert (doc["verified"], doc["damaged"], doc["unreadable"]) == (2, 1, 1)
    text = _cli("verify", "--all", *world.cli_args())
    assert "2 verified, 1 damaged, 1 unreadable" in text.stdout
    assert text.returncode == 4

    listed = json.loads(_cli("--json", "list", *world.cli_args()).stdout)
    assert sorted(r["vm"] for r in listed if not r["damaged"]) == ["good-1", "good-2"]
    assert len([r for r in listed if r["damaged"]]) == 2


async def test_an_old_format_manifest_still_restores(world: World) -> None:
    """Format 1 (no digest, from the first releases) loads; the stream binding still holds."""
    vm = world.add_vm("old", [(2 * MiB, [(0, MiB)])])
    bid = await _backup(world, "old")
    path = _manifest_path(world, vm.uuid, bid)
    doc = json.loads(path.read_text())
    doc["format"] = 1
    del doc["digest"]
    for d in doc["disks"]:
        del d["digest"]
        d["reference_backup"] = None  # format 1 wrote null
        d["reference_snapshot"] = None
    path.write_text(json.dumps(doc))
    rt = Runtime.from_config(world.config())
    out = await RestoreJob(rt, await pick_backup(rt, vm="old", backup_id=None),
                           dest=world.tmp / "o").run()
    assert out.ok, [d.error for d in out.disks]
    assert Path(out.disks[0].path).read_bytes() == _disk(world, vm.uuid, 0)


def test_stream_format_error_is_exit_4() -> None:
    assert int(StreamFormatError.exit_code) == 4


# property: any edit of a real chain's manifests restores the exact point or is refused --------

_CHAIN: dict[str, Any] = {}


def _build_chain(tmp: Path) -> dict[str, Any]:
    """Full + incremental + incremental of a 2-disk VM, and each point's disk digests."""
    from ahvbackup.hypervisors.ahv.simulator import Simulator, serve_simulator

    async def main() -> dict[str, Any]:
        sim = Simulator(tmp / "sim", seed=True, task_seconds=0.01, sync=False)
        try:
            async with serve_simulator(sim, port=0, tls=True) as ep:
                assert ep.ca_path is not None
                world = World(sim=sim, pc=ep.pc_url.split("://", 1)[1], ca=ep.ca_path,
                              tmp=tmp)
                vm = world.add_vm("p", [(2 * MiB, [(0, MiB)]), (2 * MiB, [(MiB, 512 << 10)])])
                points = []
                for level, write in (("full", 0), ("incremental", 64 << 10),
                                     ("incremental", 1536 << 10)):
                    if write:
                        world.sim.write_disk(vm.uuid, 0, write, os.urandom(32 << 10))
                        world.sim.zero_disk(vm.uuid, 1, MiB, 4096)
                    bid = await _backup(world, "p", level)
                    points.append((bid, {f"scsi.{i}": hashlib.sha256(_disk(world, vm.uuid, i))
                                         .hexdigest() for i in range(2)}))
                return {"repo": tmp / "repo", "vm": vm.uuid, "points": points,
                        "overrides": world.overrides()}
        finally:
            sim.close()

    return trio_run(main)


def trio_run(fn: Callable[[], Any]) -> Any:
    import trio

    return trio.run(fn)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of a JSON document (the places a mutation can hit)."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k not in {"config", "digest"}:
                out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _mutate(docs: list[Doc], draw: Callable[[Any], Any]) -> None:
    from hypothesis import strategies as st

    n = draw(st.integers(0, len(docs) - 1))
    doc = docs[n]
    op = draw(st.sampled_from(["remove", "change", "swap-field", "swap-manifest", "reorder"]))
    paths = _paths(doc)
    path = draw(st.sampled_from(paths))
    parent, key = _get(doc, path[:-1]), path[-1]
    if op == "remove":
        del parent[key]
    elif op == "change":
        old = parent[key]
        other_ids = [d.get("backup_id", "") for d in docs] + [""]
        if isinstance(old, bool):
            parent[key] = not old
        elif isinstance(old, int | float):
            parent[key] = old + draw(st.sampled_from([-4096, -1, 1, 4096]))
        elif isinstance(old, str):
            parent[key] = draw(st.sampled_from(
                [*other_ids, "full", "incremental", "differential", old + "x", "scsi.1"]))
        else:
            parent[key] = draw(st.sampled_from([None, "scsi.0", 0, {}]))
    elif op == "swap-field":
        m = draw(st.integers(0, len(docs) - 1))
        try:
            other_parent = _get(docs[m], path[:-1])
            parent[key], other_parent[key] = other_parent[key], parent[key]
        except (KeyError, IndexError, TypeError):
            del parent[key]
    elif op == "swap-manifest":
        m = draw(st.integers(0, len(docs) - 1))
        docs[n], docs[m] = docs[m], docs[n]
    else:
        doc["disks"].reverse()  # harmless: the disks are the same


def test_mutated_manifests_restore_exactly_or_are_refused(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from ahvbackup.core.config import load_config

    if not _CHAIN:
        _CHAIN.update(_build_chain(tmp_path_factory.mktemp("chain")))
    chain = _CHAIN

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def prop(data: st.DataObject) -> None:
        tmp = tmp_path_factory.mktemp("mut")
        repo = tmp / "repo"
        shutil.copytree(chain["repo"], repo)
        folders = [repo / chain["vm"] / bid for bid, _ in chain["points"]]
        docs = [json.loads((f / "manifest.json").read_text()) for f in folders]
        for _ in range(data.draw(st.integers(1, 3))):
            _mutate(docs, data.draw)
        resign = data.draw(st.booleans())
        for f, doc in zip(folders, docs, strict=True):
            if resign and isinstance(doc, dict):
                _resign(doc)
            (f / "manifest.json").write_text(json.dumps(doc))
        which = data.draw(st.integers(0, len(chain["points"]) - 1))
        bid, want = chain["points"][which]
        cfg = load_config(overrides={**chain["overrides"], "repository": str(repo),
                                     "state_dir": str(tmp / "state")})
        dest = tmp / "out"

        async def restore() -> dict[str, str] | None:
            rt = Runtime.from_config(cfg)
            try:
                out = await RestoreJob(rt, await pick_backup(rt, vm=None, backup_id=bid),
                                       dest=dest).run()
            except AhvBackupError:
                return None
            if not out.ok:
                return None
            return {d.label: hashlib.sha256(Path(d.path).read_bytes()).hexdigest()
                    for d in out.disks}

        got = trio_run(restore)
        outcomes.append(got is not None)
        if got is not None:  # it restored: then it is exactly the point, every disk of it
            assert got == want, f"point {which} restored wrong bytes after an edit"

    outcomes: list[bool] = []
    prop()
    # both answers happened: harmless edits restored, harmful ones were refused
    assert any(outcomes) and not all(outcomes), outcomes
