"""Fuzzing what we parse, with hypothesis: damaged streams, configuration files, plugin strings
and metaplugin packet headers. Each is refused with our own error (a named reason), never a
crash, a hang, a secret in the message, or an altered stream accepted.

`make test` runs a bounded number of examples per surface; for a longer run:
``AHVBACKUP_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q tests/core/test_fuzz_inputs.py``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ahvbackup.bacula.protocol import ProtocolError, parse_header
from ahvbackup.core.config import load_config
from ahvbackup.core.config.keys import KEYS, SECRET_KEYS
from ahvbackup.core.errors import ConfigError, StreamFormatError
from ahvbackup.core.stream import Decoder, StreamHeader, StreamReader, StreamWriter

EXAMPLES = int(os.environ.get("AHVBACKUP_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
SECRET = "S3cret-fuzz-value"


def _stream() -> bytes:
    out = io.BytesIO()
    header = StreamHeader(kind="full", vm_uuid="vm", vm_name="fuzz", disk_uuid="d",
                          disk_label="scsi.0", disk_size=1 << 16, snapshot_id="snap")
    with StreamWriter(out, header) as w:
        w.write_data(0, bytes(range(256)) * 4)
        w.write_zero(4096, 4096)
        w.write_data(12288, b"\xa5" * 700)
    return out.getvalue()


RAW = _stream()
mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(RAW) - 1), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, len(RAW)), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, len(RAW) - 1), st.integers(1, 64)),
    st.tuples(st.just("cut"), st.integers(0, len(RAW) - 1), st.just(0)),
    st.tuples(st.just("repeat"), st.integers(0, len(RAW) - 1), st.integers(1, 64)),
)


def _mutate(data: bytes, ops: list[tuple[str, int, object]]) -> bytes:
    buf = bytearray(data)
    for op, at, arg in ops:
        at = min(at, len(buf))
        if op == "flip" and at < len(buf):
            buf[at] ^= int(arg)  # type: ignore[call-overload]
        elif op == "insert":
            buf[at:at] = arg  # type: ignore[index]
        elif op == "delete":
            del buf[at : at + int(arg)]  # type: ignore[call-overload]
        elif op == "cut":
            del buf[at:]
        elif op == "repeat":
            buf[at:at] = buf[at : at + int(arg)]  # type: ignore[call-overload]
    return bytes(buf)


def _decode_in_pieces(data: bytes, pieces: list[int]) -> None:
    """What the Bacula paths do: feed a decoder whatever pieces arrive."""
    dec, pos, pending = Decoder(name="fuzz"), 0, bytearray()
    sizes = iter(pieces)
    while pos < len(data):
        n = next(sizes, 4096)
        chunk = memoryview(data)[pos : pos + n]
        pos += len(chunk)
        while chunk:
            want = dec.want
            if want == 0:
                dec.at_eof(extra=True)
            take = min(want - len(pending), len(chunk))
            pending += chunk[:take]
            chunk = chunk[take:]
            if len(pending) == want:
                dec.take(pending)
                pending = bytearray()
    if dec.want:
        dec.truncated_in(len(pending))


@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=3),
       pieces=st.lists(st.integers(1, 3000), max_size=40))
def test_a_mutated_stream_is_refused_by_name_and_never_accepted(
        ops: list[tuple[str, int, object]], pieces: list[int]) -> None:
    data = _mutate(RAW, ops)
    if data == RAW:
        return  # a mutation that undid itself
    with pytest.raises(StreamFormatError) as info:
        StreamReader(io.BytesIO(data), name="fuzz/scsi.0").verify()
    assert str(info.value).strip()
    with pytest.raises(StreamFormatError):
        _decode_in_pieces(data, pieces)


KEY_NAMES = sorted(k.name for k in KEYS if not k.secret)
SECRET_NAMES = sorted(SECRET_KEYS)
line = st.one_of(
    st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(KEY_NAMES),
              st.one_of(st.text(max_size=40), st.integers().map(str))),
    # a secret's value, alone or with junk around it, never appears in an error
    st.builds(lambda k, pre, post: f"{k} = {pre}{SECRET}{post}", st.sampled_from(SECRET_NAMES),
              st.sampled_from(["", "'", '"', " "]), st.sampled_from(["", "'", '"', "\\"])),
    st.text(max_size=60),
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
)


@FUZZ
@given(lines=st.lists(line, max_size=12))
def test_a_fuzzed_configuration_file_is_one_clear_refusal_or_a_config(
        tmp_path: Path, lines: list[str]) -> None:
    path = tmp_path / "fuzz.conf"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogateescape")
    path.chmod(0o600)
    try:
        load_config(files=[path])
    except ConfigError as err:
        text = str(err)
        assert text.strip() and SECRET not in text, text
        assert all(len(one) < 2000 for one in text.splitlines())


@FUZZ
@given(body=st.text(max_size=200), secret=st.booleans())
def test_a_fuzzed_plugin_string_is_one_clear_refusal_or_a_config(body: str,
                                                                 secret: bool) -> None:
    text = f"ahvbackup: {body}" + (f" password={SECRET}" if secret else "")
    refusal = ""
    try:
        load_config(plugin_string=text)
    except ConfigError as err:
        refusal = str(err) or "(empty message)"
    assert SECRET not in refusal and refusal != "(empty message)"


@FUZZ
@given(raw=st.binary(min_size=8, max_size=8))
def test_a_fuzzed_packet_header_is_parsed_or_refused_quoting_it(raw: bytes) -> None:
    try:
        kind, length = parse_header(raw)
    except ProtocolError as err:
        kind, length, refusal = "", 0, str(err)
    else:
        refusal = ""
    assert refusal.strip() if not kind else kind in "CDFTEAWISNRPOVQ" and length <= 999_999
