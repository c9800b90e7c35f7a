"""The simulator's VM disks: sparse files with copy-on-write snapshots and change tracking.

A disk is a sparse "live" file divided into fixed blocks (``block_size``, default 64 KiB, a power
of two >= 4 KiB). A snapshot costs O(1): it is a record appended to the disk's metadata. The first
write, zero or trim that touches a block after the newest snapshot copies the block's current
contents into that snapshot's own sparse "preserved" file and adds the block to the snapshot's
block set. The block set doubles as the dirty map: the blocks in snapshot *k*'s set are exactly
the blocks modified between snapshot *k* and snapshot *k+1* (or the live disk). So:

- reading snapshot *k* takes each block from the oldest preserved copy among snapshots >= *k*,
  else from the live file;
- the blocks changed between snapshots *r* < *k* are the union of the sets of *r* .. *k-1*
  (plus, when the disk grew in between, every block from the reference's end onwards);
- deleting snapshot *k* moves the blocks of its set that snapshot *k-1* lacks into *k-1*'s
  preserved file and merges the sets, so every remaining pair stays exact;
- all of this costs in proportion to the blocks written after a snapshot, never the disk size.

A block that is all zero is kept as a hole (zero and trim punch holes; a written block that turns
out all zero is punched too), and SEEK_DATA/SEEK_HOLE read that back: that is how regions are
typed ZEROED without reading data. On a filesystem that cannot punch holes, zeros are written and
such blocks report REGULAR (still correct bytes, only less precise typing).

Granularity of ``changed_regions``: block-exact in terms of *writes*. Every block whose bytes
differ between the two snapshots is reported; a block written, zeroed or trimmed in between is
reported even if its bytes ended up identical (as with real change tracking), except that zeroing
or trimming a block that already was a hole is not a change. Regions are clipped to the queried
``[start, end)`` and to the snapshot's size, coalesced when adjacent and of the same type, and in
offset order. A region is ZEROED when its content in ``snap`` is all zero, otherwise REGULAR.
Without a reference the answer is the snapshot's complete allocation map: the whole queried range
is tiled, REGULAR where a block holds data, ZEROED for never-written, zeroed and trimmed space
(the full-read path skips ZEROED). Trim is modelled as discard-that-reads-zero.

Sizes only grow (a shrink is refused). Clones are sparse-aware copies of the source's allocated
blocks (``copy_file_range``: a reflink where the filesystem shares extents, otherwise an in-kernel
copy), so a clone costs in proportion to the data in the source, not to its size, and is fully
independent of the source afterwards.

On-disk layout under ``root``::

    store.json                     {"format": 1, "block_size": N}
    disks/<disk_id>/meta.json      size, next file number, snapshots oldest first: id, size, file
    disks/<disk_id>/live.img       the live disk, a sparse file of exactly ``size`` bytes
    disks/<disk_id>/pNNNNNN.dat    a snapshot's preserved blocks, at their own offsets (sparse)
    disks/<disk_id>/pNNNNNN.map    that snapshot's block set: sorted little-endian uint64 indices

Metadata files are replaced atomically (write, fsync, rename). A preserved copy is made durable
before its block set names it, and the set before the live file is overwritten.

Thread-safety: mutations of a disk are serialised by a per-disk reader/writer lock; reads (live
or any snapshot) of a disk run concurrently with each other; different disks are independent.
Open one DiskStore per root at a time (a new one, e.g. after a restart, sweeps the scratch
directories a killed process left). Preserved files are opened per operation, so the number of
open files is one per disk however many snapshots exist.
"""

from __future__ import annotations

__all__ = [
    "ChangedRegions",
    "DiskStore",
    "Region",
    "UnknownDiskError",
    "UnknownSnapshotError",
]

import json
import os
import re
import shutil
import sys
import threading
import uuid
from array import array
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ._diskstore_io import (
    RWLock,
    atomic_write,
    copy_range,
    data_segments,
    fsync_dir,
    has_data,
    is_zero,
    pread_into,
    punch,
    pwrite_all,
)

_FORMAT = 1
_LIVE = -1
_DISK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Block ranges up to this many blocks are resolved block by block; longer ones (allocation maps,
# clones) walk the snapshots' block sets once instead.
_SCAN_LIMIT = 4096


class UnknownDiskError(KeyError):
    """No disk with this id exists in the store."""

    def __init__(self, disk_id: str) -> None:
        super().__init__(disk_id)
        self.disk_id = disk_id

    def __str__(self) -> str:
        return f"unknown disk {self.disk_id!r}"


class UnknownSnapshotError(KeyError):
    """The disk has no snapshot with this id."""

    def __init__(self, disk_id: str, snapshot: str) -> None:
        super().__init__(snapshot)
        self.disk_id = disk_id
        self.snapshot = snapshot

    def __str__(self) -> str:
        return f"unknown snapshot {self.snapshot!r} of disk {self.disk_id!r}"


@dataclass(frozen=True)
class Region:
    offset: int
    length: int
    type: Literal["REGULAR", "ZEROED"]


@dataclass(frozen=True)
class ChangedRegions:
    """One page of regions; ``next_offset`` is where the next page starts, None when complete."""

    regions: list[Region]
    file_size: int
    next_offset: int | None


@dataclass
class _Snap:
    id: str
    size: int
    file: str
    blocks: set[int]


class _Disk:
    def __init__(self, disk_id: str, path: Path, *, size: int, next_file: int, snaps: list[_Snap]):
        self.id = disk_id
        self.path = path
        self.size = size
        self.next_file = next_file
        self.snaps = snaps
        self.lock = RWLock()
        self.deleted = False
        self.live_fd = os.open(path / "live.img", os.O_RDWR)

    @contextmanager
    def files(self) -> Generator[_Files, None, None]:
        """Preserved files opened for one operation (so open files never pile up)."""
        files = _Files(self)
        try:
            yield files
        finally:
            files.close()

    def index(self, snapshot: str) -> int:
        for i, s in enumerate(self.snaps):
            if s.id == snapshot:
                return i
        raise UnknownSnapshotError(self.id, snapshot)

    def close(self) -> None:
        os.close(self.live_fd)


class _Files:
    def __init__(self, disk: _Disk) -> None:
        self._disk = disk
        self._fds: dict[str, int] = {}

    def of(self, snap: _Snap) -> int:
        fd = self._fds.get(snap.file)
        if fd is None:
            path = self._disk.path / f"{snap.file}.dat"
            fd = self._fds[snap.file] = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        return fd

    def source(self, src: int) -> int:
        return self._disk.live_fd if src == _LIVE else self.of(self._disk.snaps[src])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class DiskStore:
    """Every disk of a simulator, persisted under ``root`` (see the module docstring)."""

    def __init__(self, root: Path, *, block_size: int = 65536, sync: bool = True) -> None:
        if block_size < 4096 or block_size & (block_size - 1):
            raise ValueError(f"block_size: must be a power of two >= 4096 (got {block_size})")
        self.root = Path(root)
        self._sync = sync
        self._dir = self.root / "disks"
        self._dir.mkdir(parents=True, exist_ok=True)
        store = self.root / "store.json"
        if store.exists():
            stored = json.loads(store.read_text())["block_size"]
            if stored != block_size:
                raise ValueError(
                    f"block_size: the store at {self.root} uses {stored} (got {block_size})"
                )
        else:
            atomic_write(store, _dumps({"format": _FORMAT, "block_size": block_size}), sync=sync)
        self.block_size = block_size
        self._disks: dict[str, _Disk] = {}
        self._creating: set[str] = set()
        self._registry = threading.Lock()
        for leftover in self._dir.glob(".*"):
            shutil.rmtree(leftover, ignore_errors=True)

    # ---- disks -------------------------------------------------------------------------------

    def create_disk(self, disk_id: str, size: int) -> None:
        _check_size(size)
        with self._new_disk(disk_id) as path:
            fd = os.open(path / "live.img", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            self._save_meta_at(path, size=size, next_file=1, snaps=[])

    def clone_disk(self, disk_id: str, *, source_disk: str, snapshot: str | None) -> None:
        """Make an independent disk holding ``source_disk`` as of ``snapshot`` (None: live)."""
        bs = self.block_size
        with self._new_disk(disk_id) as path, self._locked(source_disk) as src:
            if snapshot is None:
                size = src.size
                runs: Iterable[tuple[int, int, int]] = [(0, _blocks(size, bs), _LIVE)]
            else:
                idx = src.index(snapshot)
                size = src.snaps[idx].size
                runs = self._runs(src, idx, 0, _blocks(size, bs))
            fd = os.open(path / "live.img", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.ftruncate(fd, size)
                with src.files() as files:
                    for b0, b1, source in runs:
                        copy_range(files.source(source), fd, b0 * bs, min(b1 * bs, size))
                if self._sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._save_meta_at(path, size=size, next_file=1, snaps=[])

    def delete_disk(self, disk_id: str) -> None:
        with self._locked(disk_id, exclusive=True) as d:
            trash = self._dir / f".trash-{uuid.uuid4().hex}"
            with self._registry:
                d.deleted = True
                del self._disks[disk_id]
                d.close()
                d.path.rename(trash)
        shutil.rmtree(trash)

    def disks(self) -> list[str]:
        return sorted(
            p.name for p in self._dir.iterdir() if _DISK_ID.fullmatch(p.name) and p.is_dir()
        )

    def size(self, disk_id: str) -> int:
        with self._locked(disk_id) as d:
            return d.size

    def resize(self, disk_id: str, new_size: int) -> None:
        """Grow the disk; the new space reads as zero. Shrinking is refused."""
        _check_size(new_size)
        with self._locked(disk_id, exclusive=True) as d:
            if new_size < d.size:
                raise ValueError(
                    f"disk {disk_id!r}: cannot shrink from {d.size} to {new_size} bytes"
                )
            if new_size != d.size:
                os.ftruncate(d.live_fd, new_size)
                d.size = new_size
                self._save_meta(d)

    # ---- live I/O ----------------------------------------------------------------------------

    def write(self, disk_id: str, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        with self._locked(disk_id, exclusive=True) as d:
            _check_range("write", d, d.size, offset, view.nbytes)
            if not view.nbytes:
                return
            self._preserve(d, offset, offset + view.nbytes, only_data=False)
            pwrite_all(d.live_fd, view, offset)
            bs = self.block_size
            end = offset + view.nbytes
            for b in range(offset // bs, _blocks(end, bs)):
                lo, hi = max(b * bs, offset), min((b + 1) * bs, end)
                if is_zero(view[lo - offset : hi - offset]):
                    self._punch_if_zero(d, b)

    def zero(self, disk_id: str, offset: int, length: int) -> None:
        """Explicitly write zeros over the range."""
        self._discard("zero", disk_id, offset, length)

    def trim(self, disk_id: str, offset: int, length: int) -> None:
        """Discard the range; it reads as zero afterwards (and its space is freed)."""
        self._discard("trim", disk_id, offset, length)

    def read(self, disk_id: str, offset: int, length: int) -> bytes:
        with self._locked(disk_id) as d:
            _check_range("read", d, d.size, offset, length)
            buf = bytearray(length)
            pread_into(d.live_fd, memoryview(buf), offset)
        return bytes(buf)

    # ---- snapshots ---------------------------------------------------------------------------

    def snapshot(self, disk_id: str) -> str:
        with self._locked(disk_id, exclusive=True) as d:
            snap = _Snap(str(uuid.uuid4()), d.size, f"p{d.next_file:06d}", set())
            d.next_file += 1
            d.snaps.append(snap)
            self._save_meta(d)
            return snap.id

    def snapshots(self, disk_id: str) -> list[str]:
        with self._locked(disk_id) as d:
            return [s.id for s in d.snaps]

    def snapshot_size(self, disk_id: str, snap: str) -> int:
        with self._locked(disk_id) as d:
            return d.snaps[d.index(snap)].size

    def read_snapshot(self, disk_id: str, snap: str, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        with self._locked(disk_id) as d:
            idx = d.index(snap)
            _check_range("read", d, d.snaps[idx].size, offset, length)
            self._read_snapshot(d, idx, offset, memoryview(buf))
        return bytes(buf)

    def read_snapshot_into(self, disk_id: str, snap: str, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from the snapshot at ``offset``; returns the count (short at its end)."""
        view = memoryview(buf).cast("B")
        with self._locked(disk_id) as d:
            idx = d.index(snap)
            size = d.snaps[idx].size
            if not 0 <= offset <= size:
                raise ValueError(
                    f"read at offset {offset} is outside snapshot {snap!r} of disk {disk_id!r} "
                    f"(size {size})"
                )
            n = min(view.nbytes, size - offset)
            self._read_snapshot(d, idx, offset, view[:n])
            return n

    def delete_snapshot(self, disk_id: str, snap: str) -> None:
        bs = self.block_size
        with self._locked(disk_id, exclusive=True) as d:
            idx = d.index(snap)
            gone = d.snaps[idx]
            if idx > 0:
                prev = d.snaps[idx - 1]
                moved = sorted(gone.blocks - prev.blocks)
                if moved:
                    with d.files() as files:
                        src, dst = files.of(gone), files.of(prev)
                        for b0, b1 in _block_runs(moved):
                            copy_range(src, dst, b0 * bs, b1 * bs)
                        if self._sync:
                            os.fsync(dst)
                    prev.blocks.update(moved)
                    self._save_map(d, prev)
            del d.snaps[idx]
            self._save_meta(d)
            for suffix in (".dat", ".map"):
                (d.path / f"{gone.file}{suffix}").unlink(missing_ok=True)

    def changed_regions(
        self,
        disk_id: str,
        snap: str,
        reference: str | None = None,
        *,
        start: int = 0,
        end: int | None = None,
        limit: int | None = None,
    ) -> ChangedRegions:
        """Regions of ``snap`` that differ from ``reference`` (None: the allocation map).

        See the module docstring for the exact semantics; ``limit`` caps the number of regions
        and sets ``next_offset`` to the start of the first region left out.
        """
        if limit is not None and limit < 1:
            raise ValueError(f"limit: must be at least 1 (got {limit})")
        bs = self.block_size
        with self._locked(disk_id) as d:
            idx = d.index(snap)
            size = d.snaps[idx].size
            stop = size if end is None else min(end, size)
            if start < 0 or stop < start:
                raise ValueError(
                    f"changed regions of disk {disk_id!r}: bad range start={start} end={end} "
                    f"(snapshot size {size})"
                )
            b0, b1 = start // bs, _blocks(stop, bs)
            with d.files() as files:
                typed = self._typed_changes(d, files, idx, reference, b0, b1)
        regions = _to_regions(typed, bs, start, stop)
        if limit is not None and len(regions) > limit:
            return ChangedRegions(regions[:limit], size, regions[limit].offset)
        return ChangedRegions(regions, size, None)

    def close(self) -> None:
        """Close every open file; the store must not be used afterwards."""
        with self._registry:
            for d in self._disks.values():
                d.close()
            self._disks.clear()

    def __enter__(self) -> DiskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ---------------------------------------------------------------------------

    @contextmanager
    def _locked(self, disk_id: str, *, exclusive: bool = False) -> Generator[_Disk, None, None]:
        d = self._disk(disk_id)
        with d.lock.exclusive() if exclusive else d.lock.shared():
            if d.deleted:
                raise UnknownDiskError(disk_id)
            yield d

    def _disk(self, disk_id: str) -> _Disk:
        with self._registry:
            d = self._disks.get(disk_id)
            if d is not None:
                return d
            path = self._dir / disk_id
            if not _DISK_ID.fullmatch(disk_id) or not (path / "meta.json").exists():
                raise UnknownDiskError(disk_id)
            meta = json.loads((path / "meta.json").read_text())
            snaps = [
                _Snap(s["id"], s["size"], s["file"], _load_map(path / f"{s['file']}.map"))
                for s in meta["snapshots"]
            ]
            d = _Disk(disk_id, path, size=meta["size"], next_file=meta["next_file"], snaps=snaps)
            self._disks[disk_id] = d
            return d

    @contextmanager
    def _new_disk(self, disk_id: str) -> Generator[Path, None, None]:
        """Reserve ``disk_id``, let the caller fill a scratch directory, then publish it whole."""
        if not _DISK_ID.fullmatch(disk_id):
            raise ValueError(f"disk id: must match {_DISK_ID.pattern} (got {disk_id!r})")
        final = self._dir / disk_id
        with self._registry:
            if disk_id in self._creating or final.exists():
                raise ValueError(f"disk {disk_id!r} already exists")
            self._creating.add(disk_id)
        scratch = self._dir / f".new-{uuid.uuid4().hex}"
        try:
            scratch.mkdir()
            yield scratch
            scratch.rename(final)
            if self._sync:
                fsync_dir(self._dir)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        finally:
            with self._registry:
                self._creating.discard(disk_id)

    def _discard(self, op: str, disk_id: str, offset: int, length: int) -> None:
        bs = self.block_size
        with self._locked(disk_id, exclusive=True) as d:
            _check_range(op, d, d.size, offset, length)
            if not length:
                return
            end = offset + length
            self._preserve(d, offset, end, only_data=True)
            punch(d.live_fd, offset, length)
            for b in {offset // bs, (end - 1) // bs}:
                self._punch_if_zero(d, b)

    def _preserve(self, d: _Disk, start: int, end: int, *, only_data: bool) -> None:
        """Copy-on-write: save the blocks of [start, end) the newest snapshot has not saved yet."""
        if not d.snaps:
            return
        bs = self.block_size
        newest = d.snaps[-1]
        b0, b1 = start // bs, _blocks(end, bs)
        if only_data:
            candidates: Iterable[int] = (
                b
                for lo, hi in data_segments(d.live_fd, b0 * bs, b1 * bs)
                for b in range(lo // bs, _blocks(hi, bs))
            )
        else:
            candidates = range(b0, b1)
        new = sorted({b for b in candidates if b not in newest.blocks})
        if not new:
            return
        with d.files() as files:
            fd = files.of(newest)
            for r0, r1 in _block_runs(new):
                copy_range(d.live_fd, fd, r0 * bs, r1 * bs)
            if self._sync:
                os.fsync(fd)
        newest.blocks.update(new)
        self._save_map(d, newest)

    def _punch_if_zero(self, d: _Disk, block: int) -> None:
        bs = self.block_size
        lo, hi = block * bs, min((block + 1) * bs, d.size)
        if not has_data(d.live_fd, lo, hi):
            return
        buf = memoryview(bytearray(hi - lo))
        pread_into(d.live_fd, buf, lo)
        if is_zero(buf):
            punch(d.live_fd, lo, bs)

    def _read_snapshot(self, d: _Disk, idx: int, offset: int, view: memoryview) -> None:
        bs = self.block_size
        end = offset + view.nbytes
        if not view.nbytes:
            return
        with d.files() as files:
            for b0, b1, src in self._runs(d, idx, offset // bs, _blocks(end, bs)):
                lo, hi = max(b0 * bs, offset), min(b1 * bs, end)
                pread_into(files.source(src), view[lo - offset : hi - offset], lo)

    def _runs(self, d: _Disk, idx: int, b0: int, b1: int) -> Iterator[tuple[int, int, int]]:
        """Cover blocks [b0, b1) of snapshot ``idx`` with (start, end, source) runs, in order.

        The source is the index of the snapshot holding the block's preserved copy, or _LIVE.
        """
        later = [(j, d.snaps[j].blocks) for j in range(idx, len(d.snaps)) if d.snaps[j].blocks]
        if not later:
            pieces: Iterable[tuple[int, int, int]] = [(b0, b1, _LIVE)]
        elif b1 - b0 <= _SCAN_LIMIT:
            pieces = (
                (b, b + 1, next((j for j, blocks in later if b in blocks), _LIVE))
                for b in range(b0, b1)
            )
        else:
            owner: dict[int, int] = {}
            for j, blocks in reversed(later):
                owner.update((b, j) for b in blocks if b0 <= b < b1)
            pieces = _with_gaps(sorted(owner.items()), b0, b1)
        return _coalesce(pieces)

    def _alloc_map(
        self, d: _Disk, files: _Files, idx: int, b0: int, b1: int
    ) -> list[tuple[int, int, bool]]:
        """Tile blocks [b0, b1) of snapshot ``idx`` as (start, end, holds_data) runs."""
        bs = self.block_size
        out: list[tuple[int, int, bool]] = []
        for r0, r1, src in self._runs(d, idx, b0, b1):
            pos = r0
            for lo, hi in data_segments(files.source(src), r0 * bs, r1 * bs):
                first, last = lo // bs, _blocks(hi, bs)
                if last <= pos:
                    continue
                if first > pos:
                    out.append((pos, first, False))
                out.append((max(first, pos), last, True))
                pos = last
            if pos < r1:
                out.append((pos, r1, False))
        return out

    def _typed_changes(
        self, d: _Disk, files: _Files, idx: int, reference: str | None, b0: int, b1: int
    ) -> list[tuple[int, int, bool]]:
        if reference is None:
            return self._alloc_map(d, files, idx, b0, b1)
        ref = d.index(reference)
        if ref > idx:
            raise ValueError(
                f"changed regions of disk {d.id!r}: reference {reference!r} is newer than "
                f"snapshot {d.snaps[idx].id!r}"
            )
        bs = self.block_size
        size, ref_size = d.snaps[idx].size, d.snaps[ref].size
        grown_from = ref_size // bs if size > ref_size else b1
        changed: set[int] = set()
        for s in d.snaps[ref:idx]:
            changed.update(b for b in s.blocks if b0 <= b < min(b1, grown_from))
        typed = []
        for r0, r1 in _block_runs(sorted(changed)):
            typed.extend(self._alloc_map(d, files, idx, r0, r1))
        if grown_from < b1:
            typed.extend(self._alloc_map(d, files, idx, max(grown_from, b0), b1))
        return typed

    def _save_meta(self, d: _Disk) -> None:
        self._save_meta_at(d.path, size=d.size, next_file=d.next_file, snaps=d.snaps)

    def _save_meta_at(self, path: Path, *, size: int, next_file: int, snaps: list[_Snap]) -> None:
        meta = {
            "format": _FORMAT,
            "size": size,
            "next_file": next_file,
            "snapshots": [{"id": s.id, "size": s.size, "file": s.file} for s in snaps],
        }
        atomic_write(path / "meta.json", _dumps(meta), sync=self._sync)

    def _save_map(self, d: _Disk, snap: _Snap) -> None:
        data = array("Q", sorted(snap.blocks))
        if sys.byteorder == "big":
            data.byteswap()
        atomic_write(d.path / f"{snap.file}.map", data.tobytes(), sync=self._sync)


def _load_map(path: Path) -> set[int]:
    data = array("Q")
    if path.exists():
        data.frombytes(path.read_bytes())
        if sys.byteorder == "big":
            data.byteswap()
    return set(data)


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, indent=1).encode()


def _blocks(nbytes: int, bs: int) -> int:
    return -(-nbytes // bs)


def _check_size(size: int) -> None:
    if size < 0:
        raise ValueError(f"disk size: must not be negative (got {size})")


def _check_range(op: str, d: _Disk, size: int, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(
            f"{op} of {length} bytes at offset {offset} is outside disk {d.id!r} (size {size})"
        )


def _block_runs(sorted_blocks: list[int]) -> Iterator[tuple[int, int]]:
    """Group sorted block numbers into [start, end) runs of consecutive blocks."""
    it = iter(sorted_blocks)
    first = next(it, None)
    if first is None:
        return
    lo = hi = first
    for b in it:
        if b != hi + 1:
            yield lo, hi + 1
            lo = b
        hi = b
    yield lo, hi + 1


def _with_gaps(owned: list[tuple[int, int]], b0: int, b1: int) -> Iterator[tuple[int, int, int]]:
    pos = b0
    for b, j in owned:
        if b > pos:
            yield pos, b, _LIVE
        yield b, b + 1, j
        pos = b + 1
    if pos < b1:
        yield pos, b1, _LIVE


def _coalesce(pieces: Iterable[tuple[int, int, int]]) -> Iterator[tuple[int, int, int]]:
    cur: tuple[int, int, int] | None = None
    for lo, hi, src in pieces:
        if cur is not None and cur[1] == lo and cur[2] == src:
            cur = (cur[0], hi, src)
            continue
        if cur is not None:
            yield cur
        cur = (lo, hi, src)
    if cur is not None:
        yield cur


def _to_regions(typed: list[tuple[int, int, bool]], bs: int, start: int, stop: int) -> list[Region]:
    regions: list[Region] = []
    for b0, b1, data in typed:
        lo, hi = max(b0 * bs, start), min(b1 * bs, stop)
        if lo >= hi:
            continue
        kind: Literal["REGULAR", "ZEROED"] = "REGULAR" if data else "ZEROED"
        last = regions[-1] if regions else None
        if last is not None and last.offset + last.length == lo and last.type == kind:
            regions[-1] = Region(last.offset, hi - last.offset, kind)
        else:
            regions.append(Region(lo, hi - lo, kind))
    return regions
