"""Our target under corruption: a byte flipped on its way from the initiator is caught by the
digests (the connection is dropped, the write is sent again), and lands silently without them."""

from __future__ import annotations

import pytest
import trio
from tests.transports.conftest import INITIATOR_IQN, pattern

from ahvbackup.transports.iscsi import IscsiSession
from ahvbackup.transports.iscsi.target import Export, IscsiTarget, MemoryLun

IQN = "iqn.2010-06.com.nutanix:vg-faults"


class UpstreamFlip:
    """A TCP relay that flips one byte `at` bytes into the initiator-to-target stream, once
    armed."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self.at: int | None = None
        self.fired = False
        self._count = 0

    def arm(self, at: int) -> None:
        self.at, self._count, self.fired = at, 0, False

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream(*self.upstream)
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, server, True, nursery.cancel_scope)
            nursery.start_soon(self._pump, server, client, False, nursery.cancel_scope)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, upstream: bool,
                    scope: trio.CancelScope) -> None:
        try:
            while data := await src.receive_some(65536):
                if upstream and self.at is not None:
                    pos = self.at - self._count
                    self._count += len(data)
                    if 0 <= pos < len(data):
                        self.at, self.fired = None, True
                        data = data[:pos] + bytes([data[pos] ^ 0x5A]) + data[pos + 1 :]
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


@pytest.mark.parametrize("digests", [True, False], ids=["digests", "control-without"])
async def test_corrupted_write_is_caught_by_the_targets_digest_check(digests: bool) -> None:
    lun = MemoryLun(1 << 20)
    target = IscsiTarget(exports={IQN: Export(iqn=IQN, luns=[lun], read_only=False)})
    new = pattern(512 << 10, seed=8)
    async with trio.open_nursery() as nursery:
        _h, port = await nursery.start(target.serve, "127.0.0.1", 0)
        proxy = UpstreamFlip(("127.0.0.1", port))
        await nursery.start(proxy.serve)
        async with IscsiSession.connect(portal=("127.0.0.1", proxy.port), target_iqn=IQN,
                                        initiator_iqn=INITIATOR_IQN, digests=digests,
                                        max_transfer=512 << 10) as s:
            proxy.arm(at=100_000)  # inside the write's data
            await s.write(0, new)
            assert proxy.fired
            if digests:
                assert s.reconnects == 1
                assert bytes(lun.data[: len(new)]) == new
            else:
                assert s.reconnects == 0
                diff = sum(a != b for a, b in zip(lun.data[: len(new)], new, strict=True))
                assert diff == 1
        nursery.cancel_scope.cancel()
