"""v3 endpoint methods against a scripted server: pagination, polling, PE calls, image bytes."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import trio

from ahvbackup.core.errors import ApiServerError, ConfigError
from ahvbackup.core.secret import Secret
from ahvbackup.hypervisors.ahv.client import (
    PrismClient,
    PrismTaskError,
    PrismTimeoutError,
)
from ahvbackup.hypervisors.ahv.client.v3 import snapshot_body

Handler = Callable[[httpx.Request, Any], httpx.Response]


class Routes:
    """A scripted Prism: (method, path regex) -> handler(request, json body); records calls."""

    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self.calls: list[tuple[str, str, Any]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        self.routes.append((method, re.compile(f"/api/nutanix/v3{pattern}$"), handler))

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = None
        content = await request.aread()
        if content and request.headers.get("content-type") == "application/json":
            body = json.loads(content)
        self.calls.append((request.method, request.url.path, body))
        for method, pattern, handler in self.routes:
            if method == request.method and pattern.match(request.url.path):
                return handler(request, body)
        return httpx.Response(404, json={"message_list": [{"message": "no route"}]})


def vm_entity(i: int) -> dict[str, Any]:
    return {
        "metadata": {"uuid": f"vm-{i}", "kind": "vm", "spec_version": 3},
        "spec": {"name": f"vm{i}", "cluster_reference": {"uuid": "c1"},
                 "resources": {"power_state": "OFF", "num_sockets": 1, "memory_size_mib": 512}},
        "status": {"name": f"vm{i}", "cluster_reference": {"uuid": "c1"},
                   "resources": {"power_state": "OFF", "num_sockets": 1,
                                 "memory_size_mib": 512}},
    }


@pytest.fixture
def routes() -> Routes:
    return Routes()


@pytest.fixture
async def pc(routes: Routes) -> AsyncIterator[PrismClient]:
    async with PrismClient("https://pc.example:9440", user="backup", password=Secret("pw-pw"),
                           rate_rpm=0, transport=httpx.MockTransport(routes.handle)) as client:
        yield client


async def test_list_vms_reads_every_page(routes: Routes, pc: PrismClient) -> None:
    total = 7

    def page(request: httpx.Request, body: Any) -> httpx.Response:
        start, length = body["offset"], body["length"]
        entities = [vm_entity(i) for i in range(start, min(total, start + length))]
        return httpx.Response(200, json={"metadata": {"total_matches": total, "kind": "vm"},
                                         "entities": entities})

    routes.add("POST", "/vms/list", page)
    vms = await pc.list_vms(filter="vm_name==vm.*", length=3)
    assert [v.name for v in vms] == [f"vm{i}" for i in range(total)]
    bodies = [b for _, _, b in routes.calls]
    assert [b["offset"] for b in bodies] == [0, 3, 6]
    assert all(b["filter"] == "vm_name==vm.*" and b["kind"] == "vm" for b in bodies)


async def test_aos_clusters_leave_prism_central_out(routes: Routes, pc: PrismClient) -> None:
    def cluster(uuid: str, service: str) -> dict[str, Any]:
        return {"metadata": {"uuid": uuid},
                "status": {"name": uuid, "resources": {
                    "config": {"service_list": [service]},
                    "network": {"external_ip": "10.0.0.1", "external_data_services_ip": "10.0.0.2"},
                }}}

    routes.add("POST", "/clusters/list", lambda r, b: httpx.Response(200, json={
        "metadata": {"total_matches": 2},
        "entities": [cluster("pc", "PRISM_CENTRAL"), cluster("c1", "AOS")],
    }))
    [aos] = await pc.aos_clusters()
    assert (aos.uuid, aos.dsip) == ("c1", "10.0.0.2")


async def test_wait_task_polls_until_success(
    routes: Routes, pc: PrismClient, autojump_clock: trio.abc.Clock,
) -> None:
    states = iter(["QUEUED", "RUNNING", "RUNNING", "SUCCEEDED"])
    routes.add("GET", "/tasks/t1", lambda r, b: httpx.Response(
        200, json={"uuid": "t1", "status": next(states), "percentage_complete": 50}))
    task = await pc.wait_task("t1")
    assert task.status == "SUCCEEDED"
    assert len(routes.calls) == 4


async def test_a_failed_task_carries_prism_error_detail(routes: Routes, pc: PrismClient) -> None:
    routes.add("GET", "/tasks/t2", lambda r, b: httpx.Response(200, json={
        "uuid": "t2", "status": "FAILED", "operation_type": "VmCreate",
        "error_code": "ENOSPC", "error_detail": "container ctr1 is full",
    }))
    with pytest.raises(PrismTaskError, match=r"VmCreate task t2 FAILED \[ENOSPC\]: container ctr1"):
        await pc.wait_task("t2")


async def test_a_task_that_never_ends_times_out(
    routes: Routes, pc: PrismClient, autojump_clock: trio.abc.Clock,
) -> None:
    routes.add("GET", "/tasks/t3", lambda r, b: httpx.Response(
        200, json={"uuid": "t3", "status": "RUNNING", "percentage_complete": 40}))
    with pytest.raises(PrismTimeoutError, match=r"within 30 s \(last seen RUNNING, 40%\)"):
        await pc.wait_task("t3", timeout=30)


async def test_pe_snapshot_create_wait_and_disk_paths(
    routes: Routes, pc: PrismClient, autojump_clock: trio.abc.Clock,
) -> None:
    polls = iter(["PENDING", "RUNNING", "COMPLETE"])

    def get(request: httpx.Request, body: Any) -> httpx.Response:
        state = next(polls)
        files = [{"file_path": "/ctr/.acropolis/vmdisk/d1",
                  "snapshot_file_path": "/ctr/.snapshot/01/1-2-3/.acropolis/vmdisk/d1"}]
        return httpx.Response(200, json={
            "metadata": {"uuid": "s1"},
            "status": {"state": state, "resources": {"entity_uuid": "vm-1"},
                       "snapshot_file_list": files if state == "COMPLETE" else []},
        })

    routes.add("POST", "/vm_snapshots", lambda r, b: httpx.Response(
        202, json={"metadata": {"uuid": b["metadata"]["uuid"]}}))
    routes.add("GET", "/vm_snapshots/s1", get)
    created = await pc.create_vm_snapshot("vm-1", name="bk", uuid="s1",
                                          snapshot_type="APPLICATION_CONSISTENT")
    snap = await pc.wait_vm_snapshot(created.uuid)
    assert snap.file_for_disk("d1") is not None
    sent = routes.calls[0][2]
    assert sent["spec"]["snapshot_type"] == "APPLICATION_CONSISTENT"
    assert sent["spec"]["resources"]["entity_uuid"] == "vm-1"


async def test_a_snapshot_in_error_says_why(routes: Routes, pc: PrismClient) -> None:
    routes.add("GET", "/vm_snapshots/s2", lambda r, b: httpx.Response(200, json={
        "metadata": {"uuid": "s2"},
        "status": {"state": "ERROR", "resources": {"entity_uuid": "vm-1"},
                   "message_list": [{"message": "VSS quiesce timed out", "reason": "X"}]},
    }))
    with pytest.raises(PrismTaskError, match="snapshot s2 of VM vm-1 failed: VSS quiesce"):
        await pc.wait_vm_snapshot("s2")


def test_snapshot_type_is_checked() -> None:
    with pytest.raises(ConfigError, match="CRASH_CONSISTENT"):
        snapshot_body("vm", name="x", snapshot_type="crash")


async def test_changed_regions_follow_next_offset(routes: Routes, pc: PrismClient) -> None:
    size = 10 << 20

    def page(request: httpx.Request, body: Any) -> httpx.Response:
        start = body["start_offset"]
        nxt = start + (4 << 20)
        return httpx.Response(200, json={
            "region_list": [{"offset": start, "length": 1 << 20, "type": "REGULAR"},
                            {"offset": start + (1 << 20), "length": 1 << 20, "type": "ZEROED"}],
            "file_size": size, "next_offset": nxt if nxt < size else 0,
        })

    routes.add("POST", "/data/changed_regions", page)
    regions = [r async for r in pc.changed_regions("/ctr/.snapshot/new", reference="/ctr/old")]
    assert [r.offset for r in regions] == [0, 1 << 20, 4 << 20, 5 << 20, 8 << 20, 9 << 20]
    assert [r.zeroed for r in regions] == [False, True] * 3
    starts = [b["start_offset"] for _, _, b in routes.calls]
    assert starts == [0, 4 << 20, 8 << 20]
    assert all(b["reference_snapshot_file_path"] == "/ctr/old" for _, _, b in routes.calls)


async def test_a_next_offset_going_backwards_ends_the_walk(
    routes: Routes, pc: PrismClient,
) -> None:
    routes.add("POST", "/data/changed_regions", lambda r, b: httpx.Response(
        200, json={"region_list": [], "file_size": 100, "next_offset": 5}))
    assert [r async for r in pc.changed_regions("/p", start=50)] == []
    assert len(routes.calls) == 1


IMAGE = bytes(range(256)) * 64


def ranged(request: httpx.Request, body: Any) -> httpx.Response:
    header = request.headers.get("range")
    if header is None:
        return httpx.Response(200, content=IMAGE)
    first, _, last = header.removeprefix("bytes=").partition("-")
    lo, hi = int(first), min(len(IMAGE) - 1, int(last) if last else len(IMAGE) - 1)

    async def chunks() -> AsyncIterator[bytes]:
        for pos in range(lo, hi + 1, 1000):
            yield IMAGE[pos : min(hi + 1, pos + 1000)]

    return httpx.Response(206, content=chunks(),
                          headers={"content-range": f"bytes {lo}-{hi}/{len(IMAGE)}"})


async def test_read_image_range_fills_the_callers_buffer(routes: Routes, pc: PrismClient) -> None:
    routes.add("GET", "/images/i1/file", ranged)
    buf = bytearray(5000)
    n = await pc.read_image_range("i1", 3000, memoryview(buf))
    assert n == 5000
    assert bytes(buf) == IMAGE[3000:8000]
    tail = bytearray(4096)
    assert await pc.read_image_range("i1", len(IMAGE) - 100, memoryview(tail)) == 100
    assert bytes(tail[:100]) == IMAGE[-100:]


async def test_a_server_ignoring_range_is_caught(routes: Routes, pc: PrismClient) -> None:
    routes.add("GET", "/images/i1/file", lambda r, b: httpx.Response(200, content=IMAGE))
    with pytest.raises(ApiServerError, match="ignored the Range header"):
        await pc.read_image_range("i1", 10, memoryview(bytearray(10)))
    buf = bytearray(10)
    assert await pc.read_image_range("i1", 0, memoryview(buf)) == 10
    assert bytes(buf) == IMAGE[:10]


async def test_open_image_streams_everything(routes: Routes, pc: PrismClient) -> None:
    routes.add("GET", "/images/i1/file", ranged)
    async with pc.open_image("i1") as chunks:
        data = b"".join([c async for c in chunks])
    assert data == IMAGE


async def test_upload_streams_the_body(routes: Routes, pc: PrismClient) -> None:
    got: list[bytes] = []

    def put(request: httpx.Request, body: Any) -> httpx.Response:
        got.append(request.content)
        assert request.headers["content-type"] == "application/octet-stream"
        return httpx.Response(200)

    routes.add("PUT", "/images/i2/file", put)

    async def parts() -> AsyncIterator[bytes]:
        for i in range(10):
            yield bytes([i]) * 1000

    await pc.upload_image("i2", parts(), size=10_000)
    assert got == [b"".join(bytes([i]) * 1000 for i in range(10))]


async def test_power_on_updates_the_spec_with_its_version(
    routes: Routes, pc: PrismClient,
) -> None:
    routes.add("GET", "/vms/vm-1", lambda r, b: httpx.Response(200, json=vm_entity(1)))
    routes.add("PUT", "/vms/vm-1", lambda r, b: httpx.Response(
        202, json={"status": {"execution_context": {"task_uuid": "t7"}}}))
    assert await pc.set_power("vm-1", on=True) == "t7"
    put = routes.calls[-1][2]
    assert put["spec"]["resources"]["power_state"] == "ON"
    assert put["metadata"]["spec_version"] == 3
    assert "status" not in put
    assert await pc.set_power("vm-1", on=False) is None
