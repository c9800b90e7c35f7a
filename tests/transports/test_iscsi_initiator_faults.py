"""Faults on the wire: a connection cut mid-read, tgtd dropping or dying, a corrupted PDU, a
target that stops answering. Each ends byte-exact (after a reconnect) or in a clear error,
never in wrong data."""

from __future__ import annotations

import pytest
import trio
from tests.transports.conftest import INITIATOR_IQN, pattern

from ahvbackup.transports.iscsi import (
    IscsiConnectionError,
    IscsiDigestError,
    IscsiSession,
)

pytestmark = pytest.mark.peer

MiB = 1 << 20


class FaultProxy:
    """A TCP relay between initiator and tgtd that, once armed, damages the target-to-initiator
    stream `at` bytes later: `flip` one byte, `cut` the connection, or `stall` forever."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self.connections = 0
        self.fault: tuple[str, int] | None = None
        self.fired = False
        self._count = 0

    @property
    def portal(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def arm(self, kind: str, *, at: int) -> None:
        self.fault, self._count, self.fired = (kind, at), 0, False

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        self.connections += 1
        server = await trio.open_tcp_stream(*self.upstream)
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, server, False, nursery.cancel_scope)
            nursery.start_soon(self._pump, server, client, True, nursery.cancel_scope)

    async def _pump(self, src, dst, downstream: bool, scope: trio.CancelScope) -> None:
        try:
            while True:
                data = await src.receive_some(65536)
                if not data:
                    break
                if downstream and self.fault is not None:
                    kind, at = self.fault
                    pos = at - self._count
                    self._count += len(data)
                    if 0 <= pos < len(data):
                        self.fault, self.fired = None, True
                        if kind == "flip":
                            data = data[:pos] + bytes([data[pos] ^ 0x5A]) + data[pos + 1 :]
                        elif kind == "cut":
                            await dst.send_all(data[:pos])
                            break
                        elif kind == "stall":
                            await dst.send_all(data[:pos])
                            await trio.sleep_forever()
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


@pytest.fixture
async def proxied(tgtd, nursery):
    async def make(data: bytes, **params: str):
        target = tgtd(data=data, params=params)
        proxy = FaultProxy(target.portal)
        await nursery.start(proxy.serve)
        return target, proxy

    return make


def session(portal, target, **kw):
    return IscsiSession.connect(portal=portal, target_iqn=target.iqn,
                                initiator_iqn=INITIATOR_IQN, **kw)


async def read_all(s: IscsiSession) -> bytes:
    buf = bytearray(s.size)
    await s.read_into(0, memoryview(buf))
    return bytes(buf)


async def test_connection_cut_mid_data_in_is_reread_byte_exact(proxied):
    data = pattern(8 * MiB)
    target, proxy = await proxied(data)
    async with session(proxy.portal, target, queue_depth=4, max_transfer=256 * 1024) as s:
        proxy.arm("cut", at=3 * MiB + 123)
        assert await read_all(s) == data
        assert proxy.fired
        assert s.reconnects == 1
        assert proxy.connections == 2
        assert "connection lost" in s.connection_errors[0]


async def test_tgtd_deleting_our_connection_mid_read(tgtd):
    data = pattern(32 * MiB, seed=2)
    target = tgtd(data=data)
    async with session(target.portal, target, queue_depth=2, max_transfer=128 * 1024) as s:

        async def drop_soon():
            await trio.sleep(0.01)
            assert await trio.to_thread.run_sync(target.drop_connections) == 1

        async with trio.open_nursery() as n:
            n.start_soon(drop_soon)
            for _ in range(50):
                assert await read_all(s) == data
                if s.reconnects:
                    break
        assert s.reconnects == 1


async def test_tgtd_killed_and_restarted_mid_read(tgtd):
    data = pattern(32 * MiB, seed=3)
    target = tgtd(data=data)
    async with session(target.portal, target, queue_depth=2, max_transfer=128 * 1024,
                       reconnect_attempts=6) as s:

        async def crash_and_restart():
            await trio.sleep(0.01)
            await trio.to_thread.run_sync(target.kill)
            await trio.sleep(0.3)
            await trio.to_thread.run_sync(target.start)

        async with trio.open_nursery() as n:
            n.start_soon(crash_and_restart)
            for _ in range(50):
                assert await read_all(s) == data
                if s.reconnects:
                    break
        assert s.reconnects == 1


async def test_tgtd_gone_for_good_is_a_clear_failure(tgtd):
    target = tgtd(data=pattern(4 * MiB))
    async with session(target.portal, target, reconnect_attempts=2) as s:
        target.kill()
        buf = bytearray(s.size)
        with pytest.raises(IscsiConnectionError, match="could not reconnect after 2 attempts"):
            await s.read_into(0, memoryview(buf))
        with pytest.raises(IscsiConnectionError):  # the session stays failed, it does not hang
            await s.read_into(0, memoryview(buf))


@pytest.mark.parametrize(("where", "at"), [("data", 5000), ("header", 20)])
async def test_corrupted_pdu_is_detected_by_digests_and_reread(proxied, where, at):
    data = pattern(2 * MiB, seed=4)
    target, proxy = await proxied(data, HeaderDigest="CRC32C", DataDigest="CRC32C")
    async with session(proxy.portal, target, digests=True) as s:
        proxy.arm("flip", at=at)
        assert await read_all(s) == data
        assert proxy.fired
        assert s.reconnects == 1
        assert f"{where} digest mismatch" in s.connection_errors[0]


async def test_corrupted_pdu_without_retries_is_a_digest_error(proxied):
    data = pattern(2 * MiB, seed=5)
    target, proxy = await proxied(data, HeaderDigest="CRC32C", DataDigest="CRC32C")
    async with session(proxy.portal, target, digests=True, reconnect_attempts=0) as s:
        proxy.arm("flip", at=5000)
        with pytest.raises(IscsiDigestError, match="data digest mismatch"):
            await read_all(s)


async def test_without_digests_the_same_corruption_goes_unnoticed(proxied):
    """The control for the digest tests: the proxy really corrupts what the initiator gets."""
    data = pattern(2 * MiB, seed=6)
    target, proxy = await proxied(data)
    async with session(proxy.portal, target) as s:
        proxy.arm("flip", at=5000)
        got = await read_all(s)
        assert proxy.fired
        assert got != data
        assert sum(a != b for a, b in zip(got, data, strict=True)) == 1


async def test_target_that_stops_answering_times_out_and_recovers(proxied):
    data = pattern(4 * MiB, seed=7)
    target, proxy = await proxied(data)
    async with session(proxy.portal, target, command_timeout=1.0) as s:
        proxy.arm("stall", at=100_000)
        assert await read_all(s) == data
        assert s.reconnects == 1
        assert "got no answer within 1 s" in s.connection_errors[0]
