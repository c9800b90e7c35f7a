"""The `raw` target: each disk becomes a sparse raw image file, `<dest>/<vm>/<disk label>.raw`.

Zero ranges are holes (punched where the file already had data), so a 100 GiB disk with 1 GiB
of data costs 1 GiB on the restore host.
"""

from __future__ import annotations

__all__ = ["RawDiskWriter", "RawTarget", "punch_hole"]

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

from ahvbackup.core.drivers import DiskWriter, RestoreTarget
from ahvbackup.core.errors import TargetError
from ahvbackup.core.model import DiskInfo

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_ZEROS = bytes(1 << 20)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros without allocating; writes zeros where the
    filesystem cannot punch holes."""
    if length <= 0:
        return
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise OSError(err, os.strerror(err))
    end = offset + length
    while offset < end:
        n = min(len(_ZEROS), end - offset)
        os.pwrite(fd, memoryview(_ZEROS)[:n], offset)
        offset += n


class RawDiskWriter(DiskWriter):
    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self.fd, size)
        except OSError as err:
            raise TargetError(f"raw target: cannot create {path} ({err.strerror})") from err

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def zero(self, offset: int, length: int) -> None:
        punch_hole(self.fd, offset, length)

    def close(self) -> Path:
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
        return self.path


class RawTarget(RestoreTarget):
    name = "raw"
    summary = "sparse raw image files"

    def open_disk(self, *, vm_name: str, disk: DiskInfo, size: int, dest: Path) -> RawDiskWriter:
        return RawDiskWriter(dest / vm_name / f"{disk.label}.raw", size)
