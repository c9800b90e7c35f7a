"""The DR push protocol refuses every malformed, oversized or out-of-order message with an
error that names it, and a receiver given one applies nothing of it."""

from __future__ import annotations

import contextlib
import json
import random
import re
import struct
from pathlib import Path

import pytest
import trio
from tests.core.dr.dr_world import FileVm, MiB, image_of, serve_receiver, tcp

from ahvbackup.core.dr.protocol import (
    CHAIN_START,
    FRAME,
    Data,
    DiskEnd,
    FrameDecoder,
    Hello,
    HelloDisk,
    PointEnd,
    ProtocolError,
    PushRules,
    Refused,
    ResumeToken,
    Welcome,
    Zero,
    chain_next,
    encode,
)
from ahvbackup.core.dr.push import PushSettings, push_point
from ahvbackup.core.dr.receiver import ReceiverSettings

T_HELLO, T_DATA, T_ZERO = 1, 3, 4
CHUNK = 64 << 10


def _hello(**kw: object) -> Hello:
    base = dict(vm_uuid="vm-1", vm_name="db", point=2, snapshot_id="s2", base=1,
                base_snapshot_id="s1", chunk=CHUNK,
                disks=(HelloDisk(uuid="d0", label="scsi.0", size=MiB, full=False),
                       HelloDisk(uuid="d1", label="scsi.1", size=MiB, full=False)))
    base.update(kw)
    return Hello(**base)  # type: ignore[arg-type]


def _hello_json(**kw: object) -> bytes:
    obj = json.loads(encode(_hello())[FRAME.size:])
    obj.update(kw)
    payload = json.dumps(obj).encode()
    return FRAME.pack(T_HELLO, len(payload)) + payload


def _decode(frame: bytes) -> object:
    d = FrameDecoder(peer="source")
    d.feed(frame)
    return d.next()


MALFORMED = [
    (FRAME.pack(42, 0), "unknown message type 42"),
    (FRAME.pack(T_DATA, 100 << 20), "data message of 104857600 bytes is oversized"),
    (FRAME.pack(T_ZERO, 3) + b"abc", "zero message has 3 bytes (want 18)"),
    (FRAME.pack(T_DATA, 10) + bytes(10), "data message carries no data"),
    (FRAME.pack(T_HELLO, 5) + b"{nope", "hello message is not JSON"),
    (_hello_json(protocol="other/9"), "speaks protocol 'other/9'"),
    (_hello_json(chunk=0), "chunk must be an integer from 4096"),
    (_hello_json(point="2"), "point must be an integer"),
    (_hello_json(vm_uuid="../etc"), "vm_uuid '../etc' is not a plain name"),
    (_hello_json(base=0, base_snapshot_id=""), "a seed (base 0) must send every disk in full"),
    (_hello_json(base=3), "base point 3 is not older than point 2"),
    (_hello_json(disks=[{"uuid": "d", "label": "a", "size": 1, "full": True}] * 2),
     "a disk uuid is listed twice"),
    (_hello_json(disks=[]), "disks must be a list of 1 to 64 disks"),
]


@pytest.mark.parametrize(("frame", "problem"), MALFORMED, ids=[p for _, p in MALFORMED])
def test_malformed_frames_are_refused_by_name(frame: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(problem)):
        _decode(frame)


def test_frames_round_trip_and_wait_for_their_last_byte() -> None:
    msgs = [_hello(), Welcome(newest=1, resume=(ResumeToken(), ResumeToken(5, bytes(32), True))),
            Data(1, 4096, b"x" * 100), Zero(0, 0, 4096), DiskEnd(0, bytes(range(32))),
            PointEnd(2), Refused("no")]
    wire = b"".join(encode(m) for m in msgs)
    d = FrameDecoder(peer="peer")
    out = []
    for i in range(len(wire)):  # one byte at a time: a message only once it is whole
        d.feed(wire[i:i + 1])
        m = d.next()
        if m is not None:
            out.append(m)
    assert d.pending == 0
    assert [type(m) for m in out] == [type(m) for m in msgs]
    assert out[0] == msgs[0] and out[1] == msgs[1] and bytes(out[2].payload) == b"x" * 100  # type: ignore[union-attr]


def _rules() -> PushRules:
    hello = _hello()
    return PushRules(hello, Welcome(newest=1, resume=(ResumeToken(), ResumeToken())))


OUT_OF_ORDER = [
    ([Data(1, 0, b"x")], "data range for disk scsi.1 out of order (the disk being sent is scsi.0)"),
    ([Data(0, 4096, b"x"), Data(0, 0, b"y")], "out of order or repeated"),
    ([Data(0, 4096, b"x"), Data(0, 4096, b"y")], "out of order or repeated"),
    ([Zero(0, MiB - 10, 20)], "ends past the disk's size 1048576"),
    ([Data(0, CHUNK - 1, b"xy")], "crosses a 65536-byte chunk boundary"),
    ([Zero(0, 0, 0)], "is empty"),
    ([Data(7, 0, b"x")], "data range for disk 7, but the point has 2 disks"),
    ([DiskEnd(0, b"\x01" * 32)], "digest mismatch"),
    ([PointEnd(2)], "point end before disk scsi.0 ended"),
    ([DiskEnd(0, CHAIN_START), DiskEnd(1, CHAIN_START), PointEnd(3)], "point end names point 3"),
    ([DiskEnd(0, CHAIN_START), DiskEnd(1, CHAIN_START), PointEnd(2), PointEnd(2)],
     "after the point ended"),
    ([_hello()], "unexpected Hello message"),
]


@pytest.mark.parametrize(("msgs", "problem"), OUT_OF_ORDER, ids=[p for _, p in OUT_OF_ORDER])
def test_out_of_order_messages_are_refused_by_name(msgs: list, problem: str) -> None:
    rules = _rules()
    for m in msgs[:-1]:
        rules.check(m)
    with pytest.raises(ProtocolError, match=re.escape(problem)):
        rules.check(msgs[-1])


def test_a_digest_covers_every_range_in_order() -> None:
    rules = _rules()
    rules.check(Data(0, 0, b"a"))
    rules.check(Zero(0, 4096, 4096))
    want = chain_next(chain_next(CHAIN_START, offset=0, length=1, payload=b"a"),
                      offset=4096, length=4096, payload=None)
    rules.check(DiskEnd(0, want))
    assert rules.done == [True, False]


# against a receiver on loopback -------------------------------------------------------------


async def _session(port: int, frames: list[bytes]) -> list[object]:
    """Send raw frames; return every message the receiver answered before it closed."""
    out: list[object] = []
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        for f in frames:
            try:
                await stream.send_all(f)
            except trio.BrokenResourceError:
                break
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_eof()  # a receiver waiting for the rest of a frame sees the end
        d = FrameDecoder(peer="receiver")
        with trio.fail_after(5):
            while True:
                try:
                    data = await stream.receive_some(1 << 16)
                except trio.BrokenResourceError:
                    break
                if not data:
                    break
                d.feed(data)
                while (m := d.next()) is not None:
                    out.append(m)
    return out


async def test_a_receiver_refuses_malformed_pushes_and_applies_nothing(tmp_path: Path) -> None:
    vm = FileVm(tmp_path / "src", [MiB])
    vm.write(random.Random(9), 4)
    settings = ReceiverSettings(state_dir=tmp_path / "rx", sync_bytes=4096)
    async with serve_receiver(settings) as (receiver, port):
        seed, images = vm.snapshot(seed=True)
        await push_point(seed, connect=tcp(port), settings=PushSettings(chunk_size=CHUNK))
        before = image_of(receiver, vm.vm_uuid, 1, vm.disk_uuids[0])
        d = (HelloDisk(uuid=vm.disk_uuids[0], label="scsi.0", size=MiB, full=False),)
        hello = Hello(vm_uuid=vm.vm_uuid, vm_name=vm.name, point=2, snapshot_id="s2", base=1,
                      base_snapshot_id=seed.snapshot_id, chunk=CHUNK, disks=d)
        good = encode(Data(0, 0, b"\xff" * 4096))
        # each case a point of its own snapshot: a partial of another point never resumes
        hello_of = iter(Hello(**{**hello.__dict__, "snapshot_id": f"s2-{i}"}) for i in range(9))
        cases = [
            ([encode(Data(0, 0, b"x"))], "the first message must be hello"),
            ([FRAME.pack(T_DATA, 1 << 30)], "oversized"),
            ([encode(next(hello_of)), good, encode(Data(0, 0, b"\xee" * 4096))],
             "out of order"),
            ([encode(next(hello_of)), good, encode(Zero(0, MiB, 4096))],
             "ends past the disk's size"),
            ([encode(next(hello_of)), good, encode(DiskEnd(0, bytes(32)))], "digest mismatch"),
            ([encode(Hello(**{**hello.__dict__, "base_snapshot_id": "other"}))],
             "another source's past"),
            ([encode(Hello(**{**hello.__dict__, "base": 0, "base_snapshot_id": "",
                              "disks": (HelloDisk(uuid="x", label="scsi.0", size=MiB,
                                                  full=True),),
                              "point": 1}))], "already complete here"),
            ([encode(next(hello_of)), good, struct.pack(">BI", T_DATA, 20) + b"short"], None),
        ]
        for frames, problem in cases:
            answers = await _session(port, frames)
            refusals = [m for m in answers if isinstance(m, Refused)]
            if problem is None:  # a truncated frame: the connection just ends, nothing listed
                assert not refusals
            else:
                assert len(refusals) == 1 and problem in refusals[0].reason, (problem, answers)
            assert [p.point for p in receiver.points(vm.vm_uuid)] == [1]
            assert image_of(receiver, vm.vm_uuid, 1, vm.disk_uuids[0]) == before
        assert before == images[0]
    vm.close()
