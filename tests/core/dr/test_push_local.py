"""DR pushes from local-file disks to a receiver on loopback TCP: cuts resume from the durable
offset, rotation keeps the newest points, receivers stay apart, and the throttle holds."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import trio.testing
from tests.core.dr.dr_world import CuttingProxy, FileVm, MiB, image_of, serve_receiver, tcp

from ahvbackup.core.dr.protocol import Hello, HelloDisk, encode
from ahvbackup.core.dr.push import PushRefused, PushSettings, push_point
from ahvbackup.core.dr.receiver import Receiver, ReceiverSettings
from ahvbackup.core.errors import ConfigError, TransportError

FAST = PushSettings(backoff=0.01, backoff_max=0.05, retries=3)


def _settings(tmp: Path, name: str = "rx", **kw: object) -> ReceiverSettings:
    return ReceiverSettings(state_dir=tmp / name, sync_bytes=256 << 10, **kw)  # type: ignore[arg-type]


async def test_a_cut_push_resumes_from_the_durable_offset(tmp_path: Path) -> None:
    vm = FileVm(tmp_path / "src", [6 * MiB, 2 * MiB])
    rng = random.Random(1)
    vm.write(rng, 8)
    async with serve_receiver(_settings(tmp_path)) as (receiver, port):
        seed, images = vm.snapshot(seed=True)
        whole = 8 * MiB
        proxy = CuttingProxy(port, cut_after=[5 * MiB])  # inside disk 0, after some acks
        async with proxy.serve() as pport:
            result = await push_point(seed, connect=tcp(pport), settings=FAST)
        assert result.reconnects == 1
        assert len(proxy.forwarded) == 2 and proxy.forwarded[0] == 5 * MiB
        # the second connection sent what was not durable yet, not the whole point again
        resumed = result.resumed_at["scsi.0"]
        assert 3 * MiB <= resumed < 5 * MiB
        assert whole - resumed < proxy.forwarded[1] < whole - resumed + (64 << 10)
        assert result.bytes_pushed >= sum(proxy.forwarded)
        for i, uid in enumerate(vm.disk_uuids):
            assert image_of(receiver, vm.vm_uuid, 1, uid) == images[i]
        assert [p.point for p in receiver.points(vm.vm_uuid)] == [1]
    vm.close()


async def test_a_point_cut_for_ever_is_never_listed_and_a_restart_resumes_it(
        tmp_path: Path) -> None:
    vm = FileVm(tmp_path / "src", [4 * MiB])
    rng = random.Random(2)
    vm.write(rng, 6)
    async with serve_receiver(_settings(tmp_path)) as (receiver, port):
        seed, images = vm.snapshot(seed=True)
        await push_point(seed, connect=tcp(port), settings=FAST)
        vm.write(rng, 40)
        delta, images = vm.snapshot()
        delta_bytes = sum(r.length for r in vm.last_regions[0] if not r.zero)
        # the first connection gets some ranges through; every later one only its hello
        proxy = CuttingProxy(port, cut_after=[1 * MiB] + [300] * 10)
        async with proxy.serve() as pport:
            with pytest.raises(TransportError, match="gave up after 3 reconnects"):
                await push_point(delta, connect=tcp(pport), settings=FAST)
        assert [p.point for p in receiver.points(vm.vm_uuid)] == [1]  # never listed half-done
        assert len(proxy.forwarded) >= 4  # 1 + 3 retries without progress, at least
    # a restarted receiver (same state directory) resumes the partial point
    async with serve_receiver(_settings(tmp_path)) as (receiver, port):
        assert [p.point for p in receiver.points(vm.vm_uuid)] == [1]
        result = await push_point(delta, connect=tcp(port), settings=FAST)
        assert result.resumed_at["scsi.0"] > 0
        assert 0 < result.data_bytes < delta_bytes  # what was durable is not sent again
        assert image_of(receiver, vm.vm_uuid, 2, vm.disk_uuids[0]) == images[0]
        assert not (tmp_path / "rx" / "receiver" / vm.vm_uuid / "partial").exists()
    vm.close()


async def test_a_lost_commit_answer_is_answered_again_not_pushed_again(tmp_path: Path) -> None:
    vm = FileVm(tmp_path / "src", [2 * MiB])
    vm.write(random.Random(8), 6)
    seed, images = vm.snapshot(seed=True)
    async with serve_receiver(_settings(tmp_path, "rx-a")) as (_, pa), \
            serve_receiver(_settings(tmp_path, "rx-b")) as (rb, pb):
        whole = (await push_point(seed, connect=tcp(pa), settings=FAST)).bytes_pushed
        proxy = CuttingProxy(pb, cut_after=[whole])  # everything arrives, the answer does not
        async with proxy.serve() as pport:
            result = await push_point(seed, connect=tcp(pport), settings=FAST)
        assert result.reconnects == 1
        assert result.bytes_pushed < whole + 1024
        assert proxy.forwarded[1] < 1024  # a hello and a point end, no data again
        assert image_of(rb, vm.vm_uuid, 1, vm.disk_uuids[0]) == images[0]
    vm.close()


async def test_a_new_connection_takes_over_from_a_stale_one(tmp_path: Path) -> None:
    """A source whose old connection the receiver still holds open (a cut it has not
    noticed) reconnects and is served, not refused as a second push of the VM."""
    vm = FileVm(tmp_path / "src", [1 * MiB])
    vm.write(random.Random(10), 3)
    seed, images = vm.snapshot(seed=True)
    async with serve_receiver(_settings(tmp_path)) as (receiver, port):
        stale = await trio.open_tcp_stream("127.0.0.1", port)
        hello = encode(Hello(vm_uuid=vm.vm_uuid, vm_name=vm.name, point=1,
                             snapshot_id=seed.snapshot_id, base=0, base_snapshot_id="",
                             chunk=FAST.chunk_size,
                             disks=(HelloDisk(vm.disk_uuids[0], "scsi.0", MiB, True),)))
        await stale.send_all(hello)
        assert await stale.receive_some(1 << 16)  # its welcome: it holds the VM now
        with trio.fail_after(10):
            await push_point(seed, connect=tcp(port), settings=FAST)
        assert image_of(receiver, vm.vm_uuid, 1, vm.disk_uuids[0]) == images[0]
        with trio.fail_after(5):  # the stale connection was ended by the receiver
            while await stale.receive_some(1 << 16):
                pass
        await stale.aclose()
    vm.close()


async def test_rotation_keeps_the_newest_points_whole(tmp_path: Path) -> None:
    vm = FileVm(tmp_path / "src", [2 * MiB])
    rng = random.Random(3)
    vm.write(rng, 4)
    kept: dict[int, bytes] = {}
    async with serve_receiver(_settings(tmp_path, restore_points=3)) as (receiver, port):
        for n in range(1, 6):
            point, images = vm.snapshot(seed=n == 1)
            await push_point(point, connect=tcp(port), settings=FAST)
            kept[n] = images[0]
            vm.write(rng, 4)
            assert [p.point for p in receiver.points(vm.vm_uuid)] == list(
                range(max(1, n - 2), n + 1))
        for n in (3, 4, 5):
            assert image_of(receiver, vm.vm_uuid, n, vm.disk_uuids[0]) == kept[n]
        root = tmp_path / "rx" / "receiver" / vm.vm_uuid
        assert sorted(p.name for p in root.iterdir()) == ["lock", "points"]
    vm.close()


async def test_two_receivers_with_their_own_state_dirs_stay_apart(tmp_path: Path) -> None:
    a, b = FileVm(tmp_path / "a", [1 * MiB]), FileVm(tmp_path / "b", [1 * MiB])
    b.vm_uuid, b.disk_uuids = a.vm_uuid, a.disk_uuids  # the same VM, two different pasts
    a.write(random.Random(4), 5)
    b.write(random.Random(5), 5)
    async with serve_receiver(_settings(tmp_path, "rx-a")) as (ra, pa), \
            serve_receiver(_settings(tmp_path, "rx-b")) as (rb, pb):
        pta, ia = a.snapshot(seed=True)
        ptb, ib = b.snapshot(seed=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: push_point(pta, connect=tcp(pa), settings=FAST))
            nursery.start_soon(lambda: push_point(ptb, connect=tcp(pb), settings=FAST))
        assert ia != ib
        assert image_of(ra, a.vm_uuid, 1, a.disk_uuids[0]) == ia[0]
        assert image_of(rb, a.vm_uuid, 1, a.disk_uuids[0]) == ib[0]
        # a delta that receiver a holds the base of is no business of receiver b's
        a.write(random.Random(6), 3)
        delta, ia2 = a.snapshot()
        with pytest.raises(PushRefused, match="another source's past"):
            await push_point(delta, connect=tcp(pb), settings=FAST)
        await push_point(delta, connect=tcp(pa), settings=FAST)
        assert [p.point for p in ra.points(a.vm_uuid)] == [1, 2]
        assert image_of(ra, a.vm_uuid, 2, a.disk_uuids[0]) == ia2[0]
        assert [p.point for p in rb.points(a.vm_uuid)] == [1]
        assert image_of(rb, a.vm_uuid, 1, a.disk_uuids[0]) == ib[0]
    a.close()
    b.close()


async def test_throttle_holds_the_cap_over_ten_seconds_on_the_mock_clock(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    vm = FileVm(tmp_path / "src", [10 * MiB])
    vm.write(random.Random(7), 30)
    seed, images = vm.snapshot(seed=True)
    receiver = Receiver(_settings(tmp_path))
    source_end, receiver_end = trio.testing.memory_stream_pair()

    async def connect() -> trio.abc.Stream:
        return source_end

    settings = PushSettings(max_bandwidth_mbps=8, reply_timeout=None)  # 1,000,000 bytes/s
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver.handle, receiver_end)
        t0 = trio.current_time()
        result = await push_point(seed, connect=connect, settings=settings)
        elapsed = trio.current_time() - t0
    assert elapsed >= 10
    assert abs(result.bytes_pushed / elapsed / 1_000_000 - 1) < 0.02, (result, elapsed)
    assert image_of(receiver, vm.vm_uuid, 1, vm.disk_uuids[0]) == images[0]
    vm.close()


def test_push_apply_remote_no_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="push_apply_remote: no"):
        Receiver(ReceiverSettings(state_dir=tmp_path, apply_remote=False))
