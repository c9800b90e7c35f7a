from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from ahvbackup.core.drivers import RestoreRequest
from ahvbackup.core.model import DiskInfo
from ahvbackup.core.testing import check_restore_target
from ahvbackup.targets.raw import RawTarget


async def test_raw_target_honours_the_restore_target_contract(tmp_path: Path) -> None:
    def matches(location: str, image: bytes) -> bool:
        return Path(location).read_bytes() == image

    await check_restore_target(RawTarget(SimpleNamespace()), dest=tmp_path / "dest",
                               matches=matches)


async def test_raw_disk_is_sparse_and_byte_exact(tmp_path: Path) -> None:
    size = 64 << 20
    vm = await RawTarget(SimpleNamespace()).begin_vm(
        RestoreRequest(vm_name="vm", dest=tmp_path), cluster=None)
    w = await vm.open_disk(DiskInfo(uuid="d", bus="SCSI", index=1, size=size), size=size)
    data = os.urandom(1 << 20)
    await w.write(10 << 20, memoryview(data))
    await w.zero(11 << 20, 9 << 20)
    await w.write(20 << 20, memoryview(data))
    path = Path(await w.finish())
    assert await vm.commit() == str(tmp_path / "vm")
    assert path == tmp_path / "vm" / "scsi.1.raw"
    raw = path.read_bytes()
    assert len(raw) == size
    assert raw[10 << 20 : 11 << 20] == data == raw[20 << 20 : 21 << 20]
    assert raw.count(0) == size - 2 * len(data) + 2 * data.count(0)
    assert os.stat(path).st_blocks * 512 <= 3 << 20  # sparse: about 2 MiB allocated
