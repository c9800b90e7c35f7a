"""Read a disk's regions in order with several reads in flight and bounded memory.

A starter task walks the region map, splits it at chunk boundaries and starts one read per
chunk into a buffer from a fixed pool; the chunks travel in order through a bounded channel, and
each buffer goes back to the pool when its consumer calls `Chunk.release()`. Memory is the pool,
whatever the disk size, and no buffer is allocated (or page-faulted) per chunk.
"""

from __future__ import annotations

__all__ = ["BufferPool", "Chunk", "read_chunks"]

from collections.abc import AsyncIterable
from dataclasses import dataclass, field

import trio

from ..drivers import DiskReader
from ..errors import AhvBackupError, DataPathError
from ..model import Region

#: a disk's buffers: several disks are read at once, each holding its pool for the whole disk
POOL_BYTES = 24 << 20
#: buffers however large the chunks: a compressing encoder holds up to four (two being
#: packed, one going out, one written), and two more keep reads going
MIN_BUFFERS = 6


class BufferPool:
    """`count` buffers of `size` bytes; `acquire` waits for a free one."""

    def __init__(self, *, size: int, count: int) -> None:
        self.size = size
        self._free = [bytearray(size) for _ in range(count)]
        self._available = trio.Semaphore(count)

    async def acquire(self) -> bytearray:
        await self._available.acquire()
        return self._free.pop()

    def release(self, buf: bytearray) -> None:
        self._free.append(buf)
        self._available.release()


@dataclass
class Chunk:
    offset: int
    length: int
    data: memoryview | None = None  # None: a zero region (nothing was read)
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None
    _buf: bytearray | None = None
    _pool: BufferPool | None = None

    def release(self) -> None:
        """Give the buffer back; `data` must not be used afterwards. Idempotent."""
        if self._pool is not None and self._buf is not None:
            self.data = None
            self._pool.release(self._buf)
            self._buf = None


def split(region: Region, chunk_size: int) -> list[Region]:
    """Cut a region at multiples of chunk_size (aligned, so incrementals line up with fulls)."""
    out = []
    pos, end = region.offset, region.end
    while pos < end:
        nxt = min(end, (pos // chunk_size + 1) * chunk_size)
        out.append(Region(pos, nxt - pos, region.zero))
        pos = nxt
    return out


async def _read(reader: DiskReader, chunk: Chunk) -> None:
    try:
        assert chunk.data is not None
        await reader.read_into(chunk.offset, chunk.data)
    except AhvBackupError as err:
        chunk.error = err
    except OSError as err:
        chunk.error = DataPathError(f"read of {chunk.length} bytes at {chunk.offset}: {err}")
    finally:
        chunk.done.set()


async def _start(
    reader: DiskReader,
    regions: AsyncIterable[Region],
    chunk_size: int,
    pool: BufferPool,
    nursery: trio.Nursery,
    send: trio.MemorySendChannel[Chunk],
) -> None:
    async with send:
        try:
            async for region in regions:
                for piece in split(region, chunk_size):
                    if piece.zero:
                        chunk = Chunk(piece.offset, piece.length)
                        chunk.done.set()
                    else:
                        buf = await pool.acquire()
                        chunk = Chunk(piece.offset, piece.length, memoryview(buf)[: piece.length],
                                      _buf=buf, _pool=pool)
                        nursery.start_soon(_read, reader, chunk)
                    await send.send(chunk)
        except AhvBackupError as err:  # the region map failed: hand the error on in order
            failed = Chunk(-1, 0, error=err)
            failed.done.set()
            await send.send(failed)


async def read_chunks(
    reader: DiskReader,
    regions: AsyncIterable[Region],
    *,
    chunk_size: int,
    inflight: int,
    out: trio.MemorySendChannel[Chunk],
    spare: int = 4,
) -> None:
    """Send every chunk, read, to `out` in disk order; raise the first error (unwrapped).

    At most `inflight` reads run at once. The consumer calls `Chunk.release()` when done with
    a chunk's data; `spare` more buffers cover the chunks it holds (in `out` and in hand).
    The pool holds at most `POOL_BYTES` (but `MIN_BUFFERS` chunks at least): large chunks mean
    fewer reads in flight, not more memory, as each read is already long.
    """
    error: BaseException | None = None
    count = max(MIN_BUFFERS, spare + 1, min(inflight + spare, POOL_BYTES // chunk_size))
    inflight = min(inflight, count - spare)
    pool = BufferPool(size=chunk_size, count=count)
    async with out, trio.open_nursery() as nursery:
        send, recv = trio.open_memory_channel[Chunk](max(0, inflight - 1))
        nursery.start_soon(_start, reader, regions, chunk_size, pool, nursery, send)
        async with recv:
            async for chunk in recv:
                await chunk.done.wait()
                if chunk.error is not None:
                    error = chunk.error
                    chunk.release()
                    nursery.cancel_scope.cancel()
                    break
                await out.send(chunk)
    if error is not None:
        raise error
