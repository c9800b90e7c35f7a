"""File-level primitives for the disk store: holes, hole-aware copies, atomic metadata writes.

The store keeps "this block is all zero" as "this block is a hole" in a sparse file, so these
helpers are where that invariant is made (punching) and read back (SEEK_DATA / SEEK_HOLE).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "RWLock",
    "atomic_write",
    "copy_range",
    "data_segments",
    "fsync_dir",
    "has_data",
    "is_zero",
    "pread_into",
    "punch",
    "pwrite_all",
]

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = bytes(1 << 20)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_punch_supported = True


def punch(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zero, freeing whole filesystem blocks inside it.

    Falls back to writing zeros when the filesystem cannot punch holes (the bytes are still zero;
    only the space saving and the ZEROED typing are lost).
    """
    global _punch_supported
    if length <= 0:
        return
    if _punch_supported:
        rc = _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, f"fallocate(PUNCH_HOLE, {offset}, {length}): {os.strerror(err)}")
        _punch_supported = False
    end = min(offset + length, os.fstat(fd).st_size)
    while offset < end:
        n = min(len(_ZERO_CHUNK), end - offset)
        pwrite_all(fd, memoryview(_ZERO_CHUNK)[:n], offset)
        offset += n


def data_segments(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Yield the (begin, end) ranges of [start, end) that hold data; the rest are holes."""
    pos = start
    while pos < end:
        try:
            begin = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:
                return
            raise
        if begin >= end:
            return
        hole = os.lseek(fd, begin, os.SEEK_HOLE)
        yield begin, min(hole, end)
        pos = hole


def has_data(fd: int, start: int, end: int) -> bool:
    """True when any byte of [start, end) is stored (not a hole)."""
    return next(data_segments(fd, start, end), None) is not None


def is_zero(data: memoryview) -> bool:
    n = data.nbytes
    if n <= len(_ZERO_CHUNK):
        return data.tobytes() == _ZERO_CHUNK[:n]
    return all(is_zero(data[i : i + len(_ZERO_CHUNK)]) for i in range(0, n, len(_ZERO_CHUNK)))


def pread_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill buf from fd at offset; bytes past the end of the file read as zero (sparse tail)."""
    got = 0
    total = buf.nbytes
    while got < total:
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            buf[got:] = bytes(total - got)
            return
        got += n


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done:], offset + done)


def copy_range(src: int, dst: int, start: int, end: int) -> None:
    """Copy [start, end) from src to dst at the same offsets, keeping holes as holes.

    Data moves with copy_file_range (in-kernel; a reflink on filesystems that share extents).
    """
    pos = start
    for begin, stop in data_segments(src, start, end):
        punch(dst, pos, begin - pos)
        _copy_data(src, dst, begin, stop)
        pos = stop
    punch(dst, pos, end - pos)


def _copy_data(src: int, dst: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        try:
            n = os.copy_file_range(src, dst, end - pos, pos, pos)
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = 0
        if n == 0:
            chunk = bytearray(min(end - pos, 1 << 20))
            view = memoryview(chunk)
            pread_into(src, view, pos)
            pwrite_all(dst, view, pos)
            n = len(chunk)
        pos += n


def atomic_write(path: Path, data: bytes, *, sync: bool) -> None:
    """Replace path with data; a reader (or a crash) sees the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pwrite_all(fd, memoryview(data), 0)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RWLock:
    """Many readers or one writer; a waiting writer holds back new readers so it cannot starve."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def shared(self) -> Generator[None, None, None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Generator[None, None, None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
