"""The client against the Prism simulator: in-process (ASGI) and served over real TLS."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from ahvbackup.core.errors import ApiAuthError, ApiNotFoundError, ApiRateLimitedError
from ahvbackup.core.secret import Secret
from ahvbackup.hypervisors.ahv.client import Prism, PrismTlsError, Vm, connect_prism
from ahvbackup.hypervisors.ahv.simulator import (
    Simulator,
    pc_app,
    pe_app,
    seed_pattern,
    serve_simulator,
)

PASSWORD = Secret("backup/4u")


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Simulator]:
    s = Simulator(tmp_path / "sim", task_seconds=0.05, sync=False)
    yield s
    s.close()


@pytest.fixture
async def prism(sim: Simulator) -> AsyncIterator[Prism]:
    async with connect_prism(
        "https://pc.sim:9440", user="backup", password=PASSWORD, rate_rpm=0,
        transport=httpx.ASGITransport(app=pc_app(sim)),
        pe_transport_factory=lambda c: httpx.ASGITransport(app=pe_app(sim, c.uuid)),
    ) as p:
        yield p


def a_vm_with_data(vms: list[Vm]) -> Vm:
    return next(v for v in vms if v.data_disks and v.name != "web-01")


async def test_inventory_reads_through_the_models(sim: Simulator, prism: Prism) -> None:
    assert (await prism.pc.me()).name == "backup"
    [cluster] = await prism.pc.aos_clusters()
    assert cluster.dsip == sim.clusters[cluster.uuid].dsip
    assert any(c.is_prism_central for c in await prism.pc.list_clusters())
    vms = await prism.pc.list_vms(length=2)
    assert sorted(v.name for v in vms) == sorted(v.name for v in sim.vms.values())
    vm = await prism.pc.get_vm(vms[0].uuid)
    assert vm == vms[0]
    assert prism.pc.auth.basic_logins == 1


async def test_pe_only_calls_are_404_on_pc(prism: Prism) -> None:
    with pytest.raises(ApiNotFoundError):
        await prism.pc.list_vm_snapshots()


async def test_snapshot_changed_regions_and_image_range_read(
    sim: Simulator, prism: Prism,
) -> None:
    vm = a_vm_with_data(await prism.pc.list_vms())
    pe = await prism.pe(vm.cluster_uuid)
    ids = await prism.pc.idempotence_identifiers(1)
    created = await pe.create_vm_snapshot(vm.uuid, name="t-backup", uuid=ids.uuids[0])
    assert created.uuid == ids.uuids[0]
    snap = await pe.wait_vm_snapshot(created.uuid, timeout=30, poll=0.05)
    assert snap.state == "COMPLETE"
    disk = vm.data_disks[0]
    file = snap.file_for_disk(disk.uuid)
    assert file is not None
    assert [s.uuid for s in await pe.list_vm_snapshots(vm_uuid=vm.uuid)] == [snap.uuid]

    regions = [r async for r in pe.changed_regions(file.snapshot_file_path)]
    data = [r for r in regions if not r.zeroed]
    assert data, "the seeded disk has data"
    first = data[0]

    cluster = await prism.cluster(vm.cluster_uuid)
    image = await prism.pc.create_image(
        "t-image", source_uri=f"nfs://{cluster.external_ip}{file.snapshot_file_path}"
    )
    assert image.task_uuid is not None
    await prism.pc.wait_task(image.task_uuid, timeout=30, poll=0.05)
    length = min(first.length, 64 * 1024)
    buf = bytearray(length)
    assert await prism.pc.read_image_range(image.uuid, first.offset, memoryview(buf)) == length
    assert bytes(buf) == sim.read_snapshot_disk(snap.uuid, disk.uuid, first.offset, length)
    index = vm.disks.index(disk)
    assert bytes(buf) == seed_pattern(vm.name, index, first.offset, length)

    task = await prism.pc.delete_image(image.uuid)
    assert task is not None
    await prism.pc.wait_task(task, timeout=30, poll=0.05)
    task = await pe.delete_vm_snapshot(snap.uuid)
    if task:
        await pe.wait_task(task, timeout=30, poll=0.05)
    assert await pe.list_vm_snapshots(vm_uuid=vm.uuid) == []


async def test_injected_429_is_retried_after_retry_after(sim: Simulator, prism: Prism) -> None:
    sim.faults.add(method="POST", path=r"/vms/list$", status=429, retry_after=1, count=2)
    start = trio.current_time()
    assert await prism.pc.list_vms()
    assert trio.current_time() - start >= 2.0


async def test_injected_429_forever_gives_up(sim: Simulator) -> None:
    sim.faults.add(method="GET", path=r"/users/me$", status=429, retry_after=0, count=None)
    async with connect_prism(
        "https://pc.sim:9440", user="backup", password=PASSWORD, rate_rpm=0, max_attempts=3,
        transport=httpx.ASGITransport(app=pc_app(sim)),
    ) as p:
        with pytest.raises(ApiRateLimitedError, match=r"gave up after 3 attempts.*injected fault"):
            await p.pc.me()


async def test_a_read_only_user_cannot_snapshot(sim: Simulator) -> None:
    sim.users.add("viewer", "view/4u", "Viewer")
    async with connect_prism(
        "https://pc.sim:9440", user="viewer", password=Secret("view/4u"), rate_rpm=0,
        transport=httpx.ASGITransport(app=pc_app(sim)),
        pe_transport_factory=lambda c: httpx.ASGITransport(app=pe_app(sim, c.uuid)),
    ) as p:
        vm = a_vm_with_data(await p.pc.list_vms())
        pe = await p.pe(vm.cluster_uuid)
        with pytest.raises(ApiAuthError, match=r"user 'viewer' lacks permission for "
                                               r"POST /vm_snapshots \(403\)"):
            await pe.create_vm_snapshot(vm.uuid, name="nope")


async def test_served_over_tls_with_its_ca_and_refused_without(sim: Simulator) -> None:
    async with serve_simulator(sim, port=0, tls=True) as ep:
        assert ep.ca_path is not None
        async with connect_prism(ep.pc_url, user="backup", password=PASSWORD,
                                 verify=str(ep.ca_path), rate_rpm=0) as p:
            [cluster] = await p.pc.aos_clusters()
            pe = await p.pe(cluster.uuid)
            assert pe.base_url == ep.pe_urls[cluster.uuid]
            assert isinstance(await pe.list_vm_snapshots(), list)
        async with connect_prism(ep.pc_url, user="backup", password=PASSWORD,
                                 rate_rpm=0) as p:
            with pytest.raises(PrismTlsError, match="prism_ca_cert"):
                await p.pc.me()
