"""The directory repository: nothing looks complete until commit, interrupted backups are swept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ahvbackup.core.errors import SinkError
from ahvbackup.core.manifest import DiskEntry, Manifest, VmIdentity
from ahvbackup.core.model import DiskInfo, VmInfo
from ahvbackup.core.repository import DirectorySink, new_backup_id

VM = VmInfo(
    uuid="vm-1",
    name="web-01",
    cluster_uuid="c",
    cluster_name="c1",
    disks=(DiskInfo(uuid="d0", bus="SCSI", index=0, size=4096),),
)


def manifest(backup_id: str) -> Manifest:
    return Manifest(
        backup_id=backup_id, vm=VmIdentity(uuid=VM.uuid, name=VM.name), level="full",
        created=1.0,
        disks=(DiskEntry(label="scsi.0", uuid="d0", bus="scsi", index=0, size=4096,
                         stream="scsi.0.ahvd", bytes_stored=6),),
    )


async def chunks(*parts: bytes):  # type: ignore[no-untyped-def]
    for p in parts:
        yield p


async def test_backup_is_listed_only_after_commit(tmp_path: Path) -> None:
    sink = DirectorySink(SimpleNamespace(repository=tmp_path / "repo"))
    bid = new_backup_id()
    writer = await sink.begin(VM, backup_id=bid, level="full")
    assert await writer.write_disk("scsi.0", chunks(b"abc", memoryview(b"def"))) == 6
    assert await sink.backups() == []
    stored = await writer.commit(manifest(bid))
    listed = await sink.backups("web-01")
    assert [b.backup_id for b in listed] == [bid] == [stored.backup_id]
    assert listed[0].bytes_stored == 6
    with sink.open_stream(listed[0], "scsi.0") as f:
        assert f.read() == b"abcdef"
    with pytest.raises(SinkError, match=r"stream for disk scsi\.1 is missing"):
        sink.open_stream(listed[0], "scsi.1")


async def test_abort_leaves_nothing(tmp_path: Path) -> None:
    sink = DirectorySink(SimpleNamespace(repository=tmp_path))
    writer = await sink.begin(VM, backup_id=new_backup_id(), level="full")
    await writer.write_disk("scsi.0", chunks(b"x" * 100))
    await writer.abort()
    assert await sink.backups() == []
    assert list((tmp_path / VM.uuid).iterdir()) == []


async def test_partial_of_a_dead_process_is_swept(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)
    partial = tmp_path / VM.uuid / f".partial-20260101T000000Z-abcdef-{pid}"
    partial.mkdir(parents=True)
    (partial / "scsi.0.ahvd").write_bytes(b"half")
    mine = tmp_path / VM.uuid / f".partial-20260101T000001Z-abcdef-{os.getpid()}"
    mine.mkdir()
    sink = DirectorySink(SimpleNamespace(repository=tmp_path))
    assert sink.sweep_partials() == [partial]
    assert not partial.exists() and mine.exists()


@pytest.mark.parametrize("key", ["repository", "state_dir"])
def test_a_file_where_a_folder_belongs_is_one_line_naming_key_and_path(tmp_path: Path,
                                                                       key: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    paths = {"repository": tmp_path / "repo", "state_dir": tmp_path / "state", key: blocker}
    done = subprocess.run(
        [sys.executable, "-m", "ahvbackup.core.cli", "list", "-o", "debug_log=",
         *(a for k, v in paths.items() for a in ("-o", f"{k}={v}"))],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"ahvbackup: error: {key} {blocker}: cannot use it as a folder (File exists)"]
