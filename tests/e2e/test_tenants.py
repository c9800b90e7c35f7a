"""Multi-tenancy end to end: a served simulator with two Prism Central projects and one
project-scoped Backup Admin each, driven by the `ahvbackup` command line as each customer's
operator runs it.

Each operator backs up and restores only its own project's VMs; the other tenant's backups
are refused by id and by path; the repository and state keep tenants in separate folders;
a tenant's log never names the other tenant's VMs; the projects answers follow the Swagger.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import trio
from tests.e2e.e2e_world import MiB, World
from tests.hypervisors.conftest import V3, client
from tests.hypervisors.test_simulator_swagger import _schema_for, _validate

from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.core.plugins import Hooks
from ahvbackup.hypervisors.ahv.simulator import pc_app, pe_app

CLI = [sys.executable, "-m", "ahvbackup.core.cli"]
CONTROL = "/api/simulator/v1"
ADMIN = ("admin", "nutanix/4u")
TENANTS = {"acme": ("acme-op", "acme/4u", "acme-web"),
           "globex": ("globex-op", "globex/4u", "globex-db")}


async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process([*CLI, *args], capture_stdout=True, capture_stderr=True,
                                  check=False)


def as_tenant(world: World, who: str, **extra: Any) -> list[str]:
    """The operator of tenant `who`: its scoped user, `project=who`, a JSON debug log."""
    user, password, _ = TENANTS[who]
    keys: dict[str, Any] = {"user": user, "password": password, "project": who,
                            "log_format": "json", "verbose": 2,
                            "debug_log": world.tmp / f"{who}.log", **extra}
    return world.cli_args(**keys)


async def _set_up(world: World) -> dict[str, str]:
    """Projects, scoped users and VM membership through the control API; {tenant: VM uuid}."""
    vms = {}
    trust = ssl.create_default_context(cafile=world.ca)
    async with httpx.AsyncClient(base_url=f"https://{world.pc}", verify=trust, auth=ADMIN,
                                 timeout=30) as admin:
        for tenant, (user, password, vm_name) in TENANTS.items():
            made = await admin.post(f"{CONTROL}/projects", json={"name": tenant})
            assert made.status_code == 201, made.text
            added = await admin.post(f"{CONTROL}/users", json={
                "name": user, "password": password, "role": "Backup Admin",
                "projects": [tenant]})
            assert added.status_code == 201, added.text
            vm = world.add_vm(vm_name, [(4 * MiB, [(0, MiB), (2 * MiB, MiB)])])
            moved = await admin.put(f"{CONTROL}/vms/{vm.uuid}/project", json={"project": tenant})
            assert moved.status_code == 200, moved.text
            vms[tenant] = vm.uuid
        refused = await admin.post(f"{CONTROL}/users", json={
            "name": "x", "password": "x", "role": "Backup Admin", "projects": ["nope"]})
        assert refused.status_code == 400 and "no project 'nope'" in refused.text
    return vms


async def test_each_tenant_sees_backs_up_and_restores_only_its_own(world: World) -> None:
    vms = await _set_up(world)
    for tenant in TENANTS:
        prom = world.tmp / f"{tenant}.prom"
        done = await run_cli("--json", "backup", *as_tenant(world, tenant,
                                                            metrics_textfile=prom))
        assert done.returncode == 0, done.stderr.decode()
        assert [v["vm_name"] for v in json.loads(done.stdout)["vms"]] == [TENANTS[tenant][2]]
        metrics = prom.read_text()
        assert f'tenant="{tenant}",vm="{TENANTS[tenant][2]}"' in metrics
        assert 'tenant=""' not in metrics

    # an operator naming the other project sees nothing of it
    other = await run_cli("backup", *as_tenant(world, "acme", project="globex", tenant="acme"))
    assert other.returncode == 2
    assert b"tenant acme: project: no VM visible in project 'globex'" in other.stderr
    assert b"globex-db" not in other.stderr

    listed = await run_cli("--json", "list", *as_tenant(world, "acme"))
    rows = json.loads(listed.stdout)
    assert [(r["vm"], r["tenant"]) for r in rows] == [("acme-web", "acme")]

    dest = world.tmp / "out"
    restored = await run_cli("restore", "--vm", "acme-web", "--dest", str(dest),
                             *as_tenant(world, "acme"))
    assert restored.returncode == 0, restored.stderr.decode()
    assert (dest / "acme-web" / "scsi.0.raw").read_bytes() == world.sim.read_disk(
        vms["acme"], 0, 0, 4 * MiB)

    # the other tenant's backup, by id and by path, is refused naming only this tenant
    theirs = json.loads((await run_cli("--json", "list", *as_tenant(world, "globex"))).stdout)
    by_id = await run_cli("restore", "--backup", theirs[0]["backup_id"], "--dest", str(dest),
                          *as_tenant(world, "acme"))
    assert by_id.returncode != 0
    assert b"tenant acme: backup: no complete backup" in by_id.stderr
    repo = world.tmp / "repo"
    by_path = await run_cli("restore", "--vm", vms["globex"], "--dest", str(dest),
                            *as_tenant(world, "acme", repository=repo / "tenants" / "globex"))
    assert by_path.returncode == 2
    assert b"inside another tenant's repository; refused for tenant 'acme'" in by_path.stderr
    untenanted = await run_cli("list", *world.cli_args(repository=repo / "tenants" / "globex"))
    assert untenanted.returncode == 2 and b"refused for a job without tenant=" in untenanted.stderr
    for refusal in (other, by_id, by_path):
        assert b"globex-db" not in refusal.stderr
        assert vms["globex"].encode() not in refusal.stderr

    # on disk: one folder per tenant, each with only its own VMs
    assert sorted(p.name for p in repo.iterdir()) == ["tenants"]
    for tenant, uuid in vms.items():
        folder = repo / "tenants" / tenant
        assert (folder / ".tenant").read_text().strip() == tenant
        assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [uuid]
        assert (world.tmp / "state" / "tenants" / tenant / uuid / "state.json").is_file()
    assert not list((world.tmp / "state").glob("*/state.json"))

    # a tenant's log carries its tenant and never the other tenant's VMs
    for tenant, other_tenant in (("acme", "globex"), ("globex", "acme")):
        text = (world.tmp / f"{tenant}.log").read_text()
        records = [json.loads(line) for line in text.splitlines()]
        assert any(r["tenant"] == tenant and r["vm"] == TENANTS[tenant][2] for r in records)
        assert TENANTS[other_tenant][2] not in text and vms[other_tenant] not in text


async def test_scoped_users_get_403_outside_their_project_and_answers_follow_swagger(
        world: World) -> None:
    vms = await _set_up(world)
    sim = world.sim
    acme = TENANTS["acme"][:2]
    pc = client(pc_app(sim), "http://127.0.0.1:9440", auth=acme)
    pe = client(pe_app(sim), "http://127.0.0.2:9440", auth=acme)
    admin = client(pc_app(sim), "http://127.0.0.1:9440")
    seen: list[httpx.Response] = []
    async with pc, pe, admin:
        listed = await pc.post(f"{V3}/vms/list", json={})
        seen.append(listed)
        assert [e["spec"]["name"] for e in listed.json()["entities"]] == ["acme-web"]
        ref = listed.json()["entities"][0]["metadata"]["project_reference"]
        assert ref["name"] == "acme"
        mine = await pc.get(f"{V3}/vms/{vms['acme']}")
        theirs = await pc.get(f"{V3}/vms/{vms['globex']}")
        assert mine.status_code == 200 and theirs.status_code == 403
        snap = await pe.post(f"{V3}/vm_snapshots", json={
            "spec": {"name": "x", "resources": {"entity_uuid": vms["globex"]}}})
        assert snap.status_code == 403 and not sim.snapshots
        ok = await pe.post(f"{V3}/vm_snapshots", json={
            "spec": {"name": "x", "resources": {"entity_uuid": vms["acme"]}}})
        assert ok.status_code == 202
        projects = await pc.post(f"{V3}/projects/list", json={})
        assert [e["spec"]["name"] for e in projects.json()["entities"]] == ["acme"]
        every = await admin.post(f"{V3}/projects/list", json={})
        assert sorted(e["spec"]["name"] for e in every.json()["entities"]) == ["acme", "globex"]
        globex_uuid = next(e["metadata"]["uuid"] for e in every.json()["entities"]
                           if e["spec"]["name"] == "globex")
        hidden = await pc.get(f"{V3}/projects/{globex_uuid}")
        assert hidden.status_code == 404
        info = (await pc.get(f"{V3}/users/info")).json()
        scope = info["access_control_policy_list"][0]["filter_list"]["context_list"][0]
        assert scope["scope_filter_expression_list"][0]["right_hand_side"]["uuid_list"] == [
            ref["uuid"]]
        seen += [mine, theirs, projects, every, hidden,
                 await pc.get(f"{V3}/projects/{ref['uuid']}"),
                 await pc.get(f"{V3}/users/info")]
    # v4: the VM list is scoped the same way, and each VM's project comes along (from v3)
    cfg = world.config(prism_api_version="v4", user=acme[0], password=acme[1])
    async with Runtime.from_config(cfg, hooks=Hooks()).hypervisor.connect() as session:
        assert session.api.version == "v4"
        listed_v4 = await session.list_vms()
    assert [(v.name, v.project_name) for v in listed_v4] == [("acme-web", "acme")]
    for response in seen:
        schema = _schema_for(response.request.method, response.request.url.path,
                             response.status_code)
        assert schema is not None, response.request.url.path
        assert _validate(schema, response.json()) == [], response.request.url.path


def test_the_simulator_keeps_projects_and_scopes_across_a_restart(tmp_path: Path) -> None:
    from ahvbackup.hypervisors.ahv.simulator import Simulator
    from ahvbackup.hypervisors.ahv.simulator.v3.projects import move_vm

    sim = Simulator(tmp_path / "sim", task_seconds=0.05, sync=False)
    project = sim.users.add_project("acme")
    sim.users.add("acme-op", "pw", "Backup Admin", projects=("acme",))
    vm = next(iter(sim.vms.values()))
    move_vm(sim, vm.uuid, "acme")
    sim.close()
    again = Simulator(tmp_path / "sim", task_seconds=0.05, sync=False)
    try:
        user = again.users.get("acme-op")
        assert user is not None and user.projects == [project.uuid]
        assert again.vms[vm.uuid].project_uuid == project.uuid
        assert again.users.verify("acme-op", "pw") is not None
    finally:
        again.close()


async def test_health_check_reports_the_scope_and_fileset_writes_one_file_per_tenant(
        world: World) -> None:
    vms = await _set_up(world)
    checked = await run_cli("--json", "health-check", *as_tenant(world, "acme"))
    rbac = next(c for c in json.loads(checked.stdout)["checks"] if c["step"] == "rbac")
    assert rbac["status"] == "warn", rbac  # Backup Admin: no restores to AHV
    assert "scope: projects acme" in rbac["detail"]
    assert rbac["data"]["scope"] == {"projects": ["acme"]}
    outside = await run_cli("--json", "health-check",
                            *as_tenant(world, "acme", project="globex", tenant="acme"))
    rbac = next(c for c in json.loads(outside.stdout)["checks"] if c["step"] == "rbac")
    assert rbac["status"] == "fail" and "not scoped to project globex" in rbac["detail"]

    out = world.tmp / "filesets"
    written = await run_cli("bacula", "fileset", "--path", "metaplugin", "--project", "acme",
                            "--project", "globex", "--out", str(out), *world.cli_args(
                                user="admin", password="nutanix/4u"))
    assert written.returncode == 0, written.stderr.decode()
    assert sorted(p.name for p in out.iterdir()) == ["ahvbackup-acme.conf",
                                                      "ahvbackup-globex.conf"]
    acme = (out / "ahvbackup-acme.conf").read_text()
    assert 'Plugin = "ahvbackup: vm=acme-web project=acme"' in acme
    assert 'Name = "ahv-acme-acme-web"' in acme
    assert "globex" not in acme and vms["globex"] not in acme
