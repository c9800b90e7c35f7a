"""Read a disk's regions in order with several reads in flight and bounded memory.

A starter task walks the region map, splits it at chunk boundaries and starts one read per
chunk; the slots travel in order through a bounded channel, so at most `inflight` chunks are
held in memory whatever the disk size, and the consumer gets them in disk order.
"""

from __future__ import annotations

__all__ = ["Chunk", "read_chunks"]

from collections.abc import AsyncIterable
from dataclasses import dataclass, field

import trio

from ..drivers import DiskReader
from ..errors import AhvBackupError, DataPathError
from ..model import Region


@dataclass
class Chunk:
    offset: int
    length: int
    data: bytearray | None = None  # None: a zero region (nothing was read)
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


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
        await reader.read_into(chunk.offset, memoryview(chunk.data))
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
                        chunk = Chunk(piece.offset, piece.length, bytearray(piece.length))
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
) -> None:
    """Send every chunk, read, to `out` in disk order; raise the first error (unwrapped)."""
    error: BaseException | None = None
    async with out:
        async with trio.open_nursery() as nursery:
            send, recv = trio.open_memory_channel[Chunk](max(0, inflight - 1))
            nursery.start_soon(_start, reader, regions, chunk_size, nursery, send)
            async with recv:
                async for chunk in recv:
                    await chunk.done.wait()
                    if chunk.error is not None:
                        error = chunk.error
                        nursery.cancel_scope.cancel()
                        break
                    await out.send(chunk)
    if error is not None:
        raise error
