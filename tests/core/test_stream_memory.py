"""Memory use of writing and reading a stream does not grow with the stream's size."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator

from ahvbackup.core.stream import Encoder, StreamHeader, StreamReader, StreamWriter, index_stream

MIB = 1 << 20
CHUNK = 1 * MIB


def header(size: int) -> StreamHeader:
    return StreamHeader(kind="full", vm_uuid="v", disk_uuid="d", disk_size=size, snapshot_id="s")


def stream_pieces(payload_bytes: int) -> Iterator[bytes | memoryview]:
    """A stream produced lazily, one record at a time, from one reused buffer."""
    buf = bytearray(CHUNK)
    enc = Encoder(header(payload_bytes * 2))
    yield enc.header()
    for i in range(payload_bytes // CHUNK):
        buf[0:8] = i.to_bytes(8, "little")
        head, view = enc.data(2 * i * CHUNK, buf)
        yield head
        yield view
        yield enc.zero((2 * i + 1) * CHUNK, CHUNK)
    yield enc.trailer()


class LazySource:
    """readinto() over `stream_pieces`, as a pipe would deliver it (never the whole stream)."""

    def __init__(self, payload_bytes: int) -> None:
        self._pieces = stream_pieces(payload_bytes)
        self._cur = memoryview(b"")

    def readinto(self, view: memoryview) -> int:
        while not self._cur:
            piece = next(self._pieces, None)
            if piece is None:
                return 0
            self._cur = memoryview(piece)
        n = min(len(view), len(self._cur))
        view[:n] = self._cur[:n]
        self._cur = self._cur[n:]
        return n


class NullSink:
    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes | memoryview) -> int:
        self.n += len(data)
        return len(data)


def peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def read(payload_bytes: int) -> None:
    trailer = StreamReader(LazySource(payload_bytes)).verify()
    assert trailer.data_bytes == payload_bytes


def index(payload_bytes: int) -> None:
    assert len(index_stream(LazySource(payload_bytes))) == 2 * payload_bytes // CHUNK


def write(payload_bytes: int) -> None:
    buf = bytearray(CHUNK)
    sink = NullSink()
    with StreamWriter(sink, header(payload_bytes)) as w:
        for i in range(payload_bytes // CHUNK):
            w.write_data(i * CHUNK, buf)
    assert sink.n > payload_bytes


def test_reading_memory_is_flat() -> None:
    small, large = peak(lambda: read(16 * MIB)), peak(lambda: read(256 * MIB))
    assert large < 4 * MIB  # one reused record buffer (1 MiB here) and small change
    assert large - small < 256 * 1024


def test_writing_memory_is_flat() -> None:
    small, large = peak(lambda: write(16 * MIB)), peak(lambda: write(256 * MIB))
    assert large < 2 * MIB
    assert large - small < 256 * 1024


def test_an_index_grows_by_its_entries_only() -> None:
    small, large = peak(lambda: index(16 * MIB)), peak(lambda: index(256 * MIB))
    records = 2 * (256 - 16)
    assert large - small < records * 64 + 256 * 1024
