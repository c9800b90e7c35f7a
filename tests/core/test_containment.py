"""Names from elsewhere become file names that stay inside their folder, and never collide."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ahvbackup.core.containment import ContainmentError, open_inside, safe_name
from ahvbackup.core.drivers import RestoreRequest
from ahvbackup.core.model import DiskInfo
from ahvbackup.targets.raw import RawTarget

HOSTILE = ["../../../../tmp/x", "/tmp/abs", "..", ".", "", "a\x00b", "tab\tname", "x" * 400,
           ".hidden", " padded ", "é" * 200, "name~with~tilde", "a/b", "a\\b", "\n"]


@pytest.mark.parametrize("name", ["web-01", "db 01", "Exchange (prod)", "vm_1.2", "日本語"])
def test_ordinary_names_are_kept_as_they_are(name: str) -> None:
    assert safe_name(name) == name


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_become_one_plain_file_name(name: str) -> None:
    out = safe_name(name)
    assert "/" not in out and "\x00" not in out and out not in {"", ".", ".."}
    assert not out.startswith(".")
    assert all(ord(c) >= 32 for c in out)
    assert len(out.encode()) <= 255
    assert "~" in out  # a mapped name is marked, so it can never equal an ordinary one


@given(st.text(max_size=300), st.text(max_size=300))
def test_distinct_names_never_share_a_file_name(a: str, b: str) -> None:
    if a != b:
        assert safe_name(a) != safe_name(b)
    assert safe_name(a) == safe_name(a)  # stable


@pytest.mark.parametrize("parts", [["..", "x"], ["a", "..", "..", "x"], ["/abs"], ["a\x00"]])
def test_a_path_component_that_leaves_is_refused(tmp_path: Path, parts: list[str]) -> None:
    with pytest.raises(ContainmentError, match="not a plain file name"):
        open_inside(tmp_path / "dest", parts, flags=os.O_WRONLY | os.O_CREAT)
    assert [p.name for p in tmp_path.iterdir()] in ([], ["dest"])


async def test_a_symlink_planted_in_the_destination_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "scsi.0.raw").write_bytes(b"precious")
    dest = tmp_path / "dest"
    dest.mkdir()
    disk = DiskInfo(uuid="d", bus="scsi", index=0, size=4096)
    (dest / "web").symlink_to(outside)  # a folder link: refused
    vm = await RawTarget(None).begin_vm(RestoreRequest(vm_name="web", dest=dest), cluster=None)
    with pytest.raises(ContainmentError, match="symlink"):
        await vm.open_disk(disk, size=4096)
    (dest / "db").mkdir()  # a link where the image goes: replaced by the image, not written
    (dest / "db" / "scsi.0.raw").symlink_to(outside / "scsi.0.raw")
    vm = await RawTarget(None).begin_vm(RestoreRequest(vm_name="db", dest=dest), cluster=None)
    w = await vm.open_disk(disk, size=4096)
    await w.write(0, memoryview(b"restored"))
    image = Path(await w.finish())
    await vm.commit()
    assert not image.is_symlink() and image.read_bytes()[:8] == b"restored"
    assert (outside / "scsi.0.raw").read_bytes() == b"precious"


async def test_raw_target_keeps_hostile_vm_names_inside_dest(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    disk = DiskInfo(uuid="d", bus="scsi", index=0, size=512)
    paths = []
    for name in HOSTILE:
        vm = await RawTarget(None).begin_vm(RestoreRequest(vm_name=name, dest=dest),
                                            cluster=None)
        w = await vm.open_disk(disk, size=512)
        await w.write(0, memoryview(b"x"))
        paths.append(Path(await w.finish()))
    for p in paths:
        assert p.resolve().parent.parent == dest.resolve()
    assert len(set(paths)) == len(HOSTILE)  # no two VMs share an image
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


def test_the_mapping_is_stable_across_releases_as_documented() -> None:
    # docs/manifest.md quotes these; a changed mapping would restore into other folders
    doc = (Path(__file__).resolve().parents[2] / "docs" / "manifest.md").read_text()
    for name in ("../../tmp/x", "__/tmp/x"):
        assert f"`{safe_name(name)}`" in doc
    assert safe_name("../../tmp/x") == "_.._tmp_x~5a64a91ce61b"
