from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from ahvbackup.core.model import DiskInfo
from ahvbackup.targets.raw import RawTarget


def test_raw_disk_is_sparse_and_byte_exact(tmp_path: Path) -> None:
    size = 64 << 20
    target = RawTarget(SimpleNamespace())
    disk = DiskInfo(uuid="d", bus="SCSI", index=1, size=size)
    w = target.open_disk(vm_name="vm", disk=disk, size=size, dest=tmp_path)
    data = os.urandom(1 << 20)
    w.write_at(10 << 20, data)
    w.write_at(20 << 20, data)
    w.zero(20 << 20, 1 << 20)  # punched back to a hole
    path = w.close()
    assert path == tmp_path / "vm" / "scsi.1.raw"
    raw = path.read_bytes()
    assert len(raw) == size
    assert raw[10 << 20 : 11 << 20] == data
    assert raw.count(0) == size - len(data) + data.count(0)
    assert os.stat(path).st_blocks * 512 <= 2 << 20  # sparse: about 1 MiB allocated
