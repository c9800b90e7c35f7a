"""A damaged disk stream is refused, and the message says what is wrong and where."""

from __future__ import annotations

import io
import struct

import pytest
import xxhash

from ahvbackup.core.errors import ExitCode, StreamFormatError
from ahvbackup.core.stream import (
    StreamHeader,
    StreamIndex,
    StreamReader,
    StreamWriter,
    index_stream,
)

HEADER = StreamHeader(
    kind="incremental", vm_uuid="4f6a0c1e", vm_name="db01", disk_uuid="9b2d", disk_label="scsi.1",
    disk_size=1 << 20, snapshot_id="snap-2", reference_snapshot_id="snap-1", stream_id="s",
    created="2025-05-01T02:00:00Z", producer="test",
)


def small_stream() -> bytes:
    out = io.BytesIO()
    with StreamWriter(out, HEADER) as w:
        w.write_data(0, bytes(range(200)))
        w.write_zero(4096, 8192)
        w.write_data(16384, b"\x5a" * 64)
        w.write_data(20000, b"tail" * 10)
    return out.getvalue()


RAW = small_stream()
INDEX: StreamIndex = index_stream(io.BytesIO(RAW))
TRAILER_AT = len(RAW) - 48 - 64


def frame(i: int) -> tuple[int, int]:
    """Start and end (stream offsets) of record i."""
    start = INDEX[i].position
    end = INDEX[i + 1].position if i + 1 < len(INDEX) else TRAILER_AT
    return start, end


def read_all(data: bytes) -> str:
    with pytest.raises(StreamFormatError) as info:
        StreamReader(io.BytesIO(data), name="db01/scsi.1.ahvd").verify()
    assert info.value.exit_code == ExitCode.CORRUPT
    return str(info.value)


def test_the_sample_stream_is_valid() -> None:
    trailer = StreamReader(io.BytesIO(RAW)).verify()
    assert (trailer.data_records, trailer.zero_records) == (3, 1)


@pytest.mark.parametrize("bit", [0x01, 0x80])
def test_every_single_flipped_byte_is_detected(bit: int) -> None:
    for pos in range(len(RAW)):
        bad = bytearray(RAW)
        bad[pos] ^= bit
        try:
            StreamReader(io.BytesIO(bytes(bad))).verify()
        except StreamFormatError:
            continue
        pytest.fail(f"a flip of bit {bit:#x} at byte {pos} of {len(RAW)} went unnoticed")


def flip(pos: int) -> str:
    bad = bytearray(RAW)
    bad[pos] ^= 0x04
    return read_all(bytes(bad))


def test_flipped_bytes_are_named_by_where_they_are() -> None:
    assert "stream header check mismatch" in flip(20)
    msg = flip(INDEX[2].position + 20)
    assert "record 2: record header check mismatch" in msg
    assert f"stream offset {INDEX[2].position}" in msg
    msg = flip(INDEX[2].position + 48 + 10)
    assert "record 2 (disk offset 16384, 64 bytes): data checksum mismatch" in msg
    assert "VM db01 (4f6a0c1e) scsi.1 (9b2d)" in msg
    assert "db01/scsi.1.ahvd" in msg
    assert "trailer check mismatch" in flip(len(RAW) - 30)
    assert "record 4: record header check mismatch" in flip(TRAILER_AT + 3)


@pytest.mark.parametrize("dropped", [0, 1, 2, 3])
def test_a_missing_record_is_named(dropped: int) -> None:
    start, end = frame(dropped)
    msg = read_all(RAW[:start] + RAW[end:])
    assert f"record {dropped} is missing" in msg


def test_a_missing_record_is_caught_even_when_the_sequence_is_rewritten() -> None:
    start, end = frame(1)
    bad = bytearray(RAW[:start] + RAW[end:])
    # renumber every later record header (and the trailer's) so the sequence looks whole
    pos, seq = start, 1
    while True:
        tag = bytes(bad[pos : pos + 4])
        struct.pack_into("<Q", bad, pos + 8, seq)
        struct.pack_into("<Q", bad, pos + 40, xxhash.xxh3_64_intdigest(bytes(bad[pos : pos + 40])))
        if tag == b"TRLR":
            break
        length = struct.unpack_from("<Q", bad, pos + 24)[0]
        pos += 48 + (length if tag == b"DATA" else 0)
        seq += 1
    msg = read_all(bytes(bad))
    assert "trailer says 1 zero records, the stream has 0" in msg


def test_a_record_spliced_in_from_another_stream_fails_the_digest() -> None:
    out = io.BytesIO()
    with StreamWriter(out, HEADER) as w:
        w.write_data(0, bytes(range(200)))
        w.write_zero(4096, 8192)
        w.write_data(16384, b"\xa5" * 64)  # same place and size, other content
        w.write_data(20000, b"tail" * 10)
    other = out.getvalue()
    start, end = frame(2)
    msg = read_all(RAW[:start] + other[start:end] + RAW[end:])
    assert "whole-stream digest mismatch" in msg


def test_reordered_records_are_named() -> None:
    a, b = frame(2), frame(3)
    swapped = RAW[: a[0]] + RAW[b[0] : b[1]] + RAW[a[0] : a[1]] + RAW[b[1] :]
    msg = read_all(swapped)
    assert "expected record 2 here" in msg
    assert "out of order" in msg


def test_out_of_order_offsets_are_refused_even_with_a_consistent_sequence() -> None:
    bad = bytearray(RAW)
    pos = INDEX[2].position  # disk offset 16384 -> 100, inside record 0's data
    struct.pack_into("<Q", bad, pos + 16, 100)
    struct.pack_into("<Q", bad, pos + 40, xxhash.xxh3_64_intdigest(bytes(bad[pos : pos + 40])))
    msg = read_all(bytes(bad))
    assert "record 2 (disk offset 100): out of order" in msg


def test_a_record_beyond_the_disk_size_is_refused() -> None:
    bad = bytearray(RAW)
    pos = INDEX[3].position
    struct.pack_into("<Q", bad, pos + 16, (1 << 20) - 10)
    struct.pack_into("<Q", bad, pos + 40, xxhash.xxh3_64_intdigest(bytes(bad[pos : pos + 40])))
    assert "beyond the disk size 1048576" in read_all(bytes(bad))


def test_every_cut_is_reported_as_truncated() -> None:
    for cut in range(len(RAW)):
        msg = read_all(RAW[:cut])
        assert "truncated" in msg, (cut, msg)
        assert f"at stream offset {cut}" in msg, (cut, msg)


def test_every_cut_is_reported_as_truncated_when_indexing_a_file(tmp_path) -> None:
    path = tmp_path / "cut.ahvd"
    for cut in range(len(RAW)):
        path.write_bytes(RAW[:cut])
        with path.open("rb") as f, pytest.raises(StreamFormatError, match="truncated"):
            index_stream(f)


def test_a_cut_inside_a_payload_says_which_record() -> None:
    msg = read_all(RAW[: INDEX[2].position + 48 + 5])
    assert "truncated: the stream ends inside a data payload of record 2 (disk offset 16384)" in msg


@pytest.mark.parametrize("tail", [b"\0", b"garbage", RAW])
def test_bytes_after_the_trailer_are_refused(tail: bytes, tmp_path) -> None:
    assert "bytes after the trailer" in read_all(RAW + tail)
    path = tmp_path / "long.ahvd"
    path.write_bytes(RAW + tail)
    with path.open("rb") as f, pytest.raises(StreamFormatError, match="after the trailer"):
        index_stream(f)


@pytest.mark.parametrize(
    "start", [b"", b"QFI\xfb\0\0\0\x03", b"\x89PNG\r\n\x1a\n", b"\x89AHVD\n\x1a\n"]
)
def test_something_else_is_not_taken_for_a_stream(start: bytes) -> None:
    data = start + RAW[len(start) :] if start else b"x" * 100
    assert "not an ahvbackup disk stream" in read_all(data)


def test_a_newer_major_version_is_refused_clearly() -> None:
    bad = bytearray(RAW)
    struct.pack_into("<HH", bad, 8, 3, 0)
    meta_len = struct.unpack_from("<I", bad, 12)[0]
    struct.pack_into(
        "<Q", bad, 16 + meta_len, xxhash.xxh3_64_intdigest(bytes(bad[: 16 + meta_len]))
    )
    msg = read_all(bytes(bad))
    assert "stream format version 3.0 is newer than this reader (understands 2.x)" in msg


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda d: d.pop("disk_uuid"), "required key disk_uuid is missing"),
        (lambda d: d.update(disk_size="1048576"), "disk_size must be an integer"),
        (lambda d: d.update(reference_snapshot_id=""), "needs reference_snapshot_id"),
    ],
)
def test_bad_metadata_is_named(edit, problem: str) -> None:
    import json

    meta_len = struct.unpack_from("<I", RAW, 12)[0]
    doc = json.loads(RAW[16 : 16 + meta_len])
    edit(doc)
    meta = json.dumps(doc).encode()
    head = struct.pack("<8sHHI", RAW[:8], 1, 0, len(meta)) + meta
    bad = head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head)) + RAW[16 + meta_len + 8 :]
    assert problem in read_all(bad)


def test_records_read_before_a_late_failure_are_not_the_end() -> None:
    """A reader hands out records as it goes; a consumer only trusts them after the trailer."""
    bad = bytearray(RAW)
    bad[TRAILER_AT + 48 + 40] ^= 1  # the stored digest
    reader = StreamReader(io.BytesIO(bytes(bad)))
    seen: list[int] = []
    with pytest.raises(StreamFormatError, match="trailer check mismatch"):
        seen.extend(rec.seq for rec in reader)
    assert seen == [0, 1, 2, 3]
    assert reader.trailer is None
