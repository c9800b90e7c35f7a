"""Every v3 answer of the simulator for a path the official Swagger defines validates against it.

The spec is read from ``shared/specs`` (or ``$AHVBACKUP_SPECS``); a missing spec fails the test.
A scenario drives every route the simulator serves (successes, task progressions and errors) and
each JSON body is validated against the schema of its path, method and status (or ``default``).
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import trio
from tests.conftest import specs_dir
from tests.hypervisors.conftest import V3, VIEWER, client

from ahvbackup.hypervisors.ahv.simulator import Simulator, pc_app, pe_app


@cache
def _spec() -> dict[str, Any]:
    path = specs_dir() / "prism-v3-intentful-api.swagger.json"
    if not path.is_file():
        pytest.fail(f"official v3 Swagger missing at {path} (set AHVBACKUP_SPECS)")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def _templates() -> list[tuple[re.Pattern[str], str]]:
    out = []
    for template in _spec()["paths"]:
        rx = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        out.append((re.compile(f"^{rx}$"), template))
    # literal paths win over templated ones (/vms/list before /vms/{uuid})
    out.sort(key=lambda p: p[1].count("{"))
    return out


def _schema_for(method: str, path: str, status: int) -> dict[str, Any] | None:
    """The response schema the Swagger gives this call, None if the path is not defined."""
    rel = path.removeprefix(V3)
    for rx, template in _templates():
        if rx.match(rel):
            op = _spec()["paths"][template].get(method.lower())
            if op is None:
                return None
            responses = op["responses"]
            resp = responses.get(str(status)) or responses.get("default")
            assert resp is not None, f"{method} {template}: no response for {status} in Swagger"
            return resp.get("schema")
    return None


def _validate(schema: dict[str, Any], body: Any) -> list[str]:
    root = {**schema, "definitions": _spec()["definitions"]}
    validator = jsonschema.Draft4Validator(root)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(body)]


class Recorder:
    """Collects every response of the scenario, for validation afterwards."""

    def __init__(self) -> None:
        self.seen: list[httpx.Response] = []

    async def hook(self, response: httpx.Response) -> None:
        await response.aread()
        self.seen.append(response)


async def _scenario(sim: Simulator, rec: Recorder) -> None:
    hooks = {"response": [rec.hook]}
    pc = client(pc_app(sim), "http://127.0.0.1:9440")
    pe = client(pe_app(sim), "http://127.0.0.2:9440")
    anon = client(pc_app(sim), "http://127.0.0.1:9440", auth=None)
    viewer = client(pc_app(sim), "http://127.0.0.1:9440", auth=VIEWER)
    for c in (pc, pe, anon, viewer):
        c.event_hooks = hooks
    async with pc, pe, anon, viewer:
        clusters = (await pc.post(f"{V3}/clusters/list", json={})).json()["entities"]
        for c in clusters:
            await pc.get(f"{V3}/clusters/{c['metadata']['uuid']}")
        await pe.post(f"{V3}/clusters/list", json={"kind": "cluster"})
        await pc.get(f"{V3}/clusters/00000000-0000-4000-8000-000000000000")
        subnets = (await pc.post(f"{V3}/subnets/list", json={})).json()["entities"]
        await pc.get(f"{V3}/subnets/{subnets[0]['metadata']['uuid']}")
        await pc.get(f"{V3}/users/me")
        await pe.get(f"{V3}/users/me")
        vms = (await pc.post(f"{V3}/vms/list", json={"length": 2, "offset": 1})).json()
        await pc.post(f"{V3}/vms/list", json={"filter": "vm_name==db-01", "sort_attribute":
                                              "name", "sort_order": "ASCENDING"})
        await pc.post(f"{V3}/vms/list", json={"filter": "bogus==1"})
        await pe.post(f"{V3}/vms/list", json={})
        for vm in vms["entities"]:
            await pc.get(f"{V3}/vms/{vm['metadata']['uuid']}")
        await pc.get(f"{V3}/vms/00000000-0000-4000-8000-000000000000")
        await anon.post(f"{V3}/vms/list", json={})
        db = sim.find_vm("db-01")

        # snapshot on PE, image from it on PC, download
        snap = (await pe.post(f"{V3}/vm_snapshots", json={
            "spec": {"name": "conf", "resources": {"entity_uuid": db.uuid}}})).json()
        await trio.sleep(sim.task_seconds * 2)
        snap = (await pe.get(f"{V3}/vm_snapshots/{snap['metadata']['uuid']}")).json()
        path = snap["status"]["snapshot_file_list"][0]["snapshot_file_path"]
        created = await pc.post(f"{V3}/images", json={
            "metadata": {"kind": "image"},
            "spec": {"name": "conf-img", "resources": {"image_type": "DISK_IMAGE",
                                                       "source_uri": f"nfs://127.0.0.2{path}"}}})
        image_uuid = created.json()["metadata"]["uuid"]
        await pc.get(f"{V3}/images/{image_uuid}")  # PENDING
        await pc.get(f"{V3}/images/{image_uuid}/file")  # 409 not ready
        task_uuid = created.json()["status"]["execution_context"]["task_uuid"][0]
        await pc.get(f"{V3}/tasks/{task_uuid}")  # QUEUED or RUNNING
        await trio.sleep(sim.task_seconds * 2)
        await pc.get(f"{V3}/tasks/{task_uuid}")
        await pc.post(f"{V3}/tasks/list", json={"length": 5})
        await pc.get(f"{V3}/images/{image_uuid}")
        await pc.post(f"{V3}/images/list", json={})
        await pc.post(f"{V3}/images", json={"spec": {"name": "bad", "resources": {
            "source_uri": "http://example.invalid/x.qcow2"}}})
        await pc.post(f"{V3}/images", json={"spec": {"name": "upload-me"}})

        # VM create / update / delete, and refusals
        subnet_ref = {"kind": "subnet", "uuid": subnets[0]["metadata"]["uuid"]}
        new = await pc.post(f"{V3}/vms", json={
            "metadata": {"kind": "vm"},
            "spec": {"name": "restored",
                     "cluster_reference": {"kind": "cluster", "uuid": db.cluster_uuid},
                     "resources": {
                         "disk_list": [{"data_source_reference": {"kind": "image",
                                                                  "uuid": image_uuid}}],
                         "nic_list": [{"subnet_reference": subnet_ref}]}}})
        new_uuid = new.json()["metadata"]["uuid"]
        await trio.sleep(sim.task_seconds * 2)
        got = (await pc.get(f"{V3}/vms/{new_uuid}")).json()
        got.pop("status")
        got["spec"]["resources"]["power_state"] = "ON"
        await pc.put(f"{V3}/vms/{new_uuid}", json=got)
        await pc.put(f"{V3}/vms/{new_uuid}", json=got)  # stale spec_version: 409
        await viewer.delete(f"{V3}/vms/{new_uuid}")  # 403
        await pc.delete(f"{V3}/vms/{new_uuid}")
        # a restore's VM: a disk cloned from an empty volume-group disk (vm_disk), a chosen
        # container, machine type; refused for a role without VM create (403)
        cluster = sim.clusters[db.cluster_uuid]
        vg_uuid = "5e0c7f4e-6b2a-4c39-9d6e-0a1b2c3d4e5f"
        await pe.post("/api/nutanix/v2.0/volume_groups", json={
            "uuid": vg_uuid, "name": "restore-stage", "disk_list": [{"create_spec": {
                "container_uuid": cluster.containers[1].uuid, "size": (1 << 20) + 512}}]})
        vmdisk = sim.volume_groups.get(vg_uuid).disks[0].uuid
        restore_spec = {"metadata": {"kind": "vm"}, "spec": {
            "name": "restored-from-vg",
            "cluster_reference": {"kind": "cluster", "uuid": cluster.uuid},
            "resources": {"machine_type": "Q35", "boot_config": {"boot_type": "UEFI"},
                          "disk_list": [{
                              "data_source_reference": {"kind": "vm_disk", "uuid": vmdisk},
                              "storage_config": {"storage_container_reference": {
                                  "kind": "storage_container",
                                  "uuid": cluster.containers[1].uuid}}}],
                          "nic_list": [{"subnet_reference": subnet_ref}]}}}
        await viewer.post(f"{V3}/vms", json=restore_spec)  # 403
        from_vg = await pc.post(f"{V3}/vms", json=restore_spec)
        assert from_vg.status_code == 202, from_vg.text
        made = sim.vms[from_vg.json()["metadata"]["uuid"]]
        assert [(d.size, d.container_uuid) for d in made.data_disks] == [
            ((1 << 20) + 512, cluster.containers[1].uuid)]
        got = (await pc.get(f"{V3}/vms/{made.uuid}")).json()
        assert got["status"]["resources"]["machine_type"] == "Q35"
        listed = await pc.post(f"{V3}/subnets/list",
                               json={"filter": f"cluster_uuid=={cluster.uuid}"})
        assert {e["status"]["resources"]["ip_config"]["prefix_length"]
                for e in listed.json()["entities"]} == {24}
        await pc.post(f"{V3}/vms", json={"spec": {}})  # 422
        await pc.post(f"{V3}/vms", content=b"{not json")  # 400
        await pc.post(f"{V3}/idempotence_identifiers",
                      json={"client_identifier": "conf", "count": 2,
                            "valid_duration_in_minutes": 10})
        await pc.delete(f"{V3}/images/{image_uuid}")
        await pc.get(f"{V3}/tasks/00000000-0000-4000-8000-000000000000")


async def test_every_v3_answer_validates_against_the_official_swagger(sim: Simulator) -> None:
    rec = Recorder()
    await _scenario(sim, rec)
    checked: set[str] = set()
    failures: list[str] = []
    for r in rec.seen:
        if not r.headers.get("content-type", "").startswith("application/json"):
            continue
        schema = _schema_for(r.request.method, r.request.url.path, r.status_code)
        if schema is None:
            continue
        key = f"{r.request.method} {r.request.url.path} -> {r.status_code}"
        checked.add(f"{r.request.method} {r.status_code}")
        for err in _validate(schema, r.json()):
            failures.append(f"{key}: {err}")
    assert not failures, "\n".join(failures)
    # the scenario really exercised successes, async 202s and the error envelope
    for must in ("POST 200", "GET 200", "POST 202", "PUT 202", "DELETE 202", "GET 404",
                 "POST 422", "POST 400", "POST 401", "DELETE 403", "POST 403", "PUT 409",
                 "GET 409"):
        assert must in checked, f"scenario did not validate any {must}"


def test_the_validator_accepts_real_recorded_answers_and_rejects_a_broken_one() -> None:
    recorded = specs_dir() / "recorded"
    for f in sorted(recorded.glob("v3_*.json")):
        for call in json.loads(f.read_text()):
            schema = _schema_for(call["method"], call["path"], call["status"])
            assert schema is not None, f"{f.name}: {call['path']} not in Swagger"
            assert _validate(schema, call["response_body"]) == [], f.name
    schema = _schema_for("GET", f"{V3}/vms/x", 200)
    assert schema is not None
    assert _validate(schema, {"api_version": "3.1", "metadata": {"kind": "vm"},
                              "spec": {"resources": {}}}) != []


def _key_paths(obj: Any, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.add(f"{prefix}.{k}")
            out |= _key_paths(v, f"{prefix}.{k}")
    elif isinstance(obj, list):
        for v in obj:
            out |= _key_paths(v, f"{prefix}[]")
    return out


# what a client reads from these answers; every one is present in the real recordings
_CLIENT_READS = {
    "v3_TestOperations_ListVM.json": [
        ".metadata.total_matches", ".entities[].metadata.uuid", ".entities[].status.name",
        ".entities[].status.state", ".entities[].spec.resources.disk_list[].uuid",
        ".entities[].status.resources.disk_list[].disk_size_bytes",
        ".entities[].status.resources.disk_list[].device_properties.disk_address.device_index",
        ".entities[].status.resources.disk_list[].storage_config.storage_container_reference"
        ".uuid",
        ".entities[].status.resources.nic_list[].subnet_reference.uuid",
        ".entities[].status.resources.power_state", ".entities[].status.cluster_reference.uuid",
        ".entities[].metadata.spec_version", ".entities[].status.execution_context.task_uuid",
    ],
    "v3_TestOperations_GetVM.json": [
        ".metadata.uuid", ".spec.name", ".spec.resources.boot_config.boot_type",
        ".status.resources.disk_list[].uuid", ".status.resources.memory_size_mib",
        ".status.resources.num_sockets", ".status.resources.nic_list[].mac_address",
    ],
    "v3_TestOperations_ListCluster.json": [
        ".entities[].metadata.uuid", ".entities[].status.name",
        ".entities[].status.resources.config.service_list",
        ".entities[].status.resources.network.external_ip",
        ".entities[].status.resources.network.external_data_services_ip",
    ],
    "v3_TestOperations_CreateIdempotenceIdentifers.json": [
        ".client_identifier", ".count", ".expiration_time", ".uuid_list",
    ],
}


async def test_our_answers_carry_what_clients_read_from_the_real_ones(
    sim: Simulator, pc: httpx.AsyncClient
) -> None:
    db = sim.find_vm("db-01")
    ours = {
        "v3_TestOperations_ListVM.json": await pc.post(f"{V3}/vms/list",
                                                       json={"filter": "vm_name==db-01"}),
        "v3_TestOperations_GetVM.json": await pc.get(f"{V3}/vms/{db.uuid}"),
        "v3_TestOperations_ListCluster.json": await pc.post(f"{V3}/clusters/list", json={}),
        "v3_TestOperations_CreateIdempotenceIdentifers.json": await pc.post(
            f"{V3}/idempotence_identifiers",
            json={"client_identifier": "x", "count": 2, "valid_duration_in_minutes": 10}),
    }
    recorded_dir: Path = specs_dir() / "recorded"
    for name, reads in _CLIENT_READS.items():
        real = json.loads((recorded_dir / name).read_text())[0]["response_body"]
        real_paths, our_paths = _key_paths(real), _key_paths(ours[name].json())
        for p in reads:
            assert p in real_paths, f"{name}: {p} is not in the real answer (fix the test)"
            assert p in our_paths, f"{name}: our answer lacks {p}"
