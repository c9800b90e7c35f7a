"""Fuzzing both ends of our iSCSI, with hypothesis.

- The target (what qemu-img, libiscsi and real hosts talk to) gets fuzzed PDUs after a login and
  garbage before one. It answers or drops that connection; it never crashes, never changes a
  read-only LUN, and serves the next initiator correctly.
- The initiator reads through a proxy that corrupts, cuts or pads what the target sends on the
  first connection. With digests on, what the caller gets is the LUN's bytes or an IscsiError;
  never wrong bytes, never another exception, never a hang.

`AHVBACKUP_FUZZ_EXAMPLES` raises the number of examples, as in tests/core/test_fuzz_inputs.py.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.transports.conftest import INITIATOR_IQN, pattern
from tests.transports.test_iscsi_target_conformance import IQN, Raw, read10

from ahvbackup.transports.iscsi.errors import IscsiError
from ahvbackup.transports.iscsi.initiator import IscsiSession
from ahvbackup.transports.iscsi.pdu import BHS_LEN
from ahvbackup.transports.iscsi.target import Export, IscsiTarget, MemoryLun

EXAMPLES = int(os.environ.get("AHVBACKUP_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
SIZE = 256 * 1024
DATA = pattern(SIZE, seed=7)
#: every opcode an initiator may send (RFC 7143 11.1.1), and a few it may not
OPCODES = [0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10, 0x1C, 0x1E, 0x3F]


async def _with_target(body: Callable[[int], Awaitable[None]]) -> None:
    """Run `body(port)` against a target exporting DATA read-only, then prove the target still
    serves a fresh initiator the unchanged bytes. A crash of the target's serve task fails here."""
    lun = MemoryLun(DATA)
    target = IscsiTarget(exports={IQN: Export(iqn=IQN, luns=[lun], read_only=True)})
    async with trio.open_nursery() as nursery:
        _host, port = await nursery.start(target.serve, "127.0.0.1", 0)
        await body(port)
        with trio.fail_after(10):
            async with IscsiSession.connect(portal=("127.0.0.1", port), target_iqn=IQN,
                                            initiator_iqn=INITIATOR_IQN) as s:
                buf = bytearray(SIZE)
                await s.read_into(0, memoryview(buf))
        assert bytes(buf) == DATA and bytes(lun.data) == DATA
        nursery.cancel_scope.cancel()


def _drain_then_close(stream: trio.SocketStream) -> Callable[[], Awaitable[None]]:
    async def drain() -> None:
        # read whatever the target answers until it closes or goes quiet
        with trio.move_on_after(0.05):
            try:
                while await stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
        await stream.aclose()
    return drain


pdu = st.tuples(
    st.sampled_from(OPCODES), st.booleans(),  # opcode, immediate
    st.binary(min_size=BHS_LEN - 1, max_size=BHS_LEN - 1),  # the rest of the header
    st.one_of(st.just(0), st.integers(1, 9000), st.integers(0, (1 << 24) - 1)),  # DSL
    st.binary(max_size=600),  # data actually sent
)


@FUZZ
@given(pdus=st.lists(pdu, min_size=1, max_size=6), read_first=st.booleans())
def test_fuzzed_pdus_after_login_never_crash_the_target_or_touch_a_read_only_lun(
        pdus: list[tuple[int, bool, bytes, int, bytes]], read_first: bool) -> None:
    async def fuzz(port: int) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        raw = Raw(stream)
        await raw.login()
        if read_first:  # a command in flight while the garbage arrives
            await raw.command(read10(0, 64), edtl=64 * 512, read=True)
        try:
            for opcode, immediate, rest, dsl, data in pdus:
                hdr = bytearray(bytes([opcode | (0x40 if immediate else 0)]) + rest)
                hdr[4] = 0  # no AHS: its length is fuzzed through DSL and data instead
                hdr[5:8] = dsl.to_bytes(3, "big")
                await stream.send_all(bytes(hdr) + data)
        except trio.BrokenResourceError:
            pass  # the target dropped the connection: one of the allowed answers
        await _drain_then_close(stream)()

    trio.run(_with_target, fuzz)


@FUZZ
@given(garbage=st.binary(min_size=1, max_size=2000))
def test_garbage_before_login_is_dropped_and_the_target_serves_on(garbage: bytes) -> None:
    async def fuzz(port: int) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with contextlib.suppress(trio.BrokenResourceError):  # the target may hang up first
            await stream.send_all(garbage)
        await _drain_then_close(stream)()

    trio.run(_with_target, fuzz)


@dataclass
class Damage:
    """What the proxy does to the target's bytes on the first connection, at byte `at`."""

    kind: str  # "flip", "cut", "insert", or "none" (record only)
    at: int
    value: bytes

    def apply(self, chunk: bytes, sent: int) -> bytes | None:
        """`chunk` as forwarded (None: cut the connection after what is returned so far)."""
        if not sent <= self.at < sent + len(chunk) or self.kind == "none":
            return chunk
        i = self.at - sent
        if self.kind == "flip":
            return chunk[:i] + bytes([chunk[i] ^ (self.value[0] or 1)]) + chunk[i + 1 :]
        if self.kind == "insert":
            return chunk[:i] + self.value + chunk[i:]
        return None


damage = st.builds(Damage, st.sampled_from(["flip", "cut", "insert"]),
                   st.integers(0, SIZE + 4096), st.binary(min_size=1, max_size=48))


async def _proxy(listener: trio.SocketListener, target_port: int, dmg: Damage,
                 seen: bytearray | None = None) -> None:
    """Forward connections to the target; the first one's target-to-initiator bytes go through
    `dmg` (and are recorded in `seen`)."""
    first = True
    async with listener, trio.open_nursery() as conns:
        while True:
            client = await listener.accept()
            server = await trio.open_tcp_stream("127.0.0.1", target_port)
            conns.start_soon(_pipe, client, server, None, None)
            conns.start_soon(_pipe, server, client, dmg if first else None,
                             seen if first else None)
            first = False


async def _pipe(src: trio.SocketStream, dst: trio.SocketStream, dmg: Damage | None,
                seen: bytearray | None) -> None:
    sent = 0
    try:
        while chunk := await src.receive_some(65536):
            out = dmg.apply(chunk, sent) if dmg else chunk
            if out is None:
                await dst.send_all(chunk[: dmg.at - sent] if dmg else b"")
                return
            sent += len(chunk)
            if seen is not None:
                seen += chunk
            await dst.send_all(out)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await dst.aclose()
        await src.aclose()


async def _read_through_proxy(dmg: Damage, *, offset: int, digests: bool,
                              seen: bytearray | None = None) -> tuple[bytes | str, int]:
    """Read DATA[offset:] through a damaging proxy: (the bytes or the error text, reconnects).
    With `seen`, it also records how many bytes the target had sent when the READ began
    (appended as the last 8 bytes, big-endian)."""
    lun = MemoryLun(DATA)
    target = IscsiTarget(exports={IQN: Export(iqn=IQN, luns=[lun], read_only=True)})
    async with trio.open_nursery() as nursery:
        _host, port = await nursery.start(target.serve, "127.0.0.1", 0)
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        proxy_port = listener.socket.getsockname()[1]
        nursery.start_soon(_proxy, listener, port, dmg, seen)
        buf = bytearray(SIZE - offset)
        result: bytes | str
        reconnects = 0
        with trio.fail_after(30):
            try:
                async with IscsiSession.connect(
                        portal=("127.0.0.1", proxy_port), target_iqn=IQN,
                        initiator_iqn=INITIATOR_IQN, digests=digests, max_transfer=64 * 1024,
                        command_timeout=3, login_timeout=3, reconnect_attempts=2) as s:
                    if seen is not None:
                        mark = len(seen)
                    await s.read_into(offset, memoryview(buf))
                    reconnects = s.reconnects
                result = bytes(buf)
            except IscsiError as err:
                result = str(err)
                assert result.strip(), "an iSCSI error with no message"
        if seen is not None:
            seen += mark.to_bytes(8, "big")
        nursery.cancel_scope.cancel()
    return result, reconnects


@FUZZ
@given(dmg=damage, offset=st.sampled_from([0, 512, 64 * 1024]))
def test_damage_on_the_wire_never_becomes_wrong_bytes(dmg: Damage, offset: int) -> None:
    got, _ = trio.run(lambda: _read_through_proxy(dmg, offset=offset, digests=True))
    if isinstance(got, bytes):
        assert got == DATA[offset:], f"wrong bytes after {dmg}"


def test_the_proxy_damage_reaches_the_initiator() -> None:
    """The property above is only worth something if the damage is real: a byte flipped in the
    READ's first Data-In payload is handed over wrong without digests, and with digests it is
    caught, the connection replaced and the bytes right."""
    seen = bytearray()
    clean, _ = trio.run(lambda: _read_through_proxy(Damage("none", 0, b""), offset=0,
                                                    digests=False, seen=seen))
    assert clean == DATA
    mark = int.from_bytes(seen[-8:], "big")
    assert seen[mark] & 0x3F == 0x25, "the READ's first answer is not a Data-In"
    at = mark + BHS_LEN + 100  # byte 100 of the first payload
    wrong, _ = trio.run(lambda: _read_through_proxy(Damage("flip", at, b"\x01"), offset=0,
                                                    digests=False))
    assert isinstance(wrong, bytes)
    assert sum(a != b for a, b in zip(wrong, DATA, strict=True)) == 1, "not exactly one byte"

    seen = bytearray()
    trio.run(lambda: _read_through_proxy(Damage("none", 0, b""), offset=0, digests=True,
                                         seen=seen))
    at = int.from_bytes(seen[-8:], "big") + BHS_LEN + 4 + 100  # after the header digest
    right, reconnects = trio.run(lambda: _read_through_proxy(Damage("flip", at, b"\x01"),
                                                             offset=0, digests=True))
    assert right == DATA and reconnects >= 1
