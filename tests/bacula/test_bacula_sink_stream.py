"""The metaplugin sink's disk streams (bacula/sink.py), against an emitter that records what
reaches the file daemon: a disk is sent as it is read (no spool file) when its turn is free,
with its exact size when it fits the lookahead and -1 ("unknown") when not; disks read while
another one is sent spool meanwhile; a stream that fails, or is cancelled, while it is sent ends
its file's data cleanly (the metaplugin stops the backend on anything else)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from ahvbackup.bacula.sink import LOOKAHEAD, UNKNOWN_SIZE, BaculaSink
from ahvbackup.core.errors import SinkError
from ahvbackup.core.model import VmInfo

MiB = 1 << 20


@dataclass
class Sent:
    fname: str
    size: int
    data: bytes
    ended: bool  # the file's data reached its end of data (F)


@dataclass
class RecordingEmitter:
    """One file at a time, like the session's emitter; each item "written" with a checkpoint."""

    mode: str = "backup"
    files: list[Sent] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def wants_data(self) -> bool:
        return True

    async def file(self, fname: str, *, size: int, mtime: float,
                   chunks: AsyncIterable[bytes | bytearray | memoryview] | None = None,
                   mode: int = 0o640) -> int:
        async with self.lock:
            sent = Sent(fname, size, b"", ended=False)
            self.files.append(sent)
            buf = bytearray()
            assert chunks is not None
            async for chunk in chunks:
                await trio.sleep(0)  # a pipe write
                buf += chunk
                sent.data = bytes(buf)
            sent.ended = True
            return len(buf)

    async def directory(self, fname: str, *, mtime: float, mode: int = 0o750) -> None:
        raise AssertionError("no directories in a backup")

    # JobMessages
    async def info(self, text: str) -> None:
        pass

    async def warning(self, text: str) -> None:
        self.warnings.append(text)

    async def error(self, text: str) -> None:
        raise AssertionError(text)


def content(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def reusing(data: bytes, *, item: int = MiB, pause: float = 0.0,
                  fail_after: int | None = None, hang_after: int | None = None,
                  reached: trio.Event | None = None, gate: trio.Event | None = None,
                  gate_after: int = 0) -> AsyncIterator[memoryview]:
    """`data` in items that share one buffer, as the encoder's do (an item is only valid until
    the next one is asked for)."""
    buf = bytearray(item)
    for pos in range(0, len(data), item):
        if gate is not None and pos >= gate_after:
            await gate.wait()
        if fail_after is not None and pos >= fail_after:
            raise SinkError("Prism: the read failed (test)")
        if hang_after is not None and pos >= hang_after:
            if reached is not None:
                reached.set()
            await trio.sleep_forever()
        piece = data[pos:pos + item]
        buf[:len(piece)] = piece
        yield memoryview(buf)[:len(piece)]
        buf[:] = b"\xee" * item  # the encoder reuses its buffer
        await trio.sleep(pause)


@pytest.fixture
def sink(tmp_path: Path) -> tuple[BaculaSink, RecordingEmitter]:
    config = SimpleNamespace(working_dir=tmp_path / "work", state_dir=tmp_path / "state")
    s = BaculaSink(config)
    emitter = RecordingEmitter()
    s.attach_emitter(emitter, path_of=lambda *p: "/@ahvbackup/" + "/".join(p),
                     messages=emitter)
    return s, emitter


VM = VmInfo(uuid="u-1", name="vm1", cluster_uuid="c-1", cluster_name="cl", disks=())


def spool_files(s: BaculaSink) -> list[Path]:
    return list(s.spool_root.rglob("*")) if s.spool_root.exists() else []


async def test_a_long_stream_is_sent_as_read_with_unknown_size_and_no_spool(
        sink: tuple[BaculaSink, RecordingEmitter]) -> None:
    s, emitter = sink
    data = content(1, 3 * LOOKAHEAD + 12345)
    w = await s.begin(VM, backup_id="b1", level="full")
    assert await w.write_disk("scsi.0", reusing(data)) == len(data)
    (sent,) = emitter.files
    assert (sent.fname, sent.size, sent.ended) == ("/@ahvbackup/cl/vm1/b1/disks/scsi.0.ahvd",
                                                   UNKNOWN_SIZE, True)
    assert sent.data == data
    assert not s.spool_root.exists()  # nothing was spooled, not even a folder


async def test_a_stream_within_the_lookahead_gets_its_exact_size(
        sink: tuple[BaculaSink, RecordingEmitter]) -> None:
    s, emitter = sink
    data = content(2, LOOKAHEAD - 1)
    w = await s.begin(VM, backup_id="b1", level="full")
    assert await w.write_disk("scsi.0", reusing(data)) == len(data)
    (sent,) = emitter.files
    assert (sent.size, sent.data) == (len(data), data)


async def test_disks_read_while_another_is_sent_spool_and_arrive_whole(
        sink: tuple[BaculaSink, RecordingEmitter]) -> None:
    s, emitter = sink
    streams = {"scsi.0": content(3, 2 * LOOKAHEAD), "scsi.1": content(4, 3 * MiB),
               "scsi.2": content(5, LOOKAHEAD + 3 * MiB)}
    w = await s.begin(VM, backup_id="b1", level="full")
    gate = trio.Event()  # scsi.0 is being sent, past its lookahead, until the others spooled

    async def one(label: str, **how: object) -> None:
        await w.write_disk(label, reusing(streams[label], **how))  # type: ignore[arg-type]

    def spooled(label: str) -> int:
        path = w.spool / f"{label}.ahvd"  # type: ignore[attr-defined]
        return path.stat().st_size if path.exists() else 0

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: one("scsi.0", gate=gate, gate_after=LOOKAHEAD + MiB))
            while not emitter.files:
                await trio.sleep(0.001)
            nursery.start_soon(lambda: one("scsi.1"))
            # slow after the gate: its turn comes (after scsi.1's) before it has ended
            nursery.start_soon(lambda: one("scsi.2", gate=gate, gate_after=2 * MiB,
                                           pause=0.05))
            while spooled("scsi.1") < len(streams["scsi.1"]) or spooled("scsi.2") < 2 * MiB:
                await trio.sleep(0.001)  # both wait for their turn, in spool files
            gate.set()
    got = {f.fname.rsplit("/", 1)[1].removesuffix(".ahvd"): f for f in emitter.files}
    assert got.keys() == streams.keys()
    for label, f in got.items():
        assert f.ended and f.data == streams[label], label
        assert f.size in (len(streams[label]), UNKNOWN_SIZE), (label, f.size)  # never another
    assert got["scsi.0"].size == UNKNOWN_SIZE
    assert got["scsi.1"].size == len(streams["scsi.1"])  # whole before its turn: exact
    assert got["scsi.2"].size == UNKNOWN_SIZE  # caught up from its spool file, then streamed
    assert spool_files(s) == [w.spool]  # type: ignore[attr-defined]  # each file removed
    await w.abort()
    assert spool_files(s) == []


async def test_a_stream_that_fails_while_sent_ends_its_file_cleanly(
        sink: tuple[BaculaSink, RecordingEmitter]) -> None:
    s, emitter = sink
    data = content(6, 4 * LOOKAHEAD)
    w = await s.begin(VM, backup_id="b1", level="full")
    with pytest.raises(SinkError, match="the read failed"):
        await w.write_disk("scsi.0", reusing(data, fail_after=2 * LOOKAHEAD))
    (sent,) = emitter.files
    assert sent.ended, "the file's data was left open"
    assert sent.size == UNKNOWN_SIZE and sent.data == data[:len(sent.data)]
    assert len(sent.data) <= 2 * LOOKAHEAD
    assert any("incomplete" in m for m in emitter.warnings), emitter.warnings
    # the next file goes out normally
    assert await w.write_disk("scsi.1", reusing(content(7, MiB))) == MiB
    assert emitter.files[-1].ended


async def test_a_stream_that_fails_before_its_turn_never_reaches_bacula(
        sink: tuple[BaculaSink, RecordingEmitter]) -> None:
    s, emitter = sink
    w = await s.begin(VM, backup_id="b1", level="full")
    with pytest.raises(SinkError, match="the read failed"):
        await w.write_disk("scsi.0", reusing(content(8, 4 * MiB), fail_after=2 * MiB))
    assert emitter.files == []


async def test_a_stream_cancelled_while_sent_ends_its_file_at_an_item_boundary(
        sink: tuple[BaculaSink, RecordingEmitter]) -> None:
    """The reader failing in a sibling task cancels the writer: its file still ends with its
    end of data (a cancellation mid-packet would break the protocol for the whole job)."""
    s, emitter = sink
    data = content(9, 4 * LOOKAHEAD)
    reached = trio.Event()
    w = await s.begin(VM, backup_id="b1", level="full")

    async def reader_fails() -> None:
        await reached.wait()
        raise OSError("the reader failed (test)")

    with pytest.RaisesGroup(pytest.RaisesExc(OSError, match="reader failed"),
                            allow_unwrapped=True, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader_fails)
            await w.write_disk("scsi.0", reusing(data, hang_after=2 * LOOKAHEAD,
                                                 reached=reached))
    (sent,) = emitter.files
    assert sent.ended, "the file's data was left open"
    assert sent.data == data[:len(sent.data)] and len(sent.data) % MiB == 0

