"""Fault injection and the simulator control API, as a client under test would meet them."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio
from tests.hypervisors.conftest import ADMIN, V3

from ahvbackup.hypervisors.ahv.simulator import Simulator, serve_simulator

MiB = 1 << 20


async def test_429_with_retry_after_then_the_call_succeeds(
    sim: Simulator, pc: httpx.AsyncClient
) -> None:
    rule = sim.faults.add(method="POST", path=r"/vms/list$", status=429, retry_after=2)
    r = await pc.post(f"{V3}/vms/list", json={})
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2"
    assert r.json()["code"] == 429
    r = await pc.post(f"{V3}/vms/list", json={})
    assert r.status_code == 200
    assert rule.hits == 1
    assert sim.faults.rules == []


async def test_server_errors_for_a_count_and_only_on_the_matching_method(
    sim: Simulator, pc: httpx.AsyncClient
) -> None:
    db = sim.find_vm("db-01")
    sim.faults.add(method="GET", path=r"/vms/", status=503, count=2)
    assert (await pc.post(f"{V3}/vms/list", json={})).status_code == 200
    statuses = [(await pc.get(f"{V3}/vms/{db.uuid}")).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    sim.faults.add(path=r"/clusters/list", status=500, body="upstream exploded", count=None)
    for _ in range(2):
        r = await pc.post(f"{V3}/clusters/list", json={})
        assert (r.status_code, r.text) == (500, "upstream exploded")
    sim.faults.clear()
    assert (await pc.post(f"{V3}/clusters/list", json={})).status_code == 200


async def test_latency_delays_the_answer(sim: Simulator, pc: httpx.AsyncClient) -> None:
    sim.faults.add(path=r"/users/me", latency=0.3)
    t0 = trio.current_time()
    assert (await pc.get(f"{V3}/users/me")).status_code == 200
    assert trio.current_time() - t0 >= 0.3
    t0 = trio.current_time()
    await pc.get(f"{V3}/users/me")
    assert trio.current_time() - t0 < 0.3


async def test_failing_snapshot_task_leaves_an_error_entity_and_no_snapshot(
    sim: Simulator, pe: httpx.AsyncClient
) -> None:
    web = sim.find_vm("web-01")
    sim.faults.add(method="POST", path=r"/vm_snapshots$", task_fail=True)
    r = await pe.post(f"{V3}/vm_snapshots", json={
        "spec": {"name": "doomed", "resources": {"entity_uuid": web.uuid}}})
    assert r.status_code == 202
    assert r.json()["status"]["state"] == "PENDING"
    uuid = r.json()["metadata"]["uuid"]
    task_uuid = r.json()["status"]["execution_context"]["task_uuid"][0]
    await trio.sleep(sim.task_seconds * 1.5)
    task = (await pe.get(f"{V3}/tasks/{task_uuid}")).json()
    assert task["status"] == "FAILED"
    assert "injected" in task["error_detail"]
    snap = (await pe.get(f"{V3}/vm_snapshots/{uuid}")).json()
    assert snap["status"]["state"] == "ERROR"
    assert snap["status"]["snapshot_file_list"] == []
    assert all(sim.store.snapshots(d.uuid) == [] for d in web.data_disks)
    assert (await pe.delete(f"{V3}/vm_snapshots/{uuid}")).status_code == 202


async def test_a_failing_vm_delete_keeps_the_vm(sim: Simulator, pc: httpx.AsyncClient) -> None:
    app = sim.find_vm("app-01")
    sim.faults.add(method="DELETE", path=r"/vms/", task_fail=True)
    r = await pc.delete(f"{V3}/vms/{app.uuid}")
    task_uuid = r.json()["status"]["execution_context"]["task_uuid"][0]
    await trio.sleep(sim.task_seconds * 1.5)
    assert (await pc.get(f"{V3}/tasks/{task_uuid}")).json()["status"] == "FAILED"
    assert (await pc.get(f"{V3}/vms/{app.uuid}")).status_code == 200


async def test_connection_drop_mid_download_on_a_served_listener(tmp_path: Path) -> None:
    sim = Simulator(tmp_path / "s", task_seconds=0.01, sync=False)
    tiny = sim.find_vm("tiny-01")
    try:
        async with serve_simulator(sim, tls=False) as ep, httpx.AsyncClient(
            base_url=ep.pc_url, auth=ADMIN, timeout=10
        ) as pc:
            r = await pc.post(f"{V3}/images", json={"spec": {"name": "d", "resources": {
                "data_source_reference": {"kind": "vm_disk",
                                          "uuid": tiny.data_disks[0].uuid}}}})
            uuid = r.json()["metadata"]["uuid"]
            await trio.sleep(0.05)
            sim.faults.add(method="GET", path=r"/file$", drop=True, drop_after_bytes=MiB)
            with pytest.raises(httpx.RemoteProtocolError):
                await pc.get(f"{V3}/images/{uuid}/file")
            r = await pc.get(f"{V3}/images/{uuid}/file")
            assert len(r.content) == 16 * MiB
            assert r.content[:MiB] == sim.read_disk(tiny.uuid, 0, 0, MiB)
            sim.faults.add(path=r"/vms/list$", drop=True)
            with pytest.raises(httpx.RemoteProtocolError):
                await pc.post(f"{V3}/vms/list", json={})
            assert (await pc.post(f"{V3}/vms/list", json={})).status_code == 200
    finally:
        sim.close()


async def test_control_api_workload_faults_and_stats(sim: Simulator, pc: httpx.AsyncClient,
                                                     pe: httpx.AsyncClient) -> None:
    db = sim.find_vm("db-01")
    base = f"/api/simulator/v1/vms/{db.uuid}/disks/1"
    r = await pc.put(f"{base}/data", params={"offset": 5 << 30}, content=b"written over http")
    assert r.json() == {"bytes_written": 17}
    assert sim.read_disk(db.uuid, 1, 5 << 30, 17) == b"written over http"
    r = await pc.get(f"{base}/data", params={"offset": 5 << 30, "length": 7})
    assert r.content == b"written"
    assert (await pc.post(f"{base}/zero", json={"offset": 5 << 30, "length": 65536})).is_success
    assert sim.read_disk(db.uuid, 1, 5 << 30, 17) == bytes(17)
    assert (await pc.post(f"{base}/trim", json={"offset": 0, "length": 65536})).is_success
    r = await pc.put(f"{base}/data", params={"offset": (8 << 30) - 2}, content=b"past the end")
    assert r.status_code == 422
    assert "outside the disk" in r.json()["message_list"][0]["message"]
    assert (await pc.put(f"/api/simulator/v1/vms/{db.uuid}/disks/9/data",
                         params={"offset": 0}, content=b"x")).status_code == 422

    r = await pc.post("/api/simulator/v1/faults", json={"method": "POST", "path": "/vms/list",
                                                        "status": 429, "retry_after": 1})
    assert r.status_code == 201
    assert (await pe.post(f"{V3}/vms/list", json={})).status_code == 429
    r = await pc.post("/api/simulator/v1/faults", json={"colour": "red"})
    assert r.status_code == 400
    assert "colour" in r.text
    r = await pc.post("/api/simulator/v1/faults", json={"path": "/x", "status": 200})
    assert r.status_code == 400
    r = await pc.post("/api/simulator/v1/faults", json={"path": ".*", "status": 500,
                                                        "count": None})
    assert (await pc.get("/api/simulator/v1/faults")).json()[0]["status"] == 500
    assert (await pc.delete("/api/simulator/v1/faults")).is_success  # control is never faulted
    assert (await pc.get(f"{V3}/users/me")).status_code == 200

    stats = (await pc.get("/api/simulator/v1/stats")).json()
    assert stats["requests"]["pe1 POST /api/nutanix/v3/vms/list"] == 1
    assert stats["requests"]["pc GET /api/nutanix/v3/users/me"] == 1
    assert sim.stats.by_route()["POST /api/nutanix/v3/vms/list"] == 1
