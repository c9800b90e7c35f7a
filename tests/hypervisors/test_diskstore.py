"""The simulator's disk store: byte-exact snapshots, exact change tracking, cheap snapshots.

The model-based test drives random writes, zeroes, trims, grows, snapshots and snapshot deletions
against the store and a plain in-memory model, then checks every snapshot's bytes and every
changed-regions answer against the model. This filesystem must support hole punching and
SEEK_DATA (ext4, xfs, btrfs, tmpfs do), which is what makes ZEROED typing exact.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ahvbackup.hypervisors.ahv.simulator import diskstore
from ahvbackup.hypervisors.ahv.simulator.diskstore import (
    ChangedRegions,
    DiskStore,
    Region,
    UnknownDiskError,
    UnknownSnapshotError,
)

BS = 16384  # four filesystem pages, so a block can hold data, a hole, then data
GiB = 1 << 30
MiB = 1 << 20


def allocated(root: Path) -> int:
    """Bytes the filesystem really holds for everything under root."""
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


# ---- the model -------------------------------------------------------------------------------


@dataclass
class _ModelSnap:
    id: str
    data: bytes
    touched: set[int] = field(default_factory=set)  # blocks modified after it, before the next


class Model:
    def __init__(self, size: int) -> None:
        self.live = bytearray(size)
        self.snaps: list[_ModelSnap] = []

    def _nonzero(self, b: int) -> bool:
        return any(self.live[b * BS : (b + 1) * BS])

    def _touch(self, blocks: set[int]) -> None:
        if self.snaps:
            self.snaps[-1].touched |= blocks

    def write(self, offset: int, data: bytes) -> None:
        if data:
            self._touch(set(range(offset // BS, (offset + len(data) - 1) // BS + 1)))
        self.live[offset : offset + len(data)] = data

    def zero(self, offset: int, length: int) -> None:
        if length:
            blocks = range(offset // BS, (offset + length - 1) // BS + 1)
            self._touch({b for b in blocks if self._nonzero(b)})
        self.live[offset : offset + length] = bytes(length)

    def delete(self, i: int) -> None:
        if i > 0:
            self.snaps[i - 1].touched |= self.snaps[i].touched
        del self.snaps[i]


def _block(data: bytes, b: int) -> bytes:
    return data[b * BS : (b + 1) * BS]


def _nblocks(size: int) -> int:
    return -(-size // BS)


def covered_blocks(regions: list[Region]) -> dict[int, str]:
    out: dict[int, str] = {}
    for r in regions:
        for b in range(r.offset // BS, (r.offset + r.length - 1) // BS + 1):
            out[b] = r.type
    return out


def check_shape(result: ChangedRegions, size: int) -> None:
    """Ordered, non-overlapping, inside the disk, coalesced, block-aligned except at the end."""
    assert result.file_size == size
    prev: Region | None = None
    for r in result.regions:
        assert r.length > 0
        assert r.offset % BS == 0
        assert r.offset + r.length <= size
        assert (r.offset + r.length) % BS == 0 or r.offset + r.length == size
        if prev is not None:
            assert prev.offset + prev.length <= r.offset
            assert not (prev.offset + prev.length == r.offset and prev.type == r.type)
        prev = r


def check_typing(regions: list[Region], data: bytes) -> None:
    for b, kind in covered_blocks(regions).items():
        assert kind == ("REGULAR" if any(_block(data, b)) else "ZEROED"), (b, kind)


def paged(store: DiskStore, snap: str, ref: str | None, limit: int) -> list[Region]:
    out: list[Region] = []
    start = 0
    while True:
        page = store.changed_regions("d", snap, ref, start=start, limit=limit)
        assert len(page.regions) <= limit
        out.extend(page.regions)
        if page.next_offset is None:
            return out
        assert page.next_offset > start
        start = page.next_offset


def clip(regions: list[Region], start: int, end: int) -> list[Region]:
    out = []
    for r in regions:
        lo, hi = max(r.offset, start), min(r.offset + r.length, end)
        if lo < hi:
            out.append(Region(lo, hi - lo, r.type))
    return out


def check_against_model(store: DiskStore, model: Model, rnd: random.Random) -> None:
    assert store.read("d", 0, len(model.live)) == bytes(model.live)
    assert store.snapshots("d") == [s.id for s in model.snaps]
    for k, snap in enumerate(model.snaps):
        size = len(snap.data)
        assert store.snapshot_size("d", snap.id) == size
        assert store.read_snapshot("d", snap.id, 0, size) == snap.data
        offset = rnd.randrange(size + 1)
        buf = bytearray(rnd.randrange(1, 3 * BS))
        n = store.read_snapshot_into("d", snap.id, offset, memoryview(buf))
        assert n == min(len(buf), size - offset)
        assert bytes(buf[:n]) == snap.data[offset : offset + n]

        full = store.changed_regions("d", snap.id)
        check_shape(full, size)
        assert sum(r.length for r in full.regions) == size  # the allocation map tiles the disk
        check_typing(full.regions, snap.data)
        assert paged(store, snap.id, None, 2) == full.regions

        for r, ref in enumerate(model.snaps[: k + 1]):
            result = store.changed_regions("d", snap.id, ref.id)
            check_shape(result, size)
            check_typing(result.regions, snap.data)
            covered = covered_blocks(result.regions)
            grown = (
                set(range(len(ref.data) // BS, _nblocks(size))) if size > len(ref.data) else set()
            )
            touched = set().union(*(s.touched for s in model.snaps[r:k])) | grown
            differ = {
                b
                for b in range(_nblocks(size))
                if b in grown or _block(snap.data, b) != _block(ref.data, b)
            }
            assert differ <= covered.keys(), "a changed block was not reported"
            assert covered.keys() <= touched, "an untouched block was reported"
            assert paged(store, snap.id, ref.id, 1) == result.regions
            start = rnd.randrange(size + 1)
            end = rnd.randrange(start, size + 1)
            part = store.changed_regions("d", snap.id, ref.id, start=start, end=end)
            assert part.regions == clip(result.regions, start, end)


# ---- model-based test ------------------------------------------------------------------------


def _payload(data: st.DataObject, length: int) -> bytes:
    kind = data.draw(st.sampled_from(["random", "fill", "zeros", "sparse"]))
    if kind == "zeros":
        return bytes(length)
    if kind == "fill":
        return bytes([data.draw(st.integers(1, 255))]) * length
    rnd = random.Random(data.draw(st.integers(0, 2**32)))
    out = bytearray(rnd.randbytes(length))
    if kind == "sparse":
        for _ in range(3):
            lo = rnd.randrange(length + 1)
            hi = rnd.randrange(lo, length + 1)
            out[lo:hi] = bytes(hi - lo)
    return bytes(out)


def _range(data: st.DataObject, size: int) -> tuple[int, int]:
    offset = data.draw(st.integers(0, size))
    aligned = data.draw(st.booleans())
    if aligned:
        offset -= offset % BS
    length = data.draw(st.integers(0, min(size - offset, 5 * BS)))
    if aligned and offset + length < size:
        length -= length % BS
    return offset, length


OPS = ["write"] * 6 + ["zero", "trim"] * 2 + ["grow"] + ["snap"] * 4 + ["delete"] * 3


@pytest.mark.parametrize("scan_limit", [diskstore._SCAN_LIMIT, 0], ids=["per-block", "walk-sets"])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(0, 10 * BS + 700),
    data=st.data(),
)
def test_snapshots_and_changed_regions_match_a_model(
    scan_limit: int, size: int, data: st.DataObject
) -> None:
    saved = diskstore._SCAN_LIMIT
    diskstore._SCAN_LIMIT = scan_limit
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _run_model(Path(tmp), size, data)
    finally:
        diskstore._SCAN_LIMIT = saved


def _run_model(root: Path, size: int, data: st.DataObject) -> None:
    store = DiskStore(root, block_size=BS, sync=False)
    store.create_disk("d", size)
    model = Model(size)
    ops = data.draw(st.lists(st.sampled_from(OPS), min_size=8, max_size=40))
    for op in ops:
        size = len(model.live)
        if op == "write":
            offset, length = _range(data, size)
            payload = _payload(data, length)
            store.write("d", offset, payload)
            model.write(offset, payload)
        elif op in ("zero", "trim"):
            offset, length = _range(data, size)
            getattr(store, op)("d", offset, length)
            model.zero(offset, length)
        elif op == "grow":
            new = size + data.draw(st.integers(0, 3 * BS + 300))
            store.resize("d", new)
            model.live.extend(bytes(new - size))
        elif op == "snap":
            model.snaps.append(_ModelSnap(store.snapshot("d"), bytes(model.live)))
        elif model.snaps:
            i = data.draw(st.integers(0, len(model.snaps) - 1))
            store.delete_snapshot("d", model.snaps[i].id)
            model.delete(i)
    rnd = random.Random(data.draw(st.integers(0, 2**32)))
    check_against_model(store, model, rnd)

    store.close()
    reopened = DiskStore(root, block_size=BS, sync=False)
    check_against_model(reopened, model, rnd)

    if model.snaps:
        src = rnd.choice(model.snaps)
        reopened.clone_disk("c", source_disk="d", snapshot=src.id)
        assert reopened.read("c", 0, len(src.data)) == src.data
        clone_live = reopened.changed_regions("c", reopened.snapshot("c"))
        assert clone_live.regions == reopened.changed_regions("d", src.id).regions
    reopened.close()


# ---- cost ------------------------------------------------------------------------------------


def test_a_100_gib_disk_snapshotted_100_times_costs_only_the_blocks_written(
    tmp_path: Path,
) -> None:
    open_files = len(os.listdir("/proc/self/fd"))
    began = time.monotonic()
    store = DiskStore(tmp_path)
    bs = store.block_size
    store.create_disk("d", 100 * GiB)
    store.write("d", 0, b"\x01" * MiB)
    snaps = []
    for i in range(100):
        snaps.append(store.snapshot("d"))
        store.write("d", i * GiB + 5 * bs, bytes([i + 1]) * bs)  # one block per snapshot epoch
    elapsed = time.monotonic() - began

    written = MiB + 100 * bs
    # live data + at most one preserved copy of each written block + small per-snapshot metadata
    assert allocated(tmp_path) < 2 * written + 100 * 16 * 1024
    assert len(list(tmp_path.rglob("*"))) < 2 * 100 + 10
    assert elapsed < 60, f"100 snapshots of a 100 GiB disk took {elapsed:.1f}s"
    for s in snaps:
        store.read_snapshot("d", s, 0, bs)
    assert len(os.listdir("/proc/self/fd")) <= open_files + 2  # the live file, not 100 snapshots

    first, last = snaps[0], snaps[-1]
    regions = store.changed_regions("d", last, first).regions
    assert regions == [Region(i * GiB + 5 * bs, bs, "REGULAR") for i in range(99)]
    alloc = store.changed_regions("d", first).regions
    assert [r for r in alloc if r.type == "REGULAR"] == [Region(0, MiB, "REGULAR")]
    assert sum(r.length for r in alloc) == 100 * GiB

    # deleting every other snapshot keeps every remaining pair exact
    for s in snaps[1::2]:
        store.delete_snapshot("d", s)
    kept = snaps[::2]
    assert store.snapshots("d") == kept
    for n, s in enumerate(kept):
        i = 2 * n
        own = store.read_snapshot("d", s, i * GiB + 5 * bs, bs)
        assert own == (b"\x01" * bs if i == 0 else bytes(bs))
        if i:
            assert store.read_snapshot("d", s, (i - 1) * GiB + 5 * bs, bs) == bytes([i]) * bs
        if n:
            changed = store.changed_regions("d", s, kept[n - 1]).regions
            assert changed == [
                Region((i - 2) * GiB + 5 * bs, bs, "REGULAR"),
                Region((i - 1) * GiB + 5 * bs, bs, "REGULAR"),
            ]
    store.close()


# ---- scenarios -------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> DiskStore:
    s = DiskStore(tmp_path, block_size=BS)
    s.create_disk("d", 16 * BS)
    yield s  # type: ignore[misc]
    s.close()


def test_deleting_a_middle_snapshot_keeps_the_older_one_readable_and_its_changes_exact(
    store: DiskStore,
) -> None:
    store.write("d", 0, b"A" * 4 * BS)
    s1 = store.snapshot("d")
    store.write("d", BS, b"B" * BS)  # after s1: block 1
    s2 = store.snapshot("d")
    store.write("d", 2 * BS, b"C" * BS)  # after s2: block 2
    store.write("d", BS, b"D" * BS)  # after s2: block 1 again
    s3 = store.snapshot("d")
    store.delete_snapshot("d", s2)

    assert store.snapshots("d") == [s1, s3]
    assert store.read_snapshot("d", s1, 0, 4 * BS) == b"A" * 4 * BS
    assert store.read_snapshot("d", s3, 0, 4 * BS) == b"A" * BS + b"D" * BS + b"C" * BS + b"A" * BS
    assert store.changed_regions("d", s3, s1).regions == [Region(BS, 2 * BS, "REGULAR")]


def test_zeroed_and_trimmed_blocks_are_reported_zeroed_and_free_their_space(
    store: DiskStore, tmp_path: Path
) -> None:
    live = tmp_path / "disks" / "d" / "live.img"
    store.write("d", 0, os.urandom(8 * BS))
    s1 = store.snapshot("d")
    before = live.stat().st_blocks
    store.zero("d", 2 * BS, 2 * BS)
    store.trim("d", 6 * BS, 2 * BS)
    store.trim("d", 12 * BS, 2 * BS)  # never written: not a change
    s2 = store.snapshot("d")

    assert store.changed_regions("d", s2, s1).regions == [
        Region(2 * BS, 2 * BS, "ZEROED"),
        Region(6 * BS, 2 * BS, "ZEROED"),
    ]
    assert live.stat().st_blocks * 512 <= before * 512 - 4 * BS
    assert store.read("d", 2 * BS, 2 * BS) == bytes(2 * BS)
    assert store.changed_regions("d", s2).regions == [
        Region(0, 2 * BS, "REGULAR"),
        Region(2 * BS, 2 * BS, "ZEROED"),
        Region(4 * BS, 2 * BS, "REGULAR"),
        Region(6 * BS, 10 * BS, "ZEROED"),
    ]


def test_writing_zeros_over_a_whole_block_makes_it_zeroed(store: DiskStore) -> None:
    store.write("d", 0, b"x" * 2 * BS)
    s1 = store.snapshot("d")
    store.write("d", BS - 10, bytes(BS + 10))  # the tail of block 0 and all of block 1
    s2 = store.snapshot("d")
    assert store.changed_regions("d", s2, s1).regions == [
        Region(0, BS, "REGULAR"),
        Region(BS, BS, "ZEROED"),
    ]


def test_growing_reports_the_new_space_against_an_older_reference(store: DiskStore) -> None:
    store.write("d", 0, b"x" * BS)
    s1 = store.snapshot("d")
    store.resize("d", 20 * BS + 100)
    store.write("d", 18 * BS, b"y" * BS)
    s2 = store.snapshot("d")
    result = store.changed_regions("d", s2, s1)
    assert result.file_size == 20 * BS + 100
    assert result.regions == [
        Region(16 * BS, 2 * BS, "ZEROED"),
        Region(18 * BS, BS, "REGULAR"),
        Region(19 * BS, BS + 100, "ZEROED"),
    ]
    assert store.snapshot_size("d", s1) == 16 * BS
    assert store.read_snapshot("d", s2, 16 * BS, 4 * BS + 100) == (
        bytes(2 * BS) + b"y" * BS + bytes(BS + 100)
    )


def test_pagination_resumes_at_next_offset(store: DiskStore) -> None:
    s1 = store.snapshot("d")
    for b in (1, 3, 5, 7):
        store.write("d", b * BS, b"z" * BS)
    s2 = store.snapshot("d")
    first = store.changed_regions("d", s2, s1, limit=3)
    assert [r.offset for r in first.regions] == [BS, 3 * BS, 5 * BS]
    assert first.next_offset == 7 * BS
    rest = store.changed_regions("d", s2, s1, start=first.next_offset, limit=3)
    assert rest.regions == [Region(7 * BS, BS, "REGULAR")]
    assert rest.next_offset is None


def test_a_clone_is_independent_of_its_source(store: DiskStore) -> None:
    store.write("d", 0, b"1" * BS)
    s1 = store.snapshot("d")
    store.write("d", 0, b"2" * BS)
    store.clone_disk("from-snap", source_disk="d", snapshot=s1)
    store.clone_disk("from-live", source_disk="d", snapshot=None)
    store.write("from-snap", BS, b"3" * BS)
    store.delete_disk("d")

    assert store.disks() == ["from-live", "from-snap"]
    assert store.read("from-snap", 0, 2 * BS) == b"1" * BS + b"3" * BS
    assert store.read("from-live", 0, 2 * BS) == b"2" * BS + bytes(BS)
    assert store.snapshots("from-live") == []


def test_a_clone_costs_the_data_not_the_disk_size(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    store.create_disk("big", 50 * GiB)
    store.write("big", 7 * GiB, os.urandom(MiB))
    snap = store.snapshot("big")
    store.write("big", 7 * GiB, os.urandom(MiB))
    before = allocated(tmp_path)
    store.clone_disk("copy", source_disk="big", snapshot=snap)
    assert allocated(tmp_path / "disks" / "copy") < 2 * MiB
    assert allocated(tmp_path) - before < 2 * MiB
    assert store.changed_regions("copy", store.snapshot("copy")).regions == [
        Region(0, 7 * GiB, "ZEROED"),
        Region(7 * GiB, MiB, "REGULAR"),
        Region(7 * GiB + MiB, 43 * GiB - MiB, "ZEROED"),
    ]
    assert store.read("copy", 7 * GiB, MiB) == store.read_snapshot("big", snap, 7 * GiB, MiB)
    store.close()


def test_a_new_store_on_the_same_root_sees_everything(tmp_path: Path) -> None:
    with DiskStore(tmp_path, block_size=BS) as first:
        first.create_disk("d", 4 * BS)
        first.write("d", 0, b"a" * BS)
        s1 = first.snapshot("d")
        first.write("d", 0, b"b" * BS)
        first.resize("d", 6 * BS)
        s2 = first.snapshot("d")
        first.trim("d", 0, BS)
        expected = first.changed_regions("d", s2, s1)
    with DiskStore(tmp_path, block_size=BS) as second:
        assert second.disks() == ["d"]
        assert second.size("d") == 6 * BS
        assert second.snapshots("d") == [s1, s2]
        assert second.read_snapshot("d", s1, 0, BS) == b"a" * BS
        assert second.read_snapshot("d", s2, 0, BS) == b"b" * BS
        assert second.read("d", 0, BS) == bytes(BS)
        assert second.changed_regions("d", s2, s1) == expected
        assert second.changed_regions("d", s2, s1).regions[0] == Region(0, BS, "REGULAR")
    with pytest.raises(ValueError, match=r"block_size: the store at .* uses 16384 \(got 65536\)"):
        DiskStore(tmp_path)


# ---- errors ----------------------------------------------------------------------------------


def test_unknown_disks_and_snapshots_are_key_errors_naming_them(store: DiskStore) -> None:
    with pytest.raises(UnknownDiskError, match="unknown disk 'nope'") as err:
        store.read("nope", 0, 1)
    assert isinstance(err.value, KeyError)
    with pytest.raises(UnknownDiskError):
        store.snapshot("../d")
    with pytest.raises(UnknownSnapshotError, match="unknown snapshot 'zz' of disk 'd'") as serr:
        store.read_snapshot("d", "zz", 0, 1)
    assert isinstance(serr.value, KeyError)
    s1 = store.snapshot("d")
    with pytest.raises(UnknownSnapshotError):
        store.changed_regions("d", s1, "zz")
    store.delete_disk("d")
    with pytest.raises(UnknownDiskError):
        store.snapshots("d")


def test_bad_ranges_and_requests_are_value_errors_with_the_numbers(store: DiskStore) -> None:
    size = 16 * BS
    with pytest.raises(
        ValueError, match=rf"write of 2 bytes at offset {size - 1} .* \(size {size}\)"
    ):
        store.write("d", size - 1, b"xy")
    with pytest.raises(ValueError, match=r"read of 1 bytes at offset -1"):
        store.read("d", -1, 1)
    with pytest.raises(ValueError, match=rf"cannot shrink from {size} to {size - 1} bytes"):
        store.resize("d", size - 1)
    s1 = store.snapshot("d")
    s2 = store.snapshot("d")
    with pytest.raises(ValueError, match="is newer than snapshot"):
        store.changed_regions("d", s1, s2)
    with pytest.raises(ValueError, match=rf"offset {size + 1} is outside snapshot"):
        store.read_snapshot_into("d", s1, size + 1, memoryview(bytearray(1)))
    with pytest.raises(ValueError, match="already exists"):
        store.create_disk("d", 1)
    with pytest.raises(ValueError, match="disk id: must match"):
        store.create_disk("a/b", 1)
    with pytest.raises(ValueError, match="block_size: must be a power of two"):
        DiskStore(Path(tempfile.gettempdir()) / "never-created", block_size=1000)


# ---- concurrency -----------------------------------------------------------------------------


def test_reads_of_snapshots_stay_exact_while_the_disk_is_written(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, block_size=BS, sync=False)
    size = 64 * BS
    store.create_disk("d", size)
    live = bytearray(os.urandom(size))
    store.write("d", 0, live)
    published: list[tuple[str, bytes]] = []  # snapshots the readers may read, with their bytes
    done = threading.Event()
    failures: list[str] = []

    def writer() -> None:
        rnd = random.Random(1)
        try:
            for _ in range(80):
                published.append((store.snapshot("d"), bytes(live)))
                if len(published) > 4:
                    store.delete_snapshot("d", published.pop(1)[0])  # merges into the oldest
                for _ in range(8):
                    offset, data = rnd.randrange(size - BS), os.urandom(BS)
                    store.write("d", offset, data)
                    live[offset : offset + BS] = data
        finally:
            done.set()

    def reader() -> None:
        rnd = random.Random()
        buf = bytearray(4 * BS)
        while not done.is_set():
            if not published:
                continue
            snap, expected = rnd.choice(published[:])
            offset = rnd.randrange(size - len(buf))
            try:
                store.read_snapshot_into("d", snap, offset, memoryview(buf))
            except UnknownSnapshotError:
                continue  # deleted meanwhile
            if buf != expected[offset : offset + len(buf)]:
                failures.append(f"read of snapshot {snap} at {offset} saw other bytes")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    threads.append(threading.Thread(target=writer))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so a missing lock would show
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert failures == []
    for snap, expected in published:
        assert store.read_snapshot("d", snap, 0, size) == expected
    store.close()


async def test_worker_threads_serve_different_disks_at_once(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, block_size=BS, sync=False)
    payloads = {f"vm{i}": os.urandom(32 * BS) for i in range(4)}

    def fill(disk: str) -> None:
        store.create_disk(disk, 32 * BS)
        for b in range(32):
            store.write(disk, b * BS, payloads[disk][b * BS : (b + 1) * BS])
            if b % 8 == 0:
                store.snapshot(disk)

    async with trio.open_nursery() as nursery:
        for disk in payloads:
            nursery.start_soon(trio.to_thread.run_sync, fill, disk)
    for disk, data in payloads.items():
        assert store.read(disk, 0, 32 * BS) == data
        assert len(store.snapshots(disk)) == 4
    store.close()
