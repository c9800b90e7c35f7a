"""DR test helpers: a receiver served on loopback TCP, a proxy that cuts connections, and a
source disk that is a local file (plain TCP stands in for the DR transport here)."""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ahvbackup.core.dr.push import DiskSource, PushPoint
from ahvbackup.core.dr.receiver import Receiver, ReceiverSettings
from ahvbackup.core.drivers import DiskReader
from ahvbackup.core.model import Region

MiB = 1 << 20


@asynccontextmanager
async def serve_receiver(settings: ReceiverSettings) -> AsyncIterator[tuple[Receiver, int]]:
    """A receiver on 127.0.0.1 (a free port), for the block."""
    receiver = Receiver(settings)
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        await nursery.start(trio.serve_listeners, receiver.handle, listeners)
        yield receiver, listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def tcp(port: int) -> Callable[[], Awaitable[trio.abc.Stream]]:
    async def connect() -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", port)
    return connect


@dataclass
class CuttingProxy:
    """Forwards connections to `port`; connection i is cut (both sockets closed) once
    `cut_after[i]` bytes went from the source to the receiver (None or past the list: never).
    `forwarded[i]` counts the source's bytes that passed on connection i."""

    port: int
    cut_after: list[int | None]
    forwarded: list[int] = field(default_factory=list)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, index: int | None,
                    cut: trio.CancelScope) -> None:
        limit = self.cut_after[index] if index is not None and index < len(self.cut_after) \
            else None
        try:
            while True:
                data = await src.receive_some(1 << 16)
                if not data:
                    break
                if index is not None:
                    if limit is not None and self.forwarded[index] + len(data) >= limit:
                        data = data[: limit - self.forwarded[index]]
                        self.forwarded[index] += len(data)
                        await dst.send_all(data)
                        break
                    self.forwarded[index] += len(data)
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        cut.cancel()

    async def _handle(self, client: trio.SocketStream) -> None:
        index = len(self.forwarded)
        self.forwarded.append(0)
        upstream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, upstream, index, nursery.cancel_scope)
            nursery.start_soon(self._pump, upstream, client, None, nursery.cancel_scope)

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[int]:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            yield listeners[0].socket.getsockname()[1]
            nursery.cancel_scope.cancel()


class FileReader(DiskReader):
    """A DiskReader over a local file (the source's snapshot disk)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size
        self.fd = os.open(path, os.O_RDONLY)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        data = os.pread(self.fd, len(buf), offset)
        assert len(data) == len(buf)
        buf[:] = data

    def close(self) -> None:
        os.close(self.fd)


def _regions(regions: list[Region]) -> Callable[[], AsyncIterator[Region]]:
    async def gen() -> AsyncIterator[Region]:
        for r in regions:
            yield r
    return gen


@dataclass
class FileVm:
    """A source VM of local-file disks: `write` changes them, `snapshot` freezes a copy and
    returns the point to push (changed regions since the last snapshot, or all for a seed)."""

    root: Path
    sizes: list[int]
    name: str = "vm-file"
    vm_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    disk_uuids: list[str] = field(default_factory=list)
    live: list[bytearray] = field(default_factory=list)
    dirty: list[list[Region]] = field(default_factory=list)
    readers: list[FileReader] = field(default_factory=list)
    points: int = 0
    last_regions: list[list[Region]] = field(default_factory=list)  # of the last snapshot
    last_snapshot_id: str = ""

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.disk_uuids = [str(uuid.uuid4()) for _ in self.sizes]
        self.live = [bytearray(s) for s in self.sizes]
        self.dirty = [[] for _ in self.sizes]

    def write(self, rng: random.Random, count: int, *, max_len: int = 256 << 10) -> None:
        for i, size in enumerate(self.sizes):
            for _ in range(count):
                length = rng.randrange(1, max_len)
                off = rng.randrange(0, size - length)
                if rng.random() < 0.2:
                    self.live[i][off:off + length] = bytes(length)
                    self.dirty[i].append(Region(off, length, zero=True))
                else:
                    self.live[i][off:off + length] = rng.randbytes(length)
                    self.dirty[i].append(Region(off, length))

    def snapshot(self, *, seed: bool = False) -> tuple[PushPoint, list[bytes]]:
        self.points += 1
        disks = []
        images = []
        self.last_regions = []
        for i, size in enumerate(self.sizes):
            path = self.root / f"p{self.points}-d{i}.img"
            path.write_bytes(self.live[i])
            images.append(bytes(self.live[i]))
            reader = FileReader(path)
            self.readers.append(reader)
            regions = [Region(0, size)] if seed else _merge(self.dirty[i], self.live[i])
            self.dirty[i] = []
            self.last_regions.append(regions)
            disks.append(DiskSource(uuid=self.disk_uuids[i], label=f"scsi.{i}", size=size,
                                    full=seed, reader=reader, regions=_regions(regions)))
        snap_id = f"snap-{uuid.uuid4().hex[:8]}"
        point = PushPoint(vm_uuid=self.vm_uuid, vm_name=self.name, point=self.points,
                          snapshot_id=snap_id, base=0 if seed else self.points - 1,
                          base_snapshot_id="" if seed else self.last_snapshot_id,
                          taken=time.time(), disks=tuple(disks))
        self.last_snapshot_id = snap_id
        return point, images

    def close(self) -> None:
        for r in self.readers:
            r.close()


def _merge(dirty: list[Region], image: bytearray) -> list[Region]:
    """Changed regions as change tracking reports them: sorted, disjoint, zero where the
    image now reads zeros."""
    marks = bytearray(len(image))
    for r in dirty:
        marks[r.offset:r.end] = b"\x01" * r.length
    out: list[Region] = []
    pos = 0
    n = len(image)
    while pos < n:
        start = marks.find(b"\x01", pos)
        if start < 0:
            break
        end = marks.find(b"\x00", start)
        end = n if end < 0 else end
        zero = not any(image[start:end])
        out.append(Region(start, end - start, zero=zero))
        pos = end
    return out


def image_of(receiver: Receiver, vm_uuid: str, point: int, disk_uuid: str) -> bytes:
    (p,) = [p for p in receiver.points(vm_uuid) if p.point == point]
    d = p.disk(disk_uuid)
    assert d is not None
    return d.path.read_bytes()
