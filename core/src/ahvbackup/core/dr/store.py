"""The receiver's per-VM store: complete restore points, and the one push in progress.

Layout under the receiver's own state directory (docs/dr.md, "Receiver and push protocol")::

    receiver/<vm uuid>/lock                 flock: one push of a VM at a time, whoever serves it
    receiver/<vm uuid>/points/<n>/          a complete point: point.json, <disk uuid>.img each
    receiver/<vm uuid>/partial/             the point being pushed: journal.json, images
    receiver/<vm uuid>/trash/               what rotation or a restart removes (emptied at once)

Every point is a whole sparse raw image per disk. A delta point starts as a clone of the newest
point's image (a reflink where the filesystem has them, else a sparse copy) and the pushed
ranges are written into the clone as they arrive (write-through). The journal records, per
disk, the offset below which every range is written and fsynced, and the chain digest up to
there: the resume token. `commit` renames the finished partial into `points/`, so a point is
listed only whole; rotation removes the oldest points only after that, never the newest.

Everything here blocks (file I/O): the receiver calls it through `trio.to_thread`.
"""

from __future__ import annotations

__all__ = ["Partial", "PointDisk", "RestorePoint", "VmStore", "check_base", "clone_file",
           "disks_done", "punch_zero"]

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fsutil import atomic_write_json, fsync_dir
from .protocol import CHAIN_START, Hello, ResumeToken

_FICLONE = 0x40049409
_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
_ZEROS = bytes(1 << 20)
_COPY = 64 << 20


@dataclass(frozen=True)
class PointDisk:
    uuid: str
    label: str
    size: int
    path: Path


@dataclass(frozen=True)
class RestorePoint:
    """One complete point-in-time image of a VM on the receiver."""

    vm_uuid: str
    vm_name: str
    point: int
    snapshot_id: str
    base: int
    completed: float
    disks: tuple[PointDisk, ...]

    def disk(self, uuid: str) -> PointDisk | None:
        return next((d for d in self.disks if d.uuid == uuid), None)


def _hello_json(hello: Hello) -> dict[str, Any]:
    as_json: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(hello)))
    return as_json


def clone_file(src: Path, dst: Path) -> None:
    """`dst` becomes a copy of `src`: a reflink when the filesystem can, else a copy of the
    allocated extents only (holes stay holes)."""
    with src.open("rb") as fin, dst.open("wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY,
                                 errno.EBADF, errno.EPERM):
                raise
        else:
            return
        size = os.fstat(fin.fileno()).st_size
        fout.truncate(size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            while start < end:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), min(_COPY, end - start),
                                       start, start)
                if n <= 0:
                    raise OSError(errno.EIO, f"copy of {src} stopped at {start}")
                start += n
            pos = end


_libc: Any = None


def punch_zero(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros: a punched hole, else written zeros."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, _PUNCH, offset, length) == 0:
        return
    pos, end = offset, offset + length
    while pos < end:
        pos += os.pwrite(fd, memoryview(_ZEROS)[: min(len(_ZEROS), end - pos)], pos)


def _remove(path: Path, trash: Path) -> None:
    """Remove a folder so that it is gone at once (renamed into trash), then delete it."""
    if not path.exists():
        return
    trash.mkdir(exist_ok=True)
    doomed = trash / f"{path.name}-{time.time_ns()}"
    os.replace(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: another removal is under way
        trash.rmdir()


class VmStore:
    """The points of one VM under `root` (``<state_dir>/receiver/<vm uuid>``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.points_dir = root / "points"
        self.partial_dir = root / "partial"
        self.trash = root / "trash"
        self._lock_fd: int | None = None

    def lock(self) -> bool:
        """Take the VM's lock (False: another push of it is running, here or elsewhere)."""
        self.points_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        shutil.rmtree(self.trash, ignore_errors=True)  # what a killed rotation left
        return True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def points(self) -> list[RestorePoint]:
        """Complete points, oldest first (a folder without its point.json is not one)."""
        out: list[RestorePoint] = []
        if not self.points_dir.is_dir():
            return out
        for d in self.points_dir.iterdir():
            try:
                meta = json.loads((d / "point.json").read_text(encoding="utf-8"))
                out.append(_point(d, meta))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return sorted(out, key=lambda p: p.point)

    def newest(self) -> RestorePoint | None:
        points = self.points()
        return points[-1] if points else None

    def partial_for(self, hello: Hello) -> Partial:
        """The partial point `hello` continues (its tokens as the journal has them), or a new
        one (whatever partial was there is removed: it was another point)."""
        tokens = self._saved_tokens(hello)
        if tokens is not None:
            return Partial(self, hello, tokens)
        _remove(self.partial_dir, self.trash)
        base = self.newest() if hello.base else None
        staging = self.root / "partial.new"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        for d in hello.disks:
            path = staging / f"{d.uuid}.img"
            if d.full:
                with path.open("wb") as f:
                    f.truncate(d.size)
            else:
                assert base is not None
                src = base.disk(d.uuid)
                assert src is not None and src.size == d.size
                clone_file(src.path, path)
            with path.open("rb+") as f:
                os.fsync(f.fileno())
        tokens = [ResumeToken() for _ in hello.disks]
        atomic_write_json(staging / "journal.json", _journal(hello, tokens))
        os.replace(staging, self.partial_dir)
        fsync_dir(self.root)
        return Partial(self, hello, tokens)

    def _saved_tokens(self, hello: Hello) -> list[ResumeToken] | None:
        """The journal's tokens when the partial is this very point and whole, else None."""
        try:
            saved = json.loads((self.partial_dir / "journal.json").read_text(encoding="utf-8"))
            if saved["hello"] != _hello_json(hello) or any(
                    _size(self.partial_dir / f"{d.uuid}.img") != d.size for d in hello.disks):
                return None
            tokens = [ResumeToken(offset=int(t["offset"]), chain=bytes.fromhex(t["chain"]),
                                  done=bool(t["done"])) for t in saved["disks"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return tokens if len(tokens) == len(hello.disks) else None

    def discard_partial(self) -> None:
        _remove(self.partial_dir, self.trash)

    def rotate(self, keep: int) -> list[int]:
        """Remove the oldest points beyond `keep`; returns the removed point numbers. The
        newest is never among them (`keep` is at least 1)."""
        doomed = self.points()[: -max(1, keep)]
        for p in doomed:
            _remove(self.points_dir / _point_name(p.point), self.trash)
        return [p.point for p in doomed]


def _point(folder: Path, meta: dict[str, Any]) -> RestorePoint:
    return RestorePoint(
        vm_uuid=meta["vm_uuid"], vm_name=meta["vm_name"], point=int(meta["point"]),
        snapshot_id=meta["snapshot_id"], base=int(meta["base"]),
        completed=float(meta["completed"]),
        disks=tuple(PointDisk(uuid=x["uuid"], label=x["label"], size=int(x["size"]),
                              path=folder / f"{x['uuid']}.img") for x in meta["disks"]))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _point_name(point: int) -> str:
    return f"{point:010d}"


def _journal(hello: Hello, tokens: list[ResumeToken]) -> dict[str, Any]:
    return {"hello": _hello_json(hello),
            "disks": [{"offset": t.offset, "chain": t.chain.hex(), "done": t.done}
                      for t in tokens]}


class Partial:
    """The point being pushed: its images open for writing, its journal of resume tokens."""

    def __init__(self, store: VmStore, hello: Hello, tokens: list[ResumeToken]) -> None:
        self.store = store
        self.hello = hello
        self.tokens = tokens
        self._fds: dict[int, int] = {}

    def _fd(self, disk: int) -> int:
        fd = self._fds.get(disk)
        if fd is None:
            path = self.store.partial_dir / f"{self.hello.disks[disk].uuid}.img"
            fd = self._fds[disk] = os.open(path, os.O_RDWR)
        return fd

    def write(self, disk: int, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        fd = self._fd(disk)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def zero(self, disk: int, offset: int, length: int) -> None:
        punch_zero(self._fd(disk), offset, length)

    def sync(self, disk: int, token: ResumeToken) -> None:
        """Make everything written to `disk` durable, then record `token` (durable before it
        is acknowledged: the journal never runs ahead of the image)."""
        os.fsync(self._fd(disk))
        self.tokens[disk] = token
        atomic_write_json(self.store.partial_dir / "journal.json",
                          _journal(self.hello, self.tokens))

    def commit(self) -> RestorePoint:
        """List the point: point.json, then the rename into `points/` (atomic)."""
        self.close()
        h = self.hello
        meta = {"vm_uuid": h.vm_uuid, "vm_name": h.vm_name, "point": h.point,
                "snapshot_id": h.snapshot_id, "base": h.base, "completed": time.time(),
                "disks": [{"uuid": d.uuid, "label": d.label, "size": d.size}
                          for d in h.disks]}
        atomic_write_json(self.store.partial_dir / "point.json", meta)
        (self.store.partial_dir / "journal.json").unlink()
        final = self.store.points_dir / _point_name(h.point)
        os.replace(self.store.partial_dir, final)
        fsync_dir(self.store.points_dir)
        fsync_dir(self.store.root)
        return next(p for p in self.store.points() if p.point == h.point)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def check_base(hello: Hello, newest: RestorePoint | None) -> str:
    """Why the receiver cannot take `hello` on top of what it holds ("" when it can)."""
    have = newest.point if newest is not None else 0
    if hello.base and hello.base != have:
        return (f"{hello.identity} is a delta against point {hello.base}, but the newest "
                f"complete point here is {have or 'none'}; push a seed")
    if hello.base and newest is not None and hello.base_snapshot_id != newest.snapshot_id:
        return (f"{hello.identity} is a delta against point {hello.base} of snapshot "
                f"{hello.base_snapshot_id}, but point {have} here is of snapshot "
                f"{newest.snapshot_id} (another source's past); push a seed")
    if newest is not None and hello.point < newest.point:
        return (f"{hello.identity} is older than the newest complete point here "
                f"({newest.point})")
    if newest is not None and hello.point == newest.point and (
            hello.snapshot_id != newest.snapshot_id):
        return (f"{hello.identity} (snapshot {hello.snapshot_id}) is already complete here "
                f"from snapshot {newest.snapshot_id}")
    for d in hello.disks:
        if d.full:
            continue
        assert newest is not None  # a delta has a base, checked above
        src = newest.disk(d.uuid)
        if src is None or src.size != d.size:
            had = "no such disk" if src is None else f"{src.size} bytes"
            return (f"{hello.identity}: disk {d.label} is a delta, but point {newest.point} "
                    f"has {had} (want {d.size} bytes); send it in full")
    return ""


def disks_done(hello: Hello) -> list[ResumeToken]:
    """Tokens that say every disk is done (a point the receiver already holds)."""
    return [ResumeToken(offset=d.size, chain=CHAIN_START, done=True) for d in hello.disks]

