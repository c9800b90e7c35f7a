"""The `raw` target: each disk becomes a sparse raw image file, `<dest>/<vm>/<disk label>.raw`.

The VM and disk names go through `safe_name` and the file is opened with `open_inside`, so a
restore never writes outside `dest`, whatever the VM is called or what is planted there.

Zero ranges are holes (punched where the file already had data), so a 100 GiB disk with 1 GiB
of data costs 1 GiB on the restore host.
"""

from __future__ import annotations

__all__ = ["RawDiskWriter", "RawTarget", "image_parts", "punch_hole"]

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

from ahvbackup.core.containment import open_inside, safe_name
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


def image_parts(vm_name: str, label: str) -> tuple[str, str]:
    """The image's path below the destination: (VM folder, file name)."""
    return safe_name(vm_name), f"{safe_name(label)}.raw"


class RawDiskWriter(DiskWriter):
    """Writes one image; `size=None` opens an existing image as it is (a chain's next link)."""

    def __init__(self, dest: Path, parts: tuple[str, str], size: int | None) -> None:
        flags = os.O_WRONLY if size is None else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.fd, self.path = open_inside(dest, parts, flags=flags, what="raw target")
        self.size = size
        try:
            if size is not None:
                os.ftruncate(self.fd, size)
        except OSError as err:
            os.close(self.fd)
            raise TargetError(f"raw target: cannot create {self.path} ({err.strerror})") from err

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
        return RawDiskWriter(dest, image_parts(vm_name, disk.label), size)
