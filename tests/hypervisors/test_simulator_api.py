"""The simulator's v3 behaviour as a client meets it: auth, RBAC, lists, VMs, snapshots, images."""

from __future__ import annotations

import hashlib
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
import trio
from tests.hypervisors.conftest import ADMIN, BACKUP, V3, VIEWER, client

from ahvbackup.hypervisors.ahv.simulator import (
    PC_COOKIE,
    PE_COOKIE,
    Simulator,
    pc_app,
    pe_app,
    seed_pattern,
    serve_simulator,
)

MiB = 1 << 20


async def _settle(sim: Simulator) -> None:
    await trio.sleep(sim.task_seconds * 1.5)


async def _snapshot(pe: httpx.AsyncClient, sim: Simulator, vm_name: str,
                    **spec: Any) -> dict[str, Any]:
    vm = sim.find_vm(vm_name)
    r = await pe.post(f"{V3}/vm_snapshots", json={
        "spec": {"name": f"s-{vm_name}", "resources": {"entity_uuid": vm.uuid}, **spec}})
    assert r.status_code == 202, r.text
    await _settle(sim)
    r = await pe.get(f"{V3}/vm_snapshots/{r.json()['metadata']['uuid']}")
    assert r.json()["status"]["state"] == "COMPLETE"
    return r.json()  # type: ignore[no-any-return]


# ---- auth -------------------------------------------------------------------------------------

async def test_requests_without_or_with_bad_credentials_get_401(sim: Simulator) -> None:
    async with client(pc_app(sim), "http://127.0.0.1:9440", auth=None) as anon:
        r = await anon.post(f"{V3}/vms/list", json={})
        assert r.status_code == 401
        assert "set-cookie" not in r.headers
        assert r.headers["www-authenticate"].startswith("Basic")
    async with client(pc_app(sim), "http://127.0.0.1:9440", auth=("admin", "wrong")) as bad:
        assert (await bad.post(f"{V3}/vms/list", json={})).status_code == 401
    async with client(pc_app(sim), "http://127.0.0.1:9440", auth=("nobody", "x")) as bad:
        assert (await bad.get(f"{V3}/users/me")).status_code == 401


async def test_session_cookie_replaces_basic_auth_and_is_per_listener(sim: Simulator) -> None:
    async with client(pc_app(sim), "http://127.0.0.1:9440") as pc:
        r = await pc.get(f"{V3}/users/me")
        assert r.json()["status"]["name"] == "admin"
        token = r.cookies[PC_COOKIE]
    headers = {"Cookie": f"{PC_COOKIE}={token}"}
    async with client(pc_app(sim), "http://127.0.0.1:9440", auth=None) as cookie_only:
        r = await cookie_only.post(f"{V3}/vms/list", json={}, headers=headers)
        assert r.status_code == 200
        assert r.json()["metadata"]["total_matches"] == 4
    async with client(pe_app(sim), "http://127.0.0.2:9440", auth=None) as pe:
        r = await pe.post(f"{V3}/vms/list", json={}, headers={"Cookie": f"{PE_COOKIE}={token}"})
        assert r.status_code == 401  # a PC session is not a PE session
    sim.sessions.expire_all()
    async with client(pc_app(sim), "http://127.0.0.1:9440", auth=None) as cookie_only:
        r = await cookie_only.post(f"{V3}/vms/list", json={}, headers=headers)
        assert r.status_code == 401


async def test_roles_viewer_reads_only_backup_may_not_touch_vms(sim: Simulator) -> None:
    db = sim.find_vm("db-01")
    async with client(pc_app(sim), "http://127.0.0.1:9440", auth=VIEWER) as viewer:
        assert (await viewer.post(f"{V3}/vms/list", json={})).status_code == 200
        r = await viewer.post(f"{V3}/images", json={"spec": {"name": "x"}})
        assert r.status_code == 403
        assert r.json()["message_list"][0]["reason"] == "ACCESS_DENIED"
        assert "viewer" in r.json()["message_list"][0]["message"]
        assert (await viewer.delete(f"{V3}/vms/{db.uuid}")).status_code == 403
    async with client(pe_app(sim), "http://127.0.0.2:9440", auth=VIEWER) as viewer_pe:
        r = await viewer_pe.post(f"{V3}/vm_snapshots", json={
            "spec": {"name": "x", "resources": {"entity_uuid": db.uuid}}})
        assert r.status_code == 403
    async with client(pc_app(sim), "http://127.0.0.1:9440", auth=BACKUP) as backup:
        assert (await backup.delete(f"{V3}/vms/{db.uuid}")).status_code == 403
        r = await backup.post(f"{V3}/images", json={"spec": {"name": "upload-target"}})
        assert r.status_code == 202
        r = await backup.get("/api/simulator/v1/stats")
        assert r.status_code == 403
    async with client(pe_app(sim), "http://127.0.0.2:9440", auth=BACKUP) as backup_pe:
        r = await backup_pe.post(f"{V3}/vm_snapshots", json={
            "spec": {"name": "x", "resources": {"entity_uuid": db.uuid}}})
        assert r.status_code == 202
    assert db.uuid in sim.vms


async def test_pe_only_routes_answer_404_on_prism_central(
    sim: Simulator, pc: httpx.AsyncClient, pe: httpx.AsyncClient
) -> None:
    body = {"spec": {"name": "x", "resources": {"entity_uuid": sim.find_vm("web-01").uuid}}}
    assert (await pc.post(f"{V3}/vm_snapshots", json=body)).status_code == 404
    assert (await pc.post(f"{V3}/vm_snapshots/list", json={})).status_code == 404
    assert (await pc.post(f"{V3}/data/changed_regions", json={})).status_code == 404
    assert (await pe.post(f"{V3}/vm_snapshots/list", json={})).status_code == 200
    assert (await pe.post(f"{V3}/data/changed_regions", content=b"")).status_code == 422
    # and PC-only ones 404 on PE
    assert (await pe.post(f"{V3}/images/list", json={})).status_code == 404


# ---- lists and inventory ----------------------------------------------------------------------

async def test_vm_list_pagination_filter_and_sort(pc: httpx.AsyncClient) -> None:
    names: list[str] = []
    for offset in (0, 3):
        r = await pc.post(f"{V3}/vms/list", json={"offset": offset, "length": 3,
                                                  "sort_attribute": "vm_name"})
        md = r.json()["metadata"]
        assert md["total_matches"] == 4
        names += [e["status"]["name"] for e in r.json()["entities"]]
    assert names == ["app-01", "db-01", "tiny-01", "web-01"]
    r = await pc.post(f"{V3}/vms/list", json={"filter": "vm_name==tiny-01"})
    assert [e["status"]["name"] for e in r.json()["entities"]] == ["tiny-01"]
    assert r.json()["metadata"]["total_matches"] == 1
    r = await pc.post(f"{V3}/vms/list", json={"filter": "vm_name==.*-01;power_state==OFF"})
    assert [e["status"]["name"] for e in r.json()["entities"]] == ["tiny-01"]
    r = await pc.post(f"{V3}/vms/list", json={"filter": "colour==red"})
    assert r.status_code == 400
    assert "colour" in r.json()["message_list"][0]["message"]


async def test_clusters_report_pe_address_dsip_and_containers(
    sim: Simulator, pc: httpx.AsyncClient, pe: httpx.AsyncClient
) -> None:
    r = await pc.post(f"{V3}/clusters/list", json={})
    by_service = {e["status"]["resources"]["config"]["service_list"][0]: e
                  for e in r.json()["entities"]}
    assert set(by_service) == {"AOS", "PRISM_CENTRAL"}
    net = by_service["AOS"]["status"]["resources"]["network"]
    assert net["external_ip"] == "127.0.0.2"
    assert net["external_data_services_ip"] == "127.0.0.102"
    containers = by_service["AOS"]["status"]["resources"]["storage_container_list"]
    assert {c["name"] for c in containers} == {"default-container", "SelfServiceContainer"}
    r = await pe.post(f"{V3}/clusters/list", json={})
    assert [e["status"]["name"] for e in r.json()["entities"]] == ["sim-cluster-1"]
    r = await pe.get("/api/nutanix/v2.0/storage_containers")
    assert r.json()["metadata"]["count"] == 2
    r = await pc.post(f"{V3}/subnets/list", json={})
    assert r.json()["metadata"]["total_matches"] == 2


async def test_vm_shapes_disks_nics_and_ngt(sim: Simulator, pc: httpx.AsyncClient) -> None:
    r = await pc.post(f"{V3}/vms/list", json={"length": 10})
    vms = {e["status"]["name"]: e for e in r.json()["entities"]}
    web = vms["web-01"]["status"]["resources"]
    assert [d["device_properties"]["device_type"] for d in web["disk_list"]] == [
        "DISK", "DISK", "CDROM"]
    db_disks = vms["db-01"]["status"]["resources"]["disk_list"]
    assert [d["disk_size_bytes"] for d in db_disks] == [1 << 30, 8 << 30, 256 * MiB]
    ngt = web["guest_tools"]["nutanix_guest_tools"]
    assert ngt["state"] == "ENABLED"
    assert "VSS_SNAPSHOT" in ngt["enabled_capability_list"]
    app_ngt = vms["app-01"]["status"]["resources"]["guest_tools"]["nutanix_guest_tools"]
    assert app_ngt["ngt_state"] == "UNINSTALLED"
    assert web["nic_list"][0]["subnet_reference"]["name"] == "vlan0"


# ---- VM lifecycle -----------------------------------------------------------------------------

async def test_vm_create_update_power_and_delete(sim: Simulator, pc: httpx.AsyncClient) -> None:
    subnet = next(iter(sim.subnets))
    r = await pc.post(f"{V3}/vms", json={"metadata": {"kind": "vm"}, "spec": {
        "name": "new-vm", "resources": {
            "num_sockets": 2, "memory_size_mib": 2048,
            "disk_list": [{"disk_size_mib": 64}, {"disk_size_bytes": 4 * MiB}],
            "nic_list": [{"subnet_reference": {"kind": "subnet", "uuid": subnet}}]}}})
    assert r.status_code == 202, r.text
    assert r.json()["status"]["state"] == "PENDING"
    uuid = r.json()["metadata"]["uuid"]
    task = r.json()["status"]["execution_context"]["task_uuid"][0]
    await _settle(sim)
    t = (await pc.get(f"{V3}/tasks/{task}")).json()
    assert (t["status"], t["percentage_complete"]) == ("SUCCEEDED", 100)
    vm = (await pc.get(f"{V3}/vms/{uuid}")).json()
    assert vm["status"]["state"] == "COMPLETE"
    assert sim.read_disk(uuid, 1, 0, 16) == bytes(16)
    sim.write_disk(uuid, 1, 0, b"hello")
    vm.pop("status")
    vm["spec"]["resources"]["power_state"] = "ON"
    vm["spec"]["resources"]["disk_list"][0]["disk_size_mib"] = 128
    del vm["spec"]["resources"]["disk_list"][0]["disk_size_bytes"]
    vm["spec"]["resources"]["disk_list"].pop(1)
    r = await pc.put(f"{V3}/vms/{uuid}", json=vm)
    assert r.status_code == 202, r.text
    got = (await pc.get(f"{V3}/vms/{uuid}")).json()
    assert got["spec"]["resources"]["power_state"] == "ON"
    assert [d["disk_size_bytes"] for d in got["spec"]["resources"]["disk_list"]] == [128 * MiB]
    assert got["metadata"]["spec_version"] == 1
    r = await pc.put(f"{V3}/vms/{uuid}", json=vm)
    assert r.status_code == 409
    r = await pc.delete(f"{V3}/vms/{uuid}")
    assert r.status_code == 202
    assert (await pc.get(f"{V3}/vms/{uuid}")).status_code == 404


# ---- snapshots, changed regions, images -------------------------------------------------------

async def test_snapshot_lifecycle_with_state_progression(
    sim: Simulator, pe: httpx.AsyncClient
) -> None:
    db = sim.find_vm("db-01")
    sim.task_seconds = 0.3
    r = await pe.post(f"{V3}/vm_snapshots", json={
        "metadata": {"kind": "vm_snapshot"},
        "spec": {"name": "b1", "snapshot_type": "CRASH_CONSISTENT",
                 "resources": {"entity_uuid": db.uuid}}})
    assert r.status_code == 202
    uuid = r.json()["metadata"]["uuid"]
    assert r.json()["status"]["state"] == "PENDING"
    task_uuid = r.json()["status"]["execution_context"]["task_uuid"][0]
    seen = set()
    with trio.fail_after(5):
        while True:
            t = (await pe.get(f"{V3}/tasks/{task_uuid}")).json()
            seen.add(t["status"])
            if t["status"] == "SUCCEEDED":
                break
            await trio.sleep(0.02)
    assert {"QUEUED", "RUNNING", "SUCCEEDED"} <= seen
    snap = (await pe.get(f"{V3}/vm_snapshots/{uuid}")).json()
    files = snap["status"]["snapshot_file_list"]
    assert [f["file_path"].rsplit("/", 1)[1] for f in files] == [d.uuid for d in db.data_disks]
    for f in files:
        assert f["file_path"] == f"/default-container/.acropolis/vmdisk/{f['file_path'][-36:]}"
        assert f["snapshot_file_path"].startswith("/default-container/.snapshot/")
    listed = (await pe.post(f"{V3}/vm_snapshots/list",
                            json={"filter": f"entity_uuid=={db.uuid}"})).json()
    assert [e["metadata"]["uuid"] for e in listed["entities"]] == [uuid]
    r = await pe.delete(f"{V3}/vm_snapshots/{uuid}")
    assert r.status_code == 202
    assert (await pe.get(f"{V3}/vm_snapshots/{uuid}")).status_code == 404
    assert all(sim.store.snapshots(d.uuid) == [] for d in db.data_disks)


async def test_snapshot_freezes_disk_content_while_the_vm_keeps_writing(
    sim: Simulator, pe: httpx.AsyncClient
) -> None:
    web = sim.find_vm("web-01")
    before = sim.read_disk(web.uuid, 0, 0, MiB)
    assert before == seed_pattern("web-01", 0, 0, MiB)
    snap = await _snapshot(pe, sim, "web-01")
    sim.write_disk(web.uuid, 0, 4096, b"\xff" * 8192)
    sim.trim_disk(web.uuid, 0, 300 * MiB, 512 * 1024)
    vmdisk = web.data_disks[0].uuid
    assert sim.read_snapshot_disk(snap["metadata"]["uuid"], vmdisk, 0, MiB) == before
    assert sim.read_disk(web.uuid, 0, 4096, 8192) == b"\xff" * 8192
    assert sim.read_disk(web.uuid, 0, 300 * MiB, 16) == bytes(16)


async def test_app_consistent_snapshot_needs_ngt_with_vss(
    sim: Simulator, pe: httpx.AsyncClient
) -> None:
    await _snapshot(pe, sim, "web-01", snapshot_type="APPLICATION_CONSISTENT")
    for name, cause in (("app-01", "NGT_NOT_INSTALLED"), ("tiny-01", "VSS_SNAPSHOT_NOT_ENABLED")):
        r = await pe.post(f"{V3}/vm_snapshots", json={"spec": {
            "name": "x", "snapshot_type": "APPLICATION_CONSISTENT",
            "resources": {"entity_uuid": sim.find_vm(name).uuid}}})
        assert r.status_code == 422
        msg = r.json()["message_list"][0]
        assert msg["reason"] == "INVALID_REQUEST"
        assert msg["details"]["cause"] == cause
        assert name in msg["message"]


async def test_changed_regions_between_snapshots_and_pagination(
    sim: Simulator, pe: httpx.AsyncClient
) -> None:
    db = sim.find_vm("db-01")
    first = await _snapshot(pe, sim, "db-01")
    sim.write_disk(db.uuid, 1, 3 << 30, b"\x01" * 65536)
    sim.zero_disk(db.uuid, 1, 0, 65536)
    second = await _snapshot(pe, sim, "db-01")
    path = second["status"]["snapshot_file_list"][1]["snapshot_file_path"]
    ref = first["status"]["snapshot_file_list"][1]["snapshot_file_path"]
    r = await pe.post(f"{V3}/data/changed_regions", json={
        "snapshot_file_path": path, "reference_snapshot_file_path": ref})
    assert r.status_code == 200, r.text
    assert r.json()["region_list"] == [
        {"offset": 0, "length": 65536, "type": "ZEROED"},
        {"offset": 3 << 30, "length": 65536, "type": "REGULAR"},
    ]
    assert r.json()["file_size"] == 8 << 30
    assert "next_offset" not in r.json()
    sim.changed_regions_page_size = 2
    regions, start = [], 0
    while True:
        r = await pe.post(f"{V3}/data/changed_regions",
                          json={"snapshot_file_path": path, "start_offset": start})
        regions += r.json()["region_list"]
        if "next_offset" not in r.json():
            break
        start = r.json()["next_offset"]
    assert sum(x["length"] for x in regions) == 8 << 30
    # the seed wrote 1984 KiB; 64 KiB were zeroed and 64 KiB written elsewhere since
    assert sum(x["length"] for x in regions if x["type"] == "REGULAR") == 1984 * 1024
    assert len(regions) > 2
    r = await pe.post(f"{V3}/data/changed_regions",
                      json={"snapshot_file_path": "/default-container/.snapshot/99/nope"})
    assert r.status_code == 404
    assert "/default-container/.snapshot/99/nope" in r.json()["message_list"][0]["message"]


async def test_image_from_snapshot_downloads_byte_exact_with_ranges(
    sim: Simulator, pc: httpx.AsyncClient, pe: httpx.AsyncClient
) -> None:
    snap = await _snapshot(pe, sim, "tiny-01")
    tiny = sim.find_vm("tiny-01")
    sim.write_disk(tiny.uuid, 0, 0, b"\xee" * 4096)  # after the snapshot: not in the image
    path = snap["status"]["snapshot_file_list"][0]["snapshot_file_path"]
    r = await pc.post(f"{V3}/images", json={"spec": {"name": "t", "resources": {
        "image_type": "DISK_IMAGE", "source_uri": f"nfs://127.0.0.2{path}"}},
        "metadata": {"kind": "image"}})
    assert r.status_code == 202
    uuid = r.json()["metadata"]["uuid"]
    await _settle(sim)
    image = (await pc.get(f"{V3}/images/{uuid}")).json()
    size = image["status"]["resources"]["size_bytes"]
    assert size == 16 * MiB
    whole = await pc.get(f"{V3}/images/{uuid}/file")
    assert whole.status_code == 200
    expect = sim.read_snapshot_disk(snap["metadata"]["uuid"], tiny.data_disks[0].uuid, 0, size)
    assert whole.content == expect
    assert expect[:1 * MiB] == seed_pattern("tiny-01", 0, 0, MiB)
    first, last = 8 * MiB + 1000, 8 * MiB + 200_000
    part = await pc.get(f"{V3}/images/{uuid}/file", headers={"Range": f"bytes={first}-{last}"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes {first}-{last}/{size}"
    assert part.content == expect[first:last + 1]
    tail = await pc.get(f"{V3}/images/{uuid}/file", headers={"Range": "bytes=-10"})
    assert tail.content == expect[-10:]
    bad = await pc.get(f"{V3}/images/{uuid}/file", headers={"Range": f"bytes={size}-"})
    assert bad.status_code == 416
    assert bad.headers["content-range"] == f"bytes */{size}"
    assert sim.stats.peak_concurrent_image_reads >= 1
    assert (await pc.delete(f"{V3}/images/{uuid}")).status_code == 202
    assert (await pc.get(f"{V3}/images/{uuid}/file")).status_code == 404


async def test_image_upload_then_vm_from_image(sim: Simulator, pc: httpx.AsyncClient) -> None:
    r = await pc.post(f"{V3}/images", json={"spec": {"name": "up", "resources": {
        "image_type": "DISK_IMAGE"}}})
    uuid = r.json()["metadata"]["uuid"]
    data = bytes(range(256)) * 4096 * 5 + b"tail"  # ~5 MiB, not block aligned
    r = await pc.put(f"{V3}/images/{uuid}/file", content=data, headers={
        "Content-Type": "application/octet-stream",
        "X-Nutanix-Checksum-Type": "SHA_256",
        "X-Nutanix-Checksum-Bytes": hashlib.sha256(data).hexdigest()})
    assert r.status_code == 200, r.text
    await _settle(sim)
    assert (await pc.get(f"{V3}/images/{uuid}")).json()["status"]["resources"][
        "size_bytes"] == len(data)
    assert (await pc.get(f"{V3}/images/{uuid}/file")).content == data
    r = await pc.post(f"{V3}/images", json={"spec": {"name": "bad-sum"}})
    bad = r.json()["metadata"]["uuid"]
    r = await pc.put(f"{V3}/images/{bad}/file", content=b"abc", headers={
        "X-Nutanix-Checksum-Type": "SHA_1", "X-Nutanix-Checksum-Bytes": "00" * 20})
    assert r.status_code == 400
    assert "SHA_1" in r.json()["message_list"][0]["message"]
    r = await pc.post(f"{V3}/vms", json={"spec": {"name": "from-image", "resources": {
        "disk_list": [{"data_source_reference": {"kind": "image", "uuid": uuid},
                       "disk_size_bytes": 8 * MiB}]}}})
    assert r.status_code == 202, r.text
    vm_uuid = r.json()["metadata"]["uuid"]
    assert sim.read_disk(vm_uuid, 0, 0, len(data)) == data
    assert sim.read_disk(vm_uuid, 0, len(data), 100) == bytes(100)


async def test_image_source_must_be_a_known_snapshot_file(
    sim: Simulator, pc: httpx.AsyncClient
) -> None:
    r = await pc.post(f"{V3}/images", json={"spec": {"name": "x", "resources": {
        "source_uri": "nfs://127.0.0.2/default-container/.snapshot/00/1-2-3/.acropolis/x"}}})
    assert r.status_code == 422
    assert ".snapshot/00/1-2-3" in r.json()["message_list"][0]["message"]
    live = sim.find_vm("app-01").data_disks[0].uuid
    r = await pc.post(f"{V3}/images", json={"spec": {"name": "live", "resources": {
        "data_source_reference": {"kind": "vm_disk", "uuid": live}}}})
    assert r.status_code == 202
    assert r.json()["status"]["state"] == "PENDING"


async def test_idempotent_create_with_reserved_uuid(sim: Simulator, pc: httpx.AsyncClient,
                                                    pe: httpx.AsyncClient) -> None:
    r = await pc.post(f"{V3}/idempotence_identifiers",
                      json={"client_identifier": "ahvbackup", "count": 1})
    reserved = r.json()["uuid_list"][0]
    body = {"metadata": {"kind": "vm_snapshot", "uuid": reserved},
            "spec": {"name": "idem", "resources": {"entity_uuid": sim.find_vm("db-01").uuid}}}
    a = await pe.post(f"{V3}/vm_snapshots", json=body)
    b = await pe.post(f"{V3}/vm_snapshots", json=body)
    assert a.json()["metadata"]["uuid"] == b.json()["metadata"]["uuid"] == reserved
    assert len(sim.snapshots) == 1
    assert len(sim.store.snapshots(sim.find_vm("db-01").data_disks[0].uuid)) == 1


@pytest.mark.parametrize("path", [f"{V3}/vms/not-a-uuid", f"{V3}/tasks/xyz"])
async def test_malformed_uuid_is_a_400(pc: httpx.AsyncClient, path: str) -> None:
    r = await pc.get(path)
    assert r.status_code == 400
    assert r.json()["state"] == "ERROR"


async def test_a_deleted_vm_keeps_its_snapshots_until_they_are_deleted(
    sim: Simulator, pc: httpx.AsyncClient, pe: httpx.AsyncClient
) -> None:
    app = sim.find_vm("app-01")
    vmdisk = app.data_disks[0].uuid
    snap = await _snapshot(pe, sim, "app-01")
    assert (await pc.delete(f"{V3}/vms/{app.uuid}")).status_code == 202
    assert (await pe.get(f"{V3}/vm_snapshots/{snap['metadata']['uuid']}")).status_code == 200
    assert sim.read_snapshot_disk(snap["metadata"]["uuid"], vmdisk, 0, MiB)[:768 * 1024] == (
        seed_pattern("app-01", 0, 0, 768 * 1024))
    path = snap["status"]["snapshot_file_list"][0]["snapshot_file_path"]
    r = await pc.post(f"{V3}/images", json={"spec": {"name": "orphan", "resources": {
        "source_uri": f"nfs://127.0.0.2{path}"}}})
    assert r.status_code == 202
    assert (await pe.delete(f"{V3}/vm_snapshots/{snap['metadata']['uuid']}")).status_code == 202
    assert vmdisk not in sim.store.disks()
    await _settle(sim)
    image = r.json()["metadata"]["uuid"]
    got = await pc.get(f"{V3}/images/{image}/file", headers={"Range": "bytes=0-1023"})
    assert got.content == seed_pattern("app-01", 0, 0, 1024)


async def test_chunked_upload_without_length(sim: Simulator, pc: httpx.AsyncClient) -> None:
    r = await pc.post(f"{V3}/images", json={"spec": {"name": "chunked"}})
    uuid = r.json()["metadata"]["uuid"]
    parts = [bytes([i]) * (3 * MiB + 17) for i in range(1, 4)]

    async def body() -> Any:
        for p in parts:
            yield p

    r = await pc.put(f"{V3}/images/{uuid}/file", content=body())
    assert r.status_code == 200
    await _settle(sim)
    assert (await pc.get(f"{V3}/images/{uuid}/file")).content == b"".join(parts)
    r = await pc.put(f"{V3}/images/{uuid}/file", content=b"again")
    assert r.status_code == 409


async def test_stats_count_concurrent_snapshot_creations_and_image_reads(
    sim: Simulator, pc: httpx.AsyncClient, pe: httpx.AsyncClient
) -> None:
    sim.task_seconds = 1.0
    names = ["web-01", "db-01", "app-01", "tiny-01"]

    async def snap(name: str) -> None:
        r = await pe.post(f"{V3}/vm_snapshots", json={
            "spec": {"name": name, "resources": {"entity_uuid": sim.find_vm(name).uuid}}})
        assert r.status_code == 202

    async with trio.open_nursery() as n:
        for name in names:
            n.start_soon(snap, name)
    assert sim.stats.peak_concurrent_snapshot_creations == 4
    sim.stats.reset()
    await snap("web-01")  # the four are still running: five at once now
    assert sim.stats.peak_concurrent_snapshot_creations == 5

    sim.task_seconds = 0.01
    r = await pc.post(f"{V3}/images", json={"spec": {"name": "c", "resources": {
        "data_source_reference": {"kind": "vm_disk",
                                  "uuid": sim.find_vm("db-01").data_disks[1].uuid}}}})
    uuid = r.json()["metadata"]["uuid"]
    await trio.sleep(0.05)
    async with serve_simulator(sim, tls=False) as ep, httpx.AsyncClient(
        base_url=ep.pc_url, auth=ADMIN, timeout=30
    ) as served, AsyncExitStack() as stack:
        readers = []
        for _ in range(3):  # three downloads of the 8 GiB image, each read only a little
            resp = await stack.enter_async_context(served.stream(
                "GET", f"{V3}/images/{uuid}/file"))
            assert resp.status_code == 200
            readers.append(resp.aiter_raw())
            await readers[-1].__anext__()
        assert sim.stats.active_image_reads == 3
    assert sim.stats.peak_concurrent_image_reads == 3
    with trio.fail_after(5):
        while sim.stats.active_image_reads:
            await trio.sleep(0.01)
