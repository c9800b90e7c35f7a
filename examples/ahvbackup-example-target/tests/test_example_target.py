from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

from ahvbackup_example_target import Sha256Target

from ahvbackup.core.model import DiskInfo
from ahvbackup.core.plugins import load_driver
from ahvbackup.core.testing import check_driver_class


def test_found_by_its_entry_point_and_honours_the_contract() -> None:
    cls = load_driver("target", "sha256")
    assert cls is Sha256Target
    check_driver_class(cls, kind="target", name="sha256")


def test_hash_matches_the_disk_it_describes(tmp_path: Path) -> None:
    disk = DiskInfo(uuid="d", bus="SCSI", index=0, size=3 << 20)
    w = Sha256Target(SimpleNamespace()).open_disk(vm_name="vm", disk=disk, size=disk.size,
                                                  dest=tmp_path)
    w.write_at(1 << 20, b"x" * 1000)
    w.zero(2 << 20, 4096)
    path = w.close()
    image = bytearray(3 << 20)
    image[1 << 20 : (1 << 20) + 1000] = b"x" * 1000
    assert path.read_text().split()[0] == hashlib.sha256(image).hexdigest()
