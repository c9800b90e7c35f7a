"""Restoring a chain from a local repository into raw files copies plain payloads in the kernel
(`DiskWriter.copy` with a `SourceRange`), gives the same bytes as the path through the process,
and still checks every record: a damaged payload fails the restore instead of being copied."""

from __future__ import annotations

import os
from pathlib import Path

from tests.e2e.e2e_world import MiB, World

from ahvbackup.core.drivers import DiskWriter, SourceRange
from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.restore import DiskOutcome, RestoreJob
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.core.repository import stream_name
from ahvbackup.core.stream import index_stream
from ahvbackup.targets.raw import RawImage

SIZE = 8 * MiB


async def _chain(world: World, name: str, compression: str) -> tuple[str, bytes]:
    """A full and an incremental of a fresh VM; the incremental's id and the disk it saw."""
    vm = world.add_vm(name, [(SIZE, [(0, 2 * MiB), (5 * MiB, MiB)])])
    world.sim.write_disk(vm.uuid, 0, 5 * MiB, b"compressible " * (MiB // 13))
    backup_id = ""
    for level in ("full", "incremental"):
        rt = Runtime.from_config(world.config(vm=name, level=level, chunk_size_mib=1,
                                              compression=compression))
        result = await BackupJob(rt).run()
        assert result.ok, result.failed
        backup_id = result.vms[0].backup_id or ""
        if level == "full":
            world.sim.write_disk(vm.uuid, 0, MiB + 4096, os.urandom(300_000))
    return backup_id, world.sim.read_disk(vm.uuid, 0, 0, SIZE)


async def _restore(world: World, name: str, backup_id: str, dest: Path) -> DiskOutcome:
    rt = Runtime.from_config(world.config(vm=name))
    backup = {b.backup_id: b for b in await rt.sink.backups()}[backup_id]
    out = await RestoreJob(rt, backup, dest=dest).run()
    (disk,) = out.disks
    assert len(disk.chain) == 2
    return disk


async def test_a_plain_chain_is_copied_in_the_kernel_and_byte_identical(world: World) -> None:
    plain_id, plain_image = await _chain(world, "plain", "none")
    packed_id, packed_image = await _chain(world, "packed", "zstd:1")
    plain = await _restore(world, "plain", plain_id, world.tmp / "a")
    packed = await _restore(world, "packed", packed_id, world.tmp / "b")
    assert plain.ok and packed.ok, (plain.error, packed.error)
    assert plain.copied_bytes == plain.data_bytes == 3 * MiB  # every data range, in the kernel
    # zstd: the compressed MiB is opened here; random data zstd left as it was is copied
    assert packed.data_bytes == 3 * MiB and 0 < packed.copied_bytes <= 2 * MiB
    assert Path(plain.path).read_bytes() == plain_image
    assert Path(packed.path).read_bytes() == packed_image
    assert os.stat(plain.path).st_blocks * 512 <= 3 * MiB + 64 * 1024  # holes stay holes


async def test_a_damaged_plain_payload_is_refused_not_copied(world: World) -> None:
    inc_id, _ = await _chain(world, "bad", "none")
    rt = Runtime.from_config(world.config(vm="bad"))
    backup = {b.backup_id: b for b in await rt.sink.backups()}[inc_id]
    stream = rt.sink.path_of(backup) / stream_name(backup.manifest.streams[0].label)  # type: ignore[attr-defined]
    with open(stream, "r+b") as f:
        first = next(e for e in index_stream(f) if e.kind == "data")
        f.seek(first.position + 100 + first.length // 2)  # inside its payload
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0xFF]))
    disk = await _restore(world, "bad", inc_id, world.tmp / "c")
    assert not disk.ok and "checksum mismatch" in (disk.error or "")
    assert not [p for p in (world.tmp / "c").rglob("*") if p.is_file()]  # nothing left


class _Plain(DiskWriter):
    """A writer with the contract's default `copy` (read, then `write`)."""

    def __init__(self, image: RawImage) -> None:
        self.image = image

    async def write(self, offset: int, data: memoryview) -> None:
        self.image.write_at(offset, data)

    async def zero(self, offset: int, length: int) -> None:
        self.image.zero(offset, length)

    async def finish(self) -> str:
        return str(self.image.close())


async def test_the_raw_kernel_copy_writes_what_the_default_copy_does(tmp_path: Path) -> None:
    data = os.urandom(2 * MiB + 123)
    (tmp_path / "src").write_bytes(data)
    kernel = RawImage(tmp_path, ("out", "kernel.raw"), 4 * MiB)
    default = _Plain(RawImage(tmp_path, ("out", "default.raw"), 4 * MiB))
    fd = os.open(tmp_path / "src", os.O_RDONLY)
    try:
        source = SourceRange(fd=fd, offset=77, length=2 * MiB + 5)
        kernel.copy(MiB, source)
        await default.copy(MiB, source)
    finally:
        os.close(fd)
    assert kernel.kernel_copied == source.length
    one, two = kernel.close().read_bytes(), Path(await default.finish()).read_bytes()
    assert one == two == bytes(MiB) + data[77 : 77 + source.length] + bytes(MiB - 5)
