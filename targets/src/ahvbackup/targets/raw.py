"""The `raw` target: each disk becomes a sparse raw image file, `<dest>/<vm>/<disk label>.raw`.

The VM and disk names go through `safe_name` and the file is opened with `open_inside`, so a
restore never writes outside `dest`, whatever the VM is called or what is planted there.

Zero ranges are holes (punched where the file already had data), so a 100 GiB disk with 1 GiB
of data costs 1 GiB on the restore host. Ranges the job gives as a `SourceRange` (a local
repository's plain payloads) are copied in the kernel with `copy_file_range` (a reflink where
the filesystem shares extents and the offsets line up), never through this process.
"""

from __future__ import annotations

__all__ = [
    "RawDiskWriter",
    "RawImage",
    "RawTarget",
    "RawVmRestore",
    "image_parts",
    "partial_name",
    "punch_hole",
    "sweep_partials",
]

import contextlib
import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

import trio

from ahvbackup.core.containment import open_inside, safe_name
from ahvbackup.core.drivers import (
    ClusterAccess,
    DiskWriter,
    RestoreRequest,
    RestoreTarget,
    SourceRange,
    VmRestore,
)
from ahvbackup.core.errors import TargetError
from ahvbackup.core.fsutil import fsync_dir, io_failure
from ahvbackup.core.ledger import owner_alive
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


def image_parts(vm_name: str, label: str, suffix: str = ".raw") -> tuple[str, str]:
    """The image's path below the destination: (VM folder, file name)."""
    return safe_name(vm_name), f"{safe_name(label)}{suffix}"


def partial_name(name: str, *, pid: int | None = None) -> str:
    """The hidden name a file is written under until its VM restore commits; it carries the
    writing process's id, so `sweep_partials` knows when its writer is gone."""
    return f".{name}.partial-{os.getpid() if pid is None else pid}"


def sweep_partials(folder: Path) -> None:
    """Remove the partial files (`partial_name`) in `folder` whose writer is no longer alive:
    what a killed restore left."""
    for partial in folder.glob(".*.partial-*") if folder.is_dir() else ():
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not owner_alive(int(pid)) and not partial.is_symlink():
            partial.unlink(missing_ok=True)


class RawImage:
    """One image file, blocking I/O; `size=None` opens an existing image as it is (the next
    link of a chain restored job by job)."""

    def __init__(self, dest: Path, parts: tuple[str, str], size: int | None) -> None:
        flags = os.O_WRONLY if size is None else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.fd, self.path = open_inside(dest, parts, flags=flags, what="raw target")
        self.kernel_copied = 0  # bytes `copy` moved with copy_file_range
        try:
            if size is not None:
                os.ftruncate(self.fd, size)
        except OSError as err:
            os.close(self.fd)
            raise TargetError(f"raw target: cannot create {self.path} ({err.strerror})") from err

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as err:
            raise TargetError(f"raw target: {io_failure(self.path, err)}") from err

    def copy(self, offset: int, source: SourceRange) -> None:
        """Copy `source` to `offset` in the kernel; falls back to read and write where the
        kernel cannot (another filesystem on an old kernel)."""
        src, done = source.offset, 0
        try:
            while done < source.length:
                try:
                    n = os.copy_file_range(source.fd, self.fd, source.length - done,
                                           src + done, offset + done)
                except OSError as err:
                    if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL,
                                         errno.EOPNOTSUPP):
                        raise
                    n = 0
                if n == 0:
                    break
                done += n
                self.kernel_copied += n
        except OSError as err:
            raise TargetError(f"raw target: {io_failure(self.path, err)}") from err
        while done < source.length:
            piece = os.pread(source.fd, min(source.length - done, 1 << 20), src + done)
            if not piece:
                raise TargetError(f"raw target: the source of a copy to {self.path} ended "
                                  f"{source.length - done} bytes early")
            self.write_at(offset + done, piece)
            done += len(piece)

    def zero(self, offset: int, length: int) -> None:
        try:
            punch_hole(self.fd, offset, length)
        except OSError as err:
            raise TargetError(f"raw target: {io_failure(self.path, err)}") from err

    def close(self) -> Path:
        """fsync and close (once)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.fsync(fd)
            except OSError as err:
                raise TargetError(f"raw target: {io_failure(self.path, err)}") from err
            finally:
                os.close(fd)
        return self.path


class RawDiskWriter(DiskWriter):
    """The contract's writer over a `RawImage` (file writes in a worker thread); `final` is
    where the image will be once its VM restore commits (default: where it is written)."""

    def __init__(self, image: RawImage, final: Path | None = None) -> None:
        self.image = image
        self.final = final or image.path

    async def write(self, offset: int, data: memoryview) -> None:
        await trio.to_thread.run_sync(self.image.write_at, offset, data)

    async def copy(self, offset: int, source: SourceRange) -> None:
        await trio.to_thread.run_sync(self.image.copy, offset, source)

    async def zero(self, offset: int, length: int) -> None:
        await trio.to_thread.run_sync(self.image.zero, offset, length)

    async def finish(self) -> str:
        await trio.to_thread.run_sync(self.image.close)
        return str(self.final)


class RawVmRestore(VmRestore):
    """``<dest>/<vm>/<label>.raw`` per disk. Each image is written as a hidden partial file
    and renamed into place at `commit`, so an image in place is always complete; `abort`
    removes the partial files, and a later restore into the folder removes those a killed
    restore left."""

    def __init__(self, request: RestoreRequest) -> None:
        self.dest = request.dest
        self.vm_name = request.vm_name
        self.images: list[tuple[RawImage, Path]] = []  # (partial image, its final path)

    def sweep(self) -> None:
        sweep_partials(self.dest / safe_name(self.vm_name))

    async def open_disk(self, disk: DiskInfo, *, size: int) -> RawDiskWriter:
        folder, name = image_parts(self.vm_name, disk.label)
        image = await trio.to_thread.run_sync(RawImage, self.dest, (folder, partial_name(name)),
                                              size)
        final = image.path.with_name(name)
        self.images.append((image, final))
        return RawDiskWriter(image, final)

    async def commit(self) -> str:
        def rename() -> None:
            for image, final in self.images:
                image.close()
                os.rename(image.path, final)  # over an older restore's image, atomically
            if self.images:
                fsync_dir(self.images[0][1].parent)

        await trio.to_thread.run_sync(rename)
        return str(self.dest / safe_name(self.vm_name))

    async def abort(self) -> None:
        def remove() -> None:
            for image, _final in self.images:
                with contextlib.suppress(TargetError):
                    image.close()
                image.path.unlink(missing_ok=True)

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(remove)


class RawTarget(RestoreTarget):
    name = "raw"
    summary = "sparse raw image files"

    async def begin_vm(self, request: RestoreRequest, *,
                       cluster: ClusterAccess | None) -> RawVmRestore:
        restoring = RawVmRestore(request)
        await trio.to_thread.run_sync(restoring.sweep)
        return restoring
