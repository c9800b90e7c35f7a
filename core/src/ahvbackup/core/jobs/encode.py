"""The encoder stage: chunks in disk order in, stream bytes out (no payload copies)."""

from __future__ import annotations

__all__ = ["encode_disk"]

from collections.abc import Callable

import trio

from ..stream import Encoder, StreamHeader, Trailer, is_zero
from .readahead import Chunk


async def encode_disk(
    header: StreamHeader,
    chunks: trio.MemoryReceiveChannel[Chunk],
    out: trio.MemorySendChannel[bytes | memoryview],
    on_chunk: Callable[[Chunk], None],
    on_end: Callable[[Trailer], None] = lambda t: None,
) -> None:
    """Encode one disk stream. All-zero chunks become ZERO records, adjacent ones merged.

    `out` must be unbuffered (capacity 0) and its consumer must finish with an item before it
    asks for the next: then, once a later send returned, the chunk sent before it has been
    written and its buffer goes back to the read-ahead pool.
    """
    enc = Encoder(header)
    zero_start = zero_end = -1
    written: Chunk | None = None  # sent, and released after the next send completes

    async def send(item: bytes | memoryview) -> None:
        nonlocal written
        await out.send(item)
        if written is not None:
            written.release()
            written = None

    async def flush_zeros() -> None:
        nonlocal zero_start, zero_end
        if zero_start >= 0:
            await send(enc.zero(zero_start, zero_end - zero_start))
            zero_start = zero_end = -1

    async with out, chunks:
        await send(enc.header())
        async for chunk in chunks:
            on_chunk(chunk)
            if chunk.data is None or is_zero(chunk.data):
                chunk.release()
                if zero_start >= 0 and zero_end == chunk.offset:
                    zero_end += chunk.length
                else:
                    await flush_zeros()
                    zero_start, zero_end = chunk.offset, chunk.offset + chunk.length
                continue
            await flush_zeros()
            record, payload = enc.data(chunk.offset, chunk.data)
            await send(record)
            await send(payload)
            written = chunk
        await flush_zeros()
        await send(enc.trailer())  # once it returned, the last payload was written and released
        on_end(enc.summary())
