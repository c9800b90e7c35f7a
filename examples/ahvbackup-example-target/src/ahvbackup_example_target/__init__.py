"""A restore target that keeps only the SHA-256 of each disk (an ahvbackup plugin example).

It shows the restore-target contract (`ahvbackup.core.drivers.RestoreTarget`): one `VmRestore`
per VM, a `DiskWriter` per disk fed in disk order, `commit` or `abort`. Each disk becomes
``<dest>/<vm>/<label>.sha256``; names go through `safe_name` and files are opened with
`open_inside`, so a hostile VM name never writes outside `dest`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ahvbackup.core.containment import open_inside, safe_name
from ahvbackup.core.drivers import (
    ClusterAccess,
    DiskWriter,
    RestoreRequest,
    RestoreTarget,
    VmRestore,
)
from ahvbackup.core.model import DiskInfo

_ZEROS = bytes(1 << 20)


class _HashingWriter(DiskWriter):
    """Hashes the disk front to back; ranges never given are zeros, as on a fresh disk."""

    def __init__(self, dest: Path, parts: tuple[str, str], size: int) -> None:
        self.dest, self.parts, self.size, self.pos = dest, parts, size, 0
        self.hash = hashlib.sha256()
        self.path: Path | None = None

    def _zeros_to(self, end: int) -> None:
        while self.pos < end:
            n = min(len(_ZEROS), end - self.pos)
            self.hash.update(_ZEROS[:n])
            self.pos += n

    async def write(self, offset: int, data: memoryview) -> None:
        self._zeros_to(offset)  # ranges come in disk order (the contract)
        self.hash.update(data)
        self.pos += len(data)

    async def zero(self, offset: int, length: int) -> None:
        self._zeros_to(offset + length)

    async def finish(self) -> str:
        self._zeros_to(self.size)
        fd, self.path = open_inside(self.dest, self.parts,
                                    flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "w") as f:
            f.write(f"{self.hash.hexdigest()}  {self.parts[1]}\n")
        return str(self.path)


class _HashingVm(VmRestore):
    def __init__(self, request: RestoreRequest) -> None:
        self.request = request
        self.folder = safe_name(request.vm_name)
        self.writers: list[_HashingWriter] = []

    async def open_disk(self, disk: DiskInfo, *, size: int) -> DiskWriter:
        writer = _HashingWriter(self.request.dest,
                                (self.folder, f"{safe_name(disk.label)}.sha256"), size)
        self.writers.append(writer)
        return writer

    async def commit(self) -> str:
        return str(self.request.dest / self.folder)

    async def abort(self) -> None:
        for writer in self.writers:
            if writer.path is not None:
                writer.path.unlink(missing_ok=True)


class Sha256Target(RestoreTarget):
    name = "sha256"
    summary = "SHA-256 of each restored disk, no image written (example plugin)"

    async def begin_vm(self, request: RestoreRequest, *,
                       cluster: ClusterAccess | None) -> VmRestore:
        return _HashingVm(request)
