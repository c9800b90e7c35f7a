from __future__ import annotations

import os

import pytest
import trio

from ahvbackup.core.drivers import DiskReader
from ahvbackup.core.errors import DataPathError
from ahvbackup.core.jobs.readahead import Chunk, read_chunks, split
from ahvbackup.core.model import Region


class BytesReader(DiskReader):
    """A reader over bytes in memory that records how many reads overlap."""

    def __init__(self, data: bytes, *, fail_at: int | None = None) -> None:
        self.data = data
        self.size = len(data)
        self.active = 0
        self.peak = 0
        self.fail_at = fail_at

    async def read_into(self, offset: int, buf: memoryview) -> None:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await trio.sleep(0.01 * ((offset // 7) % 3))  # out-of-order completion
            if self.fail_at is not None and offset <= self.fail_at < offset + len(buf):
                raise DataPathError(f"injected failure at {offset}")
            buf[:] = self.data[offset : offset + len(buf)]
        finally:
            self.active -= 1


async def regions_of(items: list[Region]):  # type: ignore[no-untyped-def]
    for r in items:
        yield r


async def collect(
    reader: BytesReader, regions: list[Region], chunk: int, inflight: int
) -> list[Chunk]:
    send, recv = trio.open_memory_channel[Chunk](0)
    got: list[Chunk] = []
    async with trio.open_nursery() as n:
        n.start_soon(
            lambda: read_chunks(
                reader, regions_of(regions), chunk_size=chunk, inflight=inflight, out=send
            )
        )
        async with recv:
            async for c in recv:
                kept = Chunk(
                    c.offset, c.length, None if c.data is None else memoryview(bytes(c.data))
                )
                c.release()
                got.append(kept)
    return got


def test_split_is_aligned_to_chunk_size() -> None:
    assert split(Region(100, 300), 128) == [
        Region(100, 28),
        Region(128, 128),
        Region(256, 128),
        Region(384, 16),
    ]


async def test_chunks_arrive_in_order_with_bounded_concurrency() -> None:
    data = os.urandom(64 * 1024)
    reader = BytesReader(data)
    regions = [Region(0, 20000), Region(20000, 10000, zero=True), Region(30000, 64 * 1024 - 30000)]
    got = await collect(reader, regions, chunk=4096, inflight=4)
    offsets = [c.offset for c in got]
    assert offsets == sorted(offsets)
    rebuilt = bytearray(len(data))
    for c in got:
        if c.data is not None:
            rebuilt[c.offset : c.offset + c.length] = c.data
    for c in got:
        if c.data is None:
            assert c.offset >= 20000 and c.offset + c.length <= 30000
    expect = bytearray(data)
    expect[20000:30000] = bytes(10000)
    assert rebuilt == expect
    assert 1 < reader.peak <= 5


async def test_memory_is_a_fixed_pool_whatever_the_disk_size() -> None:
    reader = BytesReader(os.urandom(256 * 1024))
    seen: set[int] = set()
    send, recv = trio.open_memory_channel[Chunk](0)
    async with trio.open_nursery() as n:
        n.start_soon(
            lambda: read_chunks(
                reader,
                regions_of([Region(0, 256 * 1024)]),
                chunk_size=4096,
                inflight=3,
                out=send,
                spare=2,
            )
        )
        async with recv:
            async for c in recv:
                assert c.data is not None
                seen.add(id(c.data.obj))
                c.release()
    assert len(seen) <= 5  # 64 chunks went through 3 + 2 buffers


async def test_a_failed_read_stops_the_disk_with_its_error() -> None:
    reader = BytesReader(os.urandom(32768), fail_at=9000)
    with pytest.RaisesGroup(pytest.RaisesExc(DataPathError, match="injected failure at 8192")):
        await collect(reader, [Region(0, 32768)], chunk=4096, inflight=3)
