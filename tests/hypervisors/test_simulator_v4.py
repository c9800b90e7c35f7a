"""The simulator's v4 conventions in-process: discovery, envelopes, errors, paging, ETag/If-Match,
NTNX-Request-Id replay, the PE JWT, faults, RBAC, persistence and the v4 switch.

The shapes themselves are judged by the official SDKs in test_simulator_v4_sdk.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from tests.conftest import specs_dir
from tests.hypervisors.conftest import BACKUP, VIEWER, client

from ahvbackup.hypervisors.ahv.simulator import Simulator, pc_app, pe_app
from ahvbackup.hypervisors.ahv.simulator.diskstore import Region
from ahvbackup.hypervisors.ahv.simulator.v4.dataprotection import _aligned

VMS = "/api/vmm/v4.3/ahv/config/vms"
RPS = "/api/dataprotection/v4.4/config/recovery-points"
TASKS = "/api/prism/v4.4/config/tasks"
VGS = "/api/volumes/v4.3/config/volume-groups"


def _error(r: httpx.Response, ns: str) -> dict[str, Any]:
    body = r.json()
    assert body["data"]["$objectType"] == f"{ns}.v4.error.ErrorResponse"
    [msg] = body["data"]["error"]
    assert msg["$objectType"] == f"{ns}.v4.error.AppMessage" and msg["severity"] == "ERROR"
    return msg  # type: ignore[no-any-return]


async def _task(pc: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    ext_id = body["data"]["extId"]
    assert ext_id.startswith("ZXJnb24=:")
    for _ in range(200):
        task = (await pc.get(f"{TASKS}/{ext_id}")).json()["data"]
        if task["status"] in ("SUCCEEDED", "FAILED"):
            return task  # type: ignore[no-any-return]
        await trio.sleep(0.01)
    raise AssertionError("task never finished")


async def _rp(pc: httpx.AsyncClient, sim: Simulator, vm: str = "db-01") -> dict[str, Any]:
    r = await pc.post(RPS, json={"name": "t", "vmRecoveryPoints": [
        {"vmExtId": sim.find_vm(vm).uuid}]})
    assert r.status_code == 202, r.text
    task = await _task(pc, r.json())
    assert task["status"] == "SUCCEEDED", task
    rp_id = task["entitiesAffected"][0]["extId"]
    return (await pc.get(f"{RPS}/{rp_id}")).json()["data"]  # type: ignore[no-any-return]


async def test_version_discovery_matches_the_recorded_shape(pc: httpx.AsyncClient,
                                                            pe: httpx.AsyncClient) -> None:
    recorded = json.loads((specs_dir() / "recorded" /
                           "pc2024.3_actuator_versionroutes.json").read_text())
    real = recorded[0]["response_body"]
    ours = (await pc.get("/api/actuator/versionroutes")).json()
    for doc in (real, ours):
        assert isinstance(doc, list)
        for item in doc:
            assert set(item) == {"namespace", "versionRoutes"}
            for vr in item["versionRoutes"]:
                assert set(vr) == {"version", "routes"}
                assert all(r.startswith(f"/{item['namespace']}/{vr['version']}/")
                           for r in vr["routes"])
    namespaces = {i["namespace"]: i for i in ours}
    assert set(namespaces) == {"vmm", "clustermgmt", "dataprotection", "volumes", "prism"}
    assert {"/vmm/v4.0/ahv"} <= {r for vr in namespaces["vmm"]["versionRoutes"]
                                 for r in vr["routes"]}
    info = await pc.request("OPTIONS", "/api/dataprotection/unversioned/info")
    assert info.json() == {"data": "v4.4"}
    assert (await pc.request("OPTIONS", "/api/vmm/unversioned/info")).json() == {"data": "v4.3"}
    pe_ns = {i["namespace"] for i in (await pe.get("/api/actuator/versionroutes")).json()}
    assert "vmm" not in pe_ns and "dataprotection" in pe_ns
    assert (await pe.request("OPTIONS", "/api/vmm/unversioned/info")).status_code == 404


async def test_every_v4_version_is_served_and_others_are_not(pc: httpx.AsyncClient) -> None:
    for v in ("v4.0", "v4.1", "v4.2", "v4.3"):
        assert (await pc.get(f"/api/vmm/{v}/ahv/config/vms")).status_code == 200
    assert (await pc.get("/api/dataprotection/v4.4/config/recovery-points")).status_code == 200
    r = await pc.get("/api/vmm/v4.4/ahv/config/vms")
    assert r.status_code == 404 and _error(r, "vmm")["errorGroup"] == "ENTITY_NOT_FOUND"
    r = await pc.get("/api/vmm/v4.3/ahv/config/nothing-here")
    assert r.status_code == 404 and _error(r, "vmm")


async def test_paging_links_filter_and_orderby(pc: httpx.AsyncClient) -> None:
    r = (await pc.get(VMS, params={"$limit": 3, "$page": 1, "$orderby": "name"})).json()
    assert [v["name"] for v in r["data"]] == ["web-01"]
    assert r["metadata"]["totalAvailableResults"] == 4
    assert r["$dataItemDiscriminator"] == "List<vmm.v4.ahv.config.Vm>"
    assert r["$objectType"] == "vmm.v4.ahv.config.ListVmsApiResponse"
    rels = {link["rel"] for link in r["metadata"]["links"]}
    assert rels == {"self", "first", "last", "prev"}
    r = (await pc.get(VMS, params={"$filter": "startswith(name, 'w') and powerState eq 'ON'"}))
    assert [v["name"] for v in r.json()["data"]] == ["web-01"]
    bad = await pc.get(VMS, params={"$filter": "colour eq 'red'"})
    assert bad.status_code == 400 and "colour" in _error(bad, "vmm")["message"]
    assert (await pc.get(VMS, params={"$limit": 101})).status_code == 400


async def test_if_match_and_request_id_replay(pc: httpx.AsyncClient, sim: Simulator) -> None:
    db = sim.find_vm("db-01")
    got = await pc.get(f"{VMS}/{db.uuid}")
    etag = got.headers["etag"]
    assert got.json()["data"]["$reserved"]
    off = f"{VMS}/{db.uuid}/$actions/power-off"
    r = await pc.post(off)
    assert r.status_code == 428 and _error(r, "vmm")["errorGroup"] == "PRECONDITION_REQUIRED"
    headers = {"If-Match": etag, "NTNX-Request-Id": "7b0c3a4e-0000-4000-8000-000000000001"}
    first = await pc.post(off, headers=headers)
    assert first.status_code == 202
    await _task(pc, first.json())
    assert sim.vm(db.uuid).power_state == "OFF"
    tasks = len(sim.tasks)
    again = await pc.post(off, headers=headers)  # the ETag is stale now, but it is a replay
    assert (again.status_code, again.json()) == (202, first.json())
    assert len(sim.tasks) == tasks
    stale = await pc.post(f"{VMS}/{db.uuid}/$actions/power-on", headers={"If-Match": etag})
    assert stale.status_code == 412
    reused = await pc.post(f"{VMS}/{db.uuid}/$actions/power-on", headers=headers)
    assert reused.status_code == 409
    assert (await pc.get(f"{VMS}/{db.uuid}")).headers["etag"] != etag


async def test_pe_changed_regions_need_the_jwt(pc: httpx.AsyncClient, sim: Simulator) -> None:
    rp = await _rp(pc, sim)
    vm_rp = rp["vmRecoveryPoints"][0]
    drp = vm_rp["diskRecoveryPoints"][0]["diskRecoveryPointExtId"]
    path = (f"/api/dataprotection/v4.4/content/recovery-points/{rp['extId']}/vm-recovery-points/"
            f"{vm_rp['extId']}/disk-recovery-points/{drp}/$actions/compute-changed-regions")
    async with client(pe_app(sim), "http://127.0.0.2:9440") as basic_only:
        r = await basic_only.post(path, json={})
        assert r.status_code == 401 and "NTNX_IGW_SESSION" in _error(r, "dataprotection")[
            "message"]
    spec = {"operation": "COMPUTE_CHANGED_REGIONS", "spec": {"diskRecoveryPoint": {
        "recoveryPointExtId": rp["extId"], "vmRecoveryPointExtId": vm_rp["extId"],
        "diskRecoveryPointExtId": drp}}}
    info = (await pc.post(f"{RPS}/{rp['extId']}/$actions/discover-cluster", json=spec)).json()
    token = info["data"]["jwtToken"]
    assert info["data"]["clusterIp"]["ipv4"]["value"] == "127.0.0.2"
    async with client(pe_app(sim), "http://127.0.0.2:9440", auth=None) as jwt:
        r = await jwt.post(path, json={"offset": 0, "length": 1 << 20},
                           headers={"Cookie": f"NTNX_IGW_SESSION={token}"})
        assert r.status_code == 200, r.text
        assert r.headers["set-cookie"].startswith(f"NTNX_IGW_SESSION={token};")
        body = r.json()
        assert sum(x["length"] for x in body["data"]) == 1 << 20
        extra = {e["name"]: e["value"] for e in body["metadata"]["extraInfo"]}
        assert extra == {"fileSize": 1 << 30}
        bad = await jwt.post(path, json={"referenceRecoveryPointExtId": rp["extId"]},
                             headers={"Cookie": f"NTNX_IGW_SESSION={token}"})
        assert bad.status_code == 422
        blk = await jwt.post(path, json={"blockSizeByte": 4096},
                             headers={"Cookie": f"NTNX_IGW_SESSION={token}"})
        assert blk.status_code == 422
    other = await _rp(pc, sim, "web-01")  # a token for one recovery point only
    other_path = path.replace(rp["extId"], other["extId"])
    async with client(pe_app(sim), "http://127.0.0.2:9440", auth=None) as jwt:
        r = await jwt.post(other_path, json={}, headers={"Cookie": f"NTNX_IGW_SESSION={token}"})
        assert r.status_code == 401
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        r = await jwt.post(path, json={}, headers={"Cookie": f"NTNX_IGW_SESSION={forged}"})
        assert r.status_code == 401


async def test_changed_regions_continue_through_next_offset(tmp_path: Path) -> None:
    sim = Simulator(tmp_path / "s", task_seconds=0.01, sync=False, changed_regions_page_size=2)
    try:
        async with client(pc_app(sim), "http://127.0.0.1:9440") as pc:
            rp = await _rp(pc, sim)
            vm_rp = rp["vmRecoveryPoints"][0]
            drp = vm_rp["diskRecoveryPoints"][1]["diskRecoveryPointExtId"]
            token = sim.tokens.issue(user="admin", cluster_uuid=sim.find_vm("db-01").cluster_uuid,
                                     recovery_point=rp["extId"])
            path = (f"/api/dataprotection/v4.0/content/recovery-points/{rp['extId']}/"
                    f"vm-recovery-points/{vm_rp['extId']}/disk-recovery-points/{drp}/"
                    "$actions/compute-changed-regions")
        async with client(pe_app(sim), "http://127.0.0.2:9440", auth=None) as pe:
            offset, regions = 0, []
            for _ in range(50):
                r = (await pe.post(path, json={"offset": offset},
                                   headers={"Cookie": f"NTNX_IGW_SESSION={token}"})).json()
                regions += r["data"]
                extra = {e["name"]: e["value"] for e in r["metadata"]["extraInfo"]}
                if "nextOffset" not in extra:
                    break
                offset = extra["nextOffset"]
            assert sum(x["length"] for x in regions) == extra["fileSize"] == 8 << 30
            assert len(regions) > 2
    finally:
        sim.close()


def test_block_alignment_merges_and_prefers_regular() -> None:
    regions = [Region(0, 1000, "REGULAR"), Region(1000, 70000, "ZEROED"),
               Region(71000, 10, "REGULAR"), Region(71010, 200000, "ZEROED")]
    assert _aligned(regions, 65536) == [(0, 131072, "REGULAR"), (131072, 196608, "ZEROED")]


async def test_faults_rbac_and_app_consistency(pc: httpx.AsyncClient, sim: Simulator) -> None:
    sim.faults.add(path=r"/api/vmm/", status=503, retry_after=1, count=1)
    r = await pc.get(VMS)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert _error(r, "vmm")["errorGroup"] == "SERVICE_UNAVAILABLE"
    assert (await pc.get(VMS)).status_code == 200
    sim.faults.add(method="POST", path=r"/recovery-points$", task_fail=True, count=1)
    r = await pc.post(RPS, json={"vmRecoveryPoints": [{"vmExtId": sim.find_vm("web-01").uuid}]})
    task = await _task(pc, r.json())
    assert task["status"] == "FAILED" and task["errorMessages"][0]["message"]
    assert (await pc.get(RPS)).json()["data"] == []
    r = await pc.post(RPS, json={"recoveryPointType": "APPLICATION_CONSISTENT",
                                 "vmRecoveryPoints": [{"vmExtId": sim.find_vm("app-01").uuid}]})
    assert r.status_code == 422
    assert _error(r, "dataprotection")["argumentsMap"]["cause"] == "NGT_NOT_INSTALLED"
    db = sim.find_vm("db-01").uuid
    async with client(pc_app(sim), "http://127.0.0.1:9440", auth=BACKUP) as backup:
        r = await backup.post(RPS, json={"vmRecoveryPoints": [{"vmExtId": db}]})
        assert r.status_code == 202
        rp_id = (await _task(backup, r.json()))["entitiesAffected"][0]["extId"]
        r = await backup.post(f"{RPS}/{rp_id}/$actions/restore", json={})
        assert r.status_code == 403 and _error(r, "dataprotection")["errorGroup"] == \
            "ACCESS_DENIED"
        r = await backup.post(VGS, json={"name": "v", "clusterReference": sim.vm(db).cluster_uuid})
        assert r.status_code == 202
    async with client(pc_app(sim), "http://127.0.0.1:9440", auth=VIEWER) as viewer:
        assert (await viewer.delete(f"{RPS}/{rp_id}")).status_code == 403
    async with client(pc_app(sim), "http://127.0.0.1:9440", auth=None) as anon:
        r = await anon.get(VMS)
        assert r.status_code == 401 and _error(r, "vmm")


async def test_v3_and_v4_share_the_model_and_persist(tmp_path: Path) -> None:
    sim = Simulator(tmp_path / "s", task_seconds=0.01, sync=False)
    async with client(pc_app(sim), "http://127.0.0.1:9440") as pc:
        rp = await _rp(pc, sim)
        cluster = sim.find_vm("db-01").cluster_uuid
        drp = rp["vmRecoveryPoints"][0]["diskRecoveryPoints"][2]["diskRecoveryPointExtId"]
        r = await pc.post(VGS, json={"name": "keep", "clusterReference": cluster,
                                     "usageType": "BACKUP_TARGET", "isHidden": True,
                                     "disks": [{"diskDataSourceReference": {
                                         "extId": drp, "entityType": "DISK_RECOVERY_POINT"}}]})
        vg_id = (await _task(pc, r.json()))["entitiesAffected"][0]["extId"]
    async with client(pe_app(sim), "http://127.0.0.2:9440") as pe:
        snaps = (await pe.post("/api/nutanix/v3/vm_snapshots/list", json={})).json()
        assert snaps["entities"] == []  # the recovery point's snapshots are its own
        vg = (await pe.get(f"/api/nutanix/v2.0/volume_groups/{vg_id}")).json()
        assert vg["name"] == "keep"
        assert [d["vmdisk_size_bytes"] for d in vg["disk_list"]] == [256 << 20]
    sim.close()
    sim = Simulator(tmp_path / "s", task_seconds=0.01, sync=False)
    try:
        async with client(pc_app(sim), "http://127.0.0.1:9440") as pc:
            again = (await pc.get(f"{RPS}/{rp['extId']}")).json()["data"]
            assert again["vmRecoveryPoints"] == rp["vmRecoveryPoints"]
            vg = (await pc.get(f"{VGS}/{vg_id}")).json()["data"]
            assert (vg["usageType"], vg["isHidden"]) == ("BACKUP_TARGET", True)
            disks = (await pc.get(f"{VGS}/{vg_id}/disks")).json()["data"]
            assert disks[0]["diskDataSourceReference"] == {"extId": drp,
                                                           "entityType": "DISK_RECOVERY_POINT"}
    finally:
        sim.close()


@pytest.mark.parametrize("path", ["/api/actuator/versionroutes", VMS,
                                  "/api/clustermgmt/v4.3/config/clusters"])
async def test_v4_switched_off_answers_404(tmp_path: Path, path: str) -> None:
    sim = Simulator(tmp_path / "s", sync=False, v4=False)
    try:
        async with client(pc_app(sim), "http://127.0.0.1:9440") as pc:
            r = await pc.get(path)
            assert r.status_code == 404 and r.json()["message_list"][0]["reason"] == \
                "ENTITY_NOT_FOUND"
            assert (await pc.request("OPTIONS", "/api/vmm/unversioned/info")).status_code == 404
            assert (await pc.post("/api/nutanix/v3/vms/list", json={})).status_code == 200
    finally:
        sim.close()
