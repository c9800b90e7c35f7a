"""The simulator's v3 RBAC reads (``GET /users/info``, ``POST /permissions/list``): what each
role holds, in the official Swagger's shapes; Prism Element does not serve them."""

from __future__ import annotations

import httpx
from tests.hypervisors.conftest import V3, client
from tests.hypervisors.test_simulator_swagger import _schema_for, _validate

from ahvbackup.hypervisors.ahv.simulator import Simulator, pc_app, pe_app

USERS = {"admin": "nutanix/4u", "backup": "backup/4u", "viewer": "viewer/4u"}


async def _granted(pc: httpx.AsyncClient) -> tuple[list[str], set[tuple[str, str]]]:
    info = await pc.get(f"{V3}/users/info")
    assert info.status_code == 200
    schema = _schema_for("GET", f"{V3}/users/info", 200)
    assert schema is not None
    assert not _validate(schema, info.json())
    perms = await pc.post(f"{V3}/permissions/list", json={"kind": "permission", "length": 500})
    assert perms.status_code == 200
    schema = _schema_for("POST", f"{V3}/permissions/list", 200)
    assert schema is not None
    assert not _validate(schema, perms.json())
    by_uuid = {e["metadata"]["uuid"]: (e["spec"]["resources"]["operation"],
                                       e["spec"]["resources"]["kind"])
               for e in perms.json()["entities"]}
    assert perms.json()["metadata"]["total_matches"] == len(by_uuid)
    acps = info.json()["access_control_policy_list"]
    return ([a["role"]["name"] for a in acps],
            {by_uuid[u] for a in acps for u in a["role"]["permission_uuid_list"]})


async def test_each_role_holds_what_its_routes_allow(sim: Simulator) -> None:
    held = {}
    for user, password in USERS.items():
        async with client(pc_app(sim), "http://127.0.0.1:9440", (user, password)) as pc:
            held[user] = await _granted(pc)
    assert held["admin"][0] == ["Prism Admin"]
    assert ("create", "vm") in held["admin"][1]
    roles, backup = held["backup"]
    assert roles == ["Backup Admin"]
    assert {("create", "vm_snapshot"), ("delete", "vm_snapshot"), ("create", "volume_group"),
            ("update", "volume_group"), ("create", "image"), ("view", "vm")} <= backup
    assert ("create", "vm") not in backup
    roles, viewer = held["viewer"]
    assert roles == ["Viewer"] and {op for op, _ in viewer} == {"view"}


async def test_prism_element_does_not_serve_them(sim: Simulator) -> None:
    async with client(pe_app(sim), "http://127.0.0.2:9440") as pe:
        assert (await pe.get(f"{V3}/users/info")).status_code == 404
        assert (await pe.post(f"{V3}/permissions/list", json={})).status_code == 404
