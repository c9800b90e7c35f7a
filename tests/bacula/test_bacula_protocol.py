"""Metaplugin packet framing: strict headers, the 999999-byte limit, and exact reads."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from ahvbackup.bacula.channel import PacketChannel
from ahvbackup.bacula.protocol import (
    MAX_PAYLOAD,
    FdPacketIO,
    PeerClosedError,
    ProtocolError,
    command_text,
    encode_command,
    encode_header,
    parse_header,
    split_payload,
)
from ahvbackup.bacula.session import parse_stat, parse_tstamp, plugin_string_for
from ahvbackup.core.config import parse_plugin_string


def test_header_round_trip() -> None:
    assert encode_header("C", 12) == b"C000012\n"
    assert encode_header("D", MAX_PAYLOAD) == b"D999999\n"
    assert parse_header(b"C000012\n") == ("C", 12)
    assert parse_header(b"F000000\n") == ("F", 0)


@pytest.mark.parametrize(("raw", "problem"), [
    (b"X000001\n", "unknown packet type 'X'"),
    (b"c000001\n", "unknown packet type 'c'"),
    (b"C00001a\n", "length b'00001a' is not 6 digits"),
    (b"C-00001\n", "length b'-00001' is not 6 digits"),
    (b"C 00001\n", "length b' 00001' is not 6 digits"),
    (b"C000001x", "does not end with a newline"),
    (b"F000003\n", "a F packet carries no payload"),
    (b"T000001\n", "a T packet carries no payload"),
    (b"C0001\n", "6 bytes, expected 8"),
])
def test_malformed_headers_are_refused_naming_the_bytes(raw: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_header(raw)
    assert str(info.value) == f"bad packet header {raw!r}: {problem}"


def test_plugin_may_not_send_backend_only_types() -> None:
    with pytest.raises(ProtocolError, match="unknown packet type 'E'"):
        parse_header(b"E000004\n", allowed=frozenset("CDFT"))


def test_encoding_refuses_what_the_plugin_could_not_read() -> None:
    with pytest.raises(ValueError, match=r"outside 0\.\.999999"):
        encode_header("D", MAX_PAYLOAD + 1)
    with pytest.raises(ValueError, match="carries no payload"):
        encode_header("F", 1)
    with pytest.raises(ValueError, match="one line"):
        encode_command("FNAME:a\nb")


def test_split_payload_respects_the_limit_without_empty_packets() -> None:
    data = bytes(range(256)) * 10_000  # 2,560,000 bytes
    pieces = list(split_payload(data))
    assert [len(p) for p in pieces] == [999_999, 999_999, 560_002]
    assert b"".join(pieces) == data
    assert list(split_payload(b"")) == []


def test_commands_keep_non_utf8_file_names() -> None:
    name = os.fsdecode(b"FNAME:/@ahvbackup/c/vm-\xff/vm.json")
    packet = encode_command(name)
    assert packet[8:] == b"FNAME:/@ahvbackup/c/vm-\xff/vm.json\n"
    assert command_text(packet[8:]) == name


def test_fd_packet_io_never_reads_past_its_packet() -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"C000018\nHello ahvbackup 3\nC000004\nJob\n")
        pio = FdPacketIO(read_fd=r, write_fd=w)
        assert pio.read_packet().text == "Hello ahvbackup 3"
        assert os.read(r, 100) == b"C000004\nJob\n"  # still in the pipe for the next reader
        os.close(w)
        w = -1
        with pytest.raises(PeerClosedError, match="closed the connection"):
            pio.read_packet()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


packets = st.lists(st.one_of(
    st.builds(lambda t: ("C", t.encode() + b"\n"),
              st.text(st.characters(blacklist_characters="\n", blacklist_categories=["Cs"]),
                      max_size=50)),
    st.builds(lambda b: ("D", b), st.binary(min_size=1, max_size=3000)),
    st.just(("F", b"")),
), max_size=20)


@settings(max_examples=60, deadline=None)
@given(packets=packets, chunk=st.integers(min_value=1, max_value=37))
def test_channel_reads_packets_however_the_pipe_splits_them(
        packets: list[tuple[str, bytes]], chunk: int) -> None:
    wire = b"".join(encode_header(k, len(p)) + p for k, p in packets) + b"T000000\n"

    async def main() -> list[tuple[str, bytes]]:
        send, receive = trio.testing.memory_stream_one_way_pair()
        channel = PacketChannel(receive, trio.testing.MemorySendStream())
        got: list[tuple[str, bytes]] = []
        async with trio.open_nursery() as nursery:
            async def feed() -> None:
                for i in range(0, len(wire), chunk):
                    await send.send_all(wire[i : i + chunk])

            nursery.start_soon(feed)
            while (p := await channel.receive()).kind != "T":
                got.append((p.kind, bytes(p.payload)))
        return got

    assert trio.run(main) == packets


async def test_channel_messages_are_one_masked_line() -> None:
    from ahvbackup.core.secret import Secret

    sink = trio.testing.MemorySendStream()
    channel = PacketChannel(trio.testing.MemoryReceiveStream(), sink)
    keep = Secret("hunter2-topsecret")
    await channel.send_message("E", "a: bad\nb: token hunter2-topsecret leaked\n")
    data = sink.get_data_nowait()
    assert data == encode_command("a: bad; b: token ******** leaked", kind="E")
    del keep


@pytest.mark.parametrize("value", ["plain", "with space", "it's", 'say "hi"', "back\\slash",
                                   "a=b,c=d", "", "*", "10.0.0.0/24=10.1.0.0/24"])
def test_plugin_string_rebuilt_from_params_parses_back(value: str) -> None:
    text = plugin_string_for("ahvbackup", [("vm", value), ("exclude", "x")])
    parsed = parse_plugin_string(text)
    assert [(i.key, i.value) for i in parsed.items] == [("vm", value), ("exclude", "x")]


def test_restore_attributes_parse_strictly() -> None:
    assert parse_stat("F 1048576 0 0 100640 1 0") == ("F", 1048576, 0, 0, 0o100640, 1)
    assert parse_tstamp("1 2 3") == (1, 2, 3)
    with pytest.raises(ProtocolError, match="bad STAT"):
        parse_stat("F big 0 0 100640 1")
    with pytest.raises(ProtocolError, match="bad TSTAMP"):
        parse_tstamp("1 2")
