"""The encoder stage: chunks in disk order in, stream bytes out (no payload copies)."""

from __future__ import annotations

__all__ = ["PACK_WINDOW", "encode_disk"]

from collections import deque
from collections.abc import Callable

import trio

from ..stream import Encoder, StreamCodec, StreamHeader, Trailer, is_zero
from ..stream.encoder import Packed
from .readahead import Chunk

#: chunks compressed ahead of the one being written, each in its own worker thread (two
#: cores' worth; the read-ahead pool has room for them and the one being written)
PACK_WINDOW = 2


class _Slot:
    """A chunk on its way out: all zeros, or its payload packed (in a thread) or not yet."""

    def __init__(self, chunk: Chunk, *, zero: bool) -> None:
        self.chunk = chunk
        self.zero = zero
        self.packed: Packed | None = None
        self.ready = trio.Event()

    async def pack(self, enc: Encoder) -> None:
        assert self.chunk.data is not None
        self.packed = await trio.to_thread.run_sync(enc.pack, self.chunk.data)
        self.ready.set()


async def encode_disk(
    header: StreamHeader,
    chunks: trio.MemoryReceiveChannel[Chunk],
    out: trio.MemorySendChannel[bytes | memoryview],
    on_chunk: Callable[[Chunk], None],
    on_end: Callable[[Trailer], None] = lambda t: None,
    codec: StreamCodec | None = None,
) -> None:
    """Encode one disk stream. All-zero chunks become ZERO records, adjacent ones merged.

    `out` must be unbuffered (capacity 0) and its consumer must finish with an item before it
    asks for the next: then, once a later send returned, the chunk sent before it has been
    written and its buffer goes back to the read-ahead pool.

    A `codec` that compresses or encrypts works in worker threads (zstd and AES-GCM release
    the GIL): up to PACK_WINDOW chunks are compressed at once while records still go out in
    disk order, and the event loop is never held up by it.
    """
    enc = Encoder(header, codec)
    window = PACK_WINDOW if enc.codec.transforms else 0
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

    async def emit(slot: _Slot) -> None:
        nonlocal zero_start, zero_end, written
        chunk = slot.chunk
        if slot.zero:
            chunk.release()
            if zero_start >= 0 and zero_end == chunk.offset:
                zero_end += chunk.length
            else:
                await flush_zeros()
                zero_start, zero_end = chunk.offset, chunk.offset + chunk.length
            return
        await flush_zeros()
        assert chunk.data is not None
        if window:
            await slot.ready.wait()
            record, payload = await trio.to_thread.run_sync(enc.data, chunk.offset, chunk.data,
                                                            slot.packed)
        else:
            record, payload = enc.data(chunk.offset, chunk.data)
        await send(record)
        await send(payload)
        written = chunk

    async with out, chunks:
        await send(enc.header())
        async with trio.open_nursery() as packing:
            queue: deque[_Slot] = deque()
            async for chunk in chunks:
                on_chunk(chunk)
                slot = _Slot(chunk, zero=chunk.data is None or is_zero(chunk.data))
                if window and not slot.zero:
                    packing.start_soon(slot.pack, enc)
                queue.append(slot)
                while len(queue) > window:
                    await emit(queue.popleft())
            while queue:
                await emit(queue.popleft())
        await flush_zeros()
        await send(enc.trailer())  # once it returned, the last payload was written and released
        on_end(enc.summary())
