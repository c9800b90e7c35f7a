"""A restore target that keeps only the SHA-256 of each disk (an ahvbackup plugin example)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ahvbackup.core.drivers import DiskWriter, RestoreTarget
from ahvbackup.core.errors import TargetError
from ahvbackup.core.model import DiskInfo

_ZEROS = bytes(1 << 20)


class _HashingWriter(DiskWriter):
    """Hashes the disk front to back; ranges never written are zeros, as on a fresh disk."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size, self.pos = path, size, 0
        self.hash = hashlib.sha256()

    def _zeros_to(self, end: int) -> None:
        while self.pos < end:
            n = min(len(_ZEROS), end - self.pos)
            self.hash.update(_ZEROS[:n])
            self.pos += n

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        if offset < self.pos:
            raise TargetError(f"sha256 target: {self.path.stem} needs data in disk order")
        self._zeros_to(offset)
        self.hash.update(data)
        self.pos += len(data)

    def zero(self, offset: int, length: int) -> None:
        self.write_at(offset, b"")
        self._zeros_to(offset + length)

    def close(self) -> Path:
        self._zeros_to(self.size)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"{self.hash.hexdigest()}  {self.path.stem}\n")
        return self.path


class Sha256Target(RestoreTarget):
    name = "sha256"
    summary = "SHA-256 of each restored disk, no image written (example plugin)"

    def open_disk(self, *, vm_name: str, disk: DiskInfo, size: int, dest: Path) -> DiskWriter:
        return _HashingWriter(dest / vm_name / f"{disk.label}.sha256", size)
