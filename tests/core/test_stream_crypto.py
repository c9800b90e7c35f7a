"""Compressed and encrypted streams (format 2.0): they read back byte for byte; a changed
ciphertext, records moved within or between streams, a dropped record, a wrong key and a
missing key are each refused with one line naming the problem (and the key id); verify
without the key checks what it can and says what it could not; format 1.0 still reads."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import pytest
import xxhash

from ahvbackup.core.config import load_config
from ahvbackup.core.errors import ConfigError, StreamFormatError
from ahvbackup.core.jobs.codec import load_stream_key, stream_codec, stream_keys
from ahvbackup.core.stream import (
    Keyring,
    StreamCodec,
    StreamHeader,
    StreamKey,
    StreamReader,
    StreamWriter,
    index_stream,
)

KiB = 1024
DATA = Path(__file__).parent / "data"
TEXT = b"".join(b"%06d INFO backup of vm-%03d done in %d ms\n" % (i, i % 97, i * 7 % 1000)
                for i in range(3000))[: 64 * KiB]
RANDOM = os.urandom(64 * KiB)
KEY = StreamKey(bytes(range(32)), source="tenant-a.key")
OTHER = StreamKey(bytes(range(1, 33)), source="tenant-b.key")
R56 = 56  # a 2.x record header
CODECS = {
    "zstd": StreamCodec("zstd", 1),
    "aes": StreamCodec(key=KEY),
    "zstd+aes": StreamCodec("zstd", 3, KEY),
}


def header(**kw: object) -> StreamHeader:
    base: dict[str, object] = dict(kind="full", vm_uuid="vm-1", vm_name="db01",
                                   disk_uuid="disk-1", disk_label="scsi.0", disk_size=1 << 20,
                                   snapshot_id="snap-1")
    base.update(kw)
    return StreamHeader(**base)  # type: ignore[arg-type]


def encode(codec: StreamCodec | None, **kw: object) -> bytes:
    out = io.BytesIO()
    with StreamWriter(out, header(**kw), codec=codec) as w:
        w.write_data(0, TEXT)
        w.write_chunk(64 * KiB, bytes(64 * KiB))  # zeros stay a zero record
        w.write_data(128 * KiB, RANDOM)
    return out.getvalue()


def records(raw: bytes) -> list[tuple[int, int, int]]:
    """(position, header size + stored, stored) of each data record, from an index."""
    index = index_stream(io.BytesIO(raw))
    return [(e.position, R56 + e.stored, e.stored) for e in index if e.kind == "data"]


def reseal_checks(raw: bytearray, position: int) -> None:
    """Recompute a 2.x record's xxh3 payload and header checks, as an editor of the stream
    could: only the AES-GCM tag then stands in the way."""
    stored = struct.unpack_from("<Q", raw, position + 32)[0]
    payload = bytes(raw[position + R56 : position + R56 + stored])
    struct.pack_into("<Q", raw, position + 40, xxhash.xxh3_64_intdigest(payload))
    struct.pack_into("<Q", raw, position + 48,
                     xxhash.xxh3_64_intdigest(bytes(raw[position : position + 48])))


def read(raw: bytes, keys: Keyring | None = None) -> list[tuple[int, bytes | None]]:
    return [(r.offset, None if r.data is None else bytes(r.data))
            for r in StreamReader(io.BytesIO(raw), name="db01/scsi.0", keys=keys)]


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_codec_reads_back_byte_for_byte_by_reader_and_index(name: str) -> None:
    codec = CODECS[name]
    raw = encode(codec)
    assert raw[8:10] == b"\x02\x00"  # format 2.0
    keys = Keyring((OTHER, KEY))
    assert read(raw, keys) == [(0, TEXT), (64 * KiB, None), (128 * KiB, RANDOM)]
    index = index_stream(io.BytesIO(raw), keys=keys)
    text, zero, rand = list(index)
    assert zero.kind == "zero" and zero.stored == 0
    assert bytes(index.read(io.BytesIO(raw), rand)) == RANDOM
    assert bytes(index.read(io.BytesIO(raw), text, into=bytearray(64 * KiB))) == TEXT
    overhead = 16 if codec.key else 0
    assert rand.stored == len(RANDOM) + overhead and rand.flags == 0  # did not shrink: plain
    if codec.compression == "zstd":
        assert text.flags == 1 and text.stored < len(TEXT) // 3
    if codec.key:
        assert TEXT[:64] not in raw and RANDOM[:64] not in raw


def test_without_compression_or_key_the_stream_is_format_1_0_as_before() -> None:
    raw = encode(None)
    assert raw[8:10] == b"\x01\x00" and TEXT in raw
    assert b"compression" not in raw[:600]  # a 1.0 header has no payload keys


def test_a_stream_of_format_1_0_made_by_the_first_release_still_reads() -> None:
    raw = (DATA / "stream-format1.ahvd").read_bytes()
    reader = StreamReader(io.BytesIO(raw), name="fixture")
    assert reader.header.vm_name == "legacy" and reader.header.compression == "none"
    got = {r.offset: (r.length, None if r.data is None else bytes(r.data)) for r in reader}
    text = b"".join(b"line %05d of the format 1.0 fixture\n" % i for i in range(2000))[:4096]
    assert got == {0: (4096, text), 4096: (8192, None),
                   5 * 4096: (4096, bytes((i * 7 + 3) % 251 for i in range(4096)))}
    assert reader.trailer is not None and reader.trailer.digest_verified
    assert xxhash.xxh3_128_hexdigest(raw) == "d99b253f5feecfb98226ebbc33a4567c"  # unchanged
    index = index_stream(io.BytesIO(raw))  # and as a restore reads it: indexed, then fetched
    assert [(e.kind, e.offset) for e in index] == [("data", 0), ("zero", 4096),
                                                   ("data", 5 * 4096)]
    assert bytes(index.read(io.BytesIO(raw), index[0])) == text


def test_a_flipped_ciphertext_byte_is_caught_by_its_checksum_and_by_its_tag() -> None:
    raw = encode(CODECS["zstd+aes"])
    pos, _, stored = records(raw)[1]  # the random record
    bad = bytearray(raw)
    bad[pos + R56 + stored // 2] ^= 0x01
    with pytest.raises(StreamFormatError, match=r"record 2 .*data checksum mismatch"):
        read(bytes(bad), Keyring((KEY,)))
    with pytest.raises(StreamFormatError, match="data checksum mismatch"):  # no key needed
        index_stream(io.BytesIO(bytes(bad)), verify=True)
    reseal_checks(bad, pos)
    index = index_stream(io.BytesIO(bytes(bad)), keys=Keyring((KEY,)))
    with pytest.raises(StreamFormatError, match=r"record 2 .*authentication failed \(key id "
                       + KEY.key_id):
        index.read(io.BytesIO(bytes(bad)), index[2])


def test_records_swapped_between_two_streams_or_within_one_are_refused() -> None:
    a, b = encode(CODECS["aes"]), encode(CODECS["aes"])  # same key, same layout
    (pa, na, _), _ = records(a)
    assert records(b)[0][:2] == (pa, na)
    spliced = bytearray(a)
    spliced[pa : pa + na] = b[pa : pa + na]  # b's record 0, whole and self-consistent
    index = index_stream(io.BytesIO(bytes(spliced)), keys=Keyring((KEY,)))
    with pytest.raises(StreamFormatError, match="authentication failed"):
        index.read(io.BytesIO(bytes(spliced)), index[0])
    with pytest.raises(StreamFormatError, match="authentication failed"):
        read(bytes(spliced), Keyring((KEY,)))
    # within one stream: record 2's sealed payload put in place of record 0 (same size),
    # with its checks recomputed
    same = encode(CODECS["aes"], disk_size=1 << 20)
    moved = bytearray(same)
    (p0, _, s0), (p2, _, s2) = records(same)
    assert s0 == s2
    moved[p0 + R56 : p0 + R56 + s0] = same[p2 + R56 : p2 + R56 + s2]
    reseal_checks(moved, p0)
    with pytest.raises(StreamFormatError, match=r"record 0 .*authentication failed"):
        index_stream(io.BytesIO(bytes(moved)), keys=Keyring((KEY,))).read(
            io.BytesIO(bytes(moved)), index_stream(io.BytesIO(bytes(moved)))[0])


def test_a_dropped_last_record_with_a_rewritten_trailer_fails_the_trailer_tag() -> None:
    raw = encode(CODECS["aes"])
    pos, size, _ = records(raw)[1]
    trailer_at = pos + size
    body = bytearray(raw[trailer_at + R56 : trailer_at + R56 + 64])
    # totals as they would be without the last record, all xxh3 checks recomputed
    struct.pack_into("<QQQQQ", body, 0, 1, 1, 64 * KiB, 64 * KiB, pos)
    head = bytearray(raw[trailer_at : trailer_at + R56])
    struct.pack_into("<Q", head, 8, 2)  # seq of the trailer: two records before it
    cut = bytearray(raw[:pos]) + head + body + raw[trailer_at + R56 + 64 :]
    digest = xxhash.xxh3_128(bytes(cut[:pos])).digest()
    struct.pack_into("<16s", cut, pos + R56 + 40, digest)
    reseal_checks(cut, pos)
    with pytest.raises(StreamFormatError, match="trailer: authentication failed"):
        read(bytes(cut), Keyring((KEY,)))


def test_a_wrong_or_missing_key_fails_in_one_line_naming_the_key_id() -> None:
    raw = encode(CODECS["zstd+aes"])
    with pytest.raises(StreamFormatError) as missing:
        read(raw)
    assert f"encrypted with key id {KEY.key_id} and no key is configured" in str(missing.value)
    with pytest.raises(StreamFormatError) as wrong:
        read(raw, Keyring((OTHER,)))
    msg = str(wrong.value)
    assert f"key id {KEY.key_id}, which none of the keys has: {OTHER.key_id} (tenant-b.key)" \
        in msg and "\n" not in msg
    for text in (msg, str(missing.value), repr(KEY), KEY.key_id):
        assert KEY.secret.hex() not in text and OTHER.secret.hex() not in text


def test_verify_without_the_key_checks_framing_and_says_what_it_could_not() -> None:
    raw = encode(CODECS["zstd+aes"])
    index = index_stream(io.BytesIO(raw), verify=True)
    assert index.verified and index.trailer is not None
    assert f"key id {KEY.key_id}" in index.trailer.unchecked
    assert "AES-GCM tags of 2 data record(s) and of the trailer were not checked" in \
        index.trailer.unchecked
    full = index_stream(io.BytesIO(raw), verify=True, keys=Keyring((KEY,)))
    assert full.trailer is not None and full.trailer.unchecked == ""


def _key_file(tmp_path: Path, name: str, mode: int = 0o600, text: str | None = None) -> Path:
    path = tmp_path / name
    path.write_text(text if text is not None else os.urandom(32).hex() + "\n")
    path.chmod(mode)
    return path


def test_key_files_and_codec_keys_are_checked_and_refused_by_name(tmp_path: Path) -> None:
    good = _key_file(tmp_path, "k.key")
    key = load_stream_key(good, key="encryption_key")
    assert key.key_id in StreamCodec(key=key).describe()
    with pytest.raises(ConfigError, match=r"encryption_key file .*open.key: mode 0644 is "
                       r"readable by others; expected 0600"):
        load_stream_key(_key_file(tmp_path, "open.key", 0o644), key="encryption_key")
    with pytest.raises(ConfigError, match=r"encryption_old_keys: .*short.key is not a key file"):
        load_stream_key(_key_file(tmp_path, "short.key", text="abcd"), key="encryption_old_keys")
    cfg = load_config(overrides={"encryption_key": str(good), "sink": "bacula",
                                 "encryption_old_keys": str(good)})
    with pytest.raises(ConfigError, match="encryption_key: streams are encrypted only in the "
                       "directory repository; sink=bacula does not encrypt"):
        stream_codec(cfg)
    assert stream_codec(load_config(overrides={"sink": "bacula"})).compression == "none"
    auto = stream_codec(load_config(overrides={"encryption_key": str(good)}))
    assert (auto.compression, auto.level, auto.key) == ("zstd", 1, key)
    assert [k.key_id for k in stream_keys(cfg).keys] == [key.key_id, key.key_id]
    with pytest.raises(ConfigError, match=r"compression: .*zstd level '99' is not 1 to 19"):
        load_config(overrides={"compression": "zstd:99"})
    assert load_config(overrides={"compression": "ZSTD:5"}).compression == "zstd:5"
