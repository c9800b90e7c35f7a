"""Disk streams round-trip: what is written is what a reader (file, pipe, index) gets back."""

from __future__ import annotations

import io
import os
import random
import struct
import threading

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ahvbackup.core.errors import SinkError, StreamFormatError
from ahvbackup.core.stream import (
    DATA,
    MAX_DATA_LENGTH,
    ZERO,
    Encoder,
    StreamHeader,
    StreamReader,
    StreamWriter,
    index_stream,
    is_zero,
)

DISK = 1 << 20


def header(**kw: object) -> StreamHeader:
    base: dict[str, object] = dict(
        kind="full", vm_uuid="4f6a0c1e", vm_name="web01", disk_uuid="9b2d", disk_label="scsi.0",
        disk_bus="scsi", disk_index=0, disk_size=DISK, block_size=4096, snapshot_id="snap-1",
        backup_id="b-1", stream_id="s-1", created="2025-05-01T02:00:00Z", producer="test",
    )
    base.update(kw)
    return StreamHeader(**base)  # type: ignore[arg-type]


Layout = list[tuple[str, int, bytes | int]]  # (kind, offset, payload or zero length)


@st.composite
def layouts(draw: st.DrawFn) -> Layout:
    out: Layout = []
    pos = 0
    for _ in range(draw(st.integers(0, 12))):
        pos += draw(st.integers(0, 3000))
        length = draw(st.integers(1, 5000))
        if pos + length > DISK:
            break
        if draw(st.booleans()):
            out.append((DATA, pos, draw(st.binary(min_size=length, max_size=length))))
        else:
            out.append((ZERO, pos, length))
        pos += length
    return out


def write(layout: Layout, hdr: StreamHeader | None = None) -> bytes:
    out = io.BytesIO()
    with StreamWriter(out, hdr or header()) as w:
        for kind, offset, item in layout:
            if kind == DATA:
                assert isinstance(item, bytes)
                w.write_data(offset, item)
            else:
                assert isinstance(item, int)
                w.write_zero(offset, item)
    return out.getvalue()


def apply(raw: bytes, image: bytearray) -> None:
    for rec in StreamReader(io.BytesIO(raw)):
        image[rec.offset : rec.end] = rec.data if rec.data is not None else bytes(rec.length)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts())
def test_round_trip_any_layout(layout: Layout) -> None:
    raw = write(layout)
    reader = StreamReader(io.BytesIO(raw), name="t.ahvd")
    assert reader.header == header()
    got = [
        (r.kind, r.offset, bytes(r.data) if r.data is not None else r.length) for r in reader
    ]
    assert got == layout
    t = reader.trailer
    assert t is not None
    assert t.digest_verified
    assert t.data_records == sum(k == DATA for k, _, _ in layout)
    assert t.zero_bytes == sum(x for k, _, x in layout if isinstance(x, int))
    assert t.digest == xxhash.xxh3_128_digest(raw[: t.stream_bytes])

    index = index_stream(io.BytesIO(raw))
    assert [(e.kind, e.offset, e.length) for e in index] == [
        (k, o, len(x) if isinstance(x, bytes) else x) for k, o, x in layout
    ]
    with io.BytesIO(raw) as f:
        for entry, (kind, _, item) in zip(index, layout, strict=True):
            if kind == DATA:
                assert bytes(index.read(f, entry)) == item


def test_full_then_incremental_rebuilds_the_disk() -> None:
    rng = random.Random(7)
    disk0 = bytearray(rng.randbytes(DISK))
    disk0[65536:131072] = bytes(65536)
    full: Layout = []
    for off in range(0, DISK, 65536):
        chunk = bytes(disk0[off : off + 65536])
        full.append((ZERO, off, 65536) if is_zero(chunk) else (DATA, off, chunk))
    disk1 = bytearray(disk0)
    disk1[4096:8192] = rng.randbytes(4096)
    disk1[200000:300000] = bytes(100000)
    disk1[70000:70100] = b"\xff" * 100
    delta: Layout = [
        (DATA, 4096, bytes(disk1[4096:8192])),
        (DATA, 65536, bytes(disk1[65536:131072])),
        (ZERO, 200000, 100000),
    ]
    inc = header(kind="incremental", snapshot_id="snap-2", reference_snapshot_id="snap-1",
                 reference_backup_id="b-1", reference_stream_id="s-1")
    image = bytearray(DISK)
    apply(write(full), image)
    assert image == disk0
    apply(write(delta, inc), image)
    assert image == disk1


def test_reading_from_an_os_pipe_fed_by_a_thread() -> None:
    payload = os.urandom(3 << 20)  # well past a pipe's buffer
    rfd, wfd = os.pipe()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            with os.fdopen(wfd, "wb") as out, StreamWriter(out, header(disk_size=16 << 20)) as w:
                for i in range(4):
                    w.write_data(i * (4 << 20), payload)
                    w.write_zero(i * (4 << 20) + len(payload), 1 << 20)
        except BaseException as err:  # handed to the test thread
            errors.append(err)

    thread = threading.Thread(target=produce)
    thread.start()
    with os.fdopen(rfd, "rb", buffering=0) as src:  # raw reads: short reads happen
        reader = StreamReader(src, name="pipe")
        kinds = [(r.kind, r.offset, r.data is None or bytes(r.data) == payload) for r in reader]
    thread.join()
    assert not errors
    assert [k for k, _, _ in kinds] == [DATA, ZERO] * 4
    assert all(ok for _, _, ok in kinds)
    assert reader.trailer is not None
    assert reader.trailer.data_bytes == 4 * len(payload)


def test_index_of_a_pipe_checks_everything_and_of_a_file_only_headers(tmp_path) -> None:
    raw = write([(DATA, 0, b"a" * 100), (ZERO, 100, 50), (DATA, 4096, b"b" * 10)])
    assert index_stream(_OnlyRead(raw)).verified
    path = tmp_path / "d.ahvd"
    path.write_bytes(raw)
    with path.open("rb") as f:
        index = index_stream(f)
        assert not index.verified
        assert index.trailer is not None
        assert index.trailer.data_bytes == 110
        found = index.find(120)
        assert found is not None
        assert (found.kind, found.offset) == (ZERO, 100)
        assert index.find(150) is None
        assert bytes(index.read(f, index[2], into=bytearray(64))) == b"b" * 10
    with path.open("rb") as f:
        assert index_stream(f, verify=True).verified


def test_index_read_detects_a_payload_changed_after_indexing(tmp_path) -> None:
    path = tmp_path / "d.ahvd"
    path.write_bytes(write([(DATA, 0, b"a" * 100), (DATA, 512, b"c" * 100)]))
    with path.open("rb") as f:
        index = index_stream(f)
    data = bytearray(path.read_bytes())
    data[index[1].position + 48 + 7] ^= 0x10
    path.write_bytes(data)
    with path.open("rb") as f, pytest.raises(StreamFormatError, match=r"record 1 .*checksum"):
        index.read(f, index[1])


def test_unknown_header_keys_and_a_newer_minor_version_are_accepted() -> None:
    raw = bytearray(write([(DATA, 0, b"x")], header(extra={"coverage": [0, DISK]})))
    struct.pack_into("<H", raw, 10, 7)  # minor 7
    meta_len = struct.unpack_from("<I", raw, 12)[0]
    check = xxhash.xxh3_64_intdigest(bytes(raw[: 16 + meta_len]))
    struct.pack_into("<Q", raw, 16 + meta_len, check)
    # the digest covers the header, so patch it in the trailer too
    _refresh_trailer(raw)
    reader = StreamReader(io.BytesIO(bytes(raw)))
    assert reader.header.extra == {"coverage": [0, DISK]}
    assert reader.verify().data_bytes == 1


def test_writer_leaves_no_trailer_when_the_producer_fails() -> None:
    out = io.BytesIO()

    def backup() -> None:
        with StreamWriter(out, header()) as w:
            w.write_data(0, b"x" * 10)
            raise RuntimeError("reader failed")

    with pytest.raises(RuntimeError):
        backup()
    with pytest.raises(StreamFormatError, match="truncated"):
        StreamReader(io.BytesIO(out.getvalue())).verify()


@pytest.mark.parametrize(
    ("records", "problem"),
    [
        ([(DATA, 100, 10), (DATA, 105, 10)], "out of order"),
        ([(ZERO, 100, 10), (DATA, 50, 10)], "out of order"),
        ([(DATA, DISK - 5, 10)], "outside the disk"),
        ([(ZERO, 0, 0)], "length 0"),
        ([(DATA, 0, 0)], "has 0 bytes"),
    ],
)
def test_encoder_refuses_what_a_reader_would_refuse(records: list, problem: str) -> None:
    enc = Encoder(header())
    enc.header()

    def encode_all() -> None:
        for kind, off, n in records:
            if kind == DATA:
                enc.data(off, bytes(n))
            else:
                enc.zero(off, n)

    with pytest.raises(StreamFormatError, match=problem):
        encode_all()


def test_encoder_refuses_an_oversized_record_and_records_after_the_trailer() -> None:
    enc = Encoder(header(disk_size=1 << 30))
    enc.header()
    with pytest.raises(StreamFormatError, match="1 to 67108864"):
        enc.data(0, memoryview(bytearray(MAX_DATA_LENGTH + 1)))
    enc.trailer()
    with pytest.raises(StreamFormatError, match="after the trailer"):
        enc.zero(0, 1)


def test_encoder_hands_back_the_payload_without_copying() -> None:
    enc = Encoder(header())
    enc.header()
    buf = bytearray(b"abc" * 100)
    _, view = enc.data(0, buf)
    assert view.obj is buf


@pytest.mark.parametrize(
    ("kw", "problem"),
    [
        ({"kind": "synthetic"}, "kind must be one of"),
        ({"disk_size": 0}, "disk_size must be > 0"),
        ({"reference_snapshot_id": "snap-0"}, "full stream has no reference"),
        ({"kind": "incremental"}, "needs reference_snapshot_id"),
    ],
)
def test_header_refuses_inconsistent_identity(kw: dict, problem: str) -> None:
    with pytest.raises(StreamFormatError, match=problem):
        header(**kw)


def test_is_zero() -> None:
    big = bytearray(5 << 20)
    assert is_zero(big)
    assert is_zero(b"")
    big[-1] = 1
    assert not is_zero(big)
    big[-1] = 0
    big[(1 << 20) + 3] = 9
    assert not is_zero(memoryview(big)[1 << 20 :])


def test_write_errors_become_sink_errors_naming_the_stream() -> None:
    class Broken:
        def write(self, data: bytes | memoryview) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(SinkError, match=r"web01.*Broken pipe"):
        StreamWriter(Broken(), header())


class _OnlyRead:
    """A source with read() only and no seek (like some pipes wrappers)."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(min(n, 7) if n > 0 else n)


def _refresh_trailer(raw: bytearray) -> None:
    """Recompute the trailer's digest and checks after a deliberate edit (tests of acceptance)."""
    body = len(raw) - 64
    head = body - 48
    stream_bytes = struct.unpack_from("<Q", raw, body + 32)[0]
    raw[body + 40 : body + 56] = xxhash.xxh3_128_digest(bytes(raw[:stream_bytes]))
    struct.pack_into("<Q", raw, head + 32, xxhash.xxh3_64_intdigest(bytes(raw[body:])))
    struct.pack_into("<Q", raw, head + 40, xxhash.xxh3_64_intdigest(bytes(raw[head : head + 40])))
