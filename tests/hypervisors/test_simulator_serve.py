"""Served listeners (TLS, addresses, ports), persistence across restarts, and the CLI."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from tests.hypervisors.conftest import ADMIN, V3, client

from ahvbackup.hypervisors.ahv.simulator import (
    Simulator,
    pc_app,
    pe_app,
    seed_pattern,
    serve_simulator,
)
from ahvbackup.transports.iscsi.initiator import discover

MiB = 1 << 20


async def test_tls_listeners_pc_and_two_pes_on_one_port(tmp_path: Path) -> None:
    sim = Simulator(tmp_path / "s", pe_count=2, sync=False)
    try:
        async with serve_simulator(sim, port=0) as ep:
            assert ep.ca_path == tmp_path / "s" / "ca.pem"
            assert ep.pc_url == f"https://127.0.0.1:{ep.port}"
            assert list(ep.pe_urls.values()) == [
                f"https://127.0.0.2:{ep.port}", f"https://127.0.0.3:{ep.port}"]
            ctx = ssl.create_default_context(cafile=str(ep.ca_path))
            async with httpx.AsyncClient(verify=ctx, auth=ADMIN, timeout=10) as c:
                clusters = (await c.post(f"{ep.pc_url}{V3}/clusters/list", json={})).json()
                aos = [e for e in clusters["entities"]
                       if e["status"]["resources"]["config"]["service_list"] == ["AOS"]]
                for e in aos:
                    net = e["status"]["resources"]["network"]
                    url = ep.pe_urls[e["metadata"]["uuid"]]
                    assert url == f"https://{net['external_ip']}:{ep.port}"
                    r = await c.post(f"{url}{V3}/clusters/list", json={})
                    assert r.json()["entities"][0]["metadata"]["uuid"] == e["metadata"]["uuid"]
                    assert r.headers["x-ntnx-env"] == "pe"
                    assert "Secure" in r.headers["set-cookie"]
                    assert net["external_data_services_ip"] == ep.dsips[e["metadata"]["uuid"]]
                assert len(aos) == 2
                r = await c.post(f"{ep.pe_url}{V3}/vm_snapshots/list", json={})
                assert r.status_code == 200
                assert (await c.post(f"{ep.pc_url}{V3}/vm_snapshots/list",
                                     json={})).status_code == 404
            async with httpx.AsyncClient(timeout=10) as untrusting:
                with pytest.raises(httpx.ConnectError):
                    await untrusting.get(f"{ep.pc_url}{V3}/users/me")
    finally:
        sim.close()


async def test_a_restarted_simulator_has_the_same_inventory_disks_and_snapshots(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    sim = Simulator(state, task_seconds=0.01)
    db = sim.find_vm("db-01")
    async with client(pe_app(sim), "http://127.0.0.2:9440") as pe, \
            client(pc_app(sim), "http://127.0.0.1:9440") as pc:
        snap = (await pe.post(f"{V3}/vm_snapshots", json={
            "spec": {"name": "keep", "resources": {"entity_uuid": db.uuid}}})).json()
        sim.write_disk(db.uuid, 1, 6 << 30, b"after the snapshot")
        r = await pc.post(f"{V3}/images", json={"spec": {"name": "upl"}})
        image_uuid = r.json()["metadata"]["uuid"]
        await pc.put(f"{V3}/images/{image_uuid}/file", content=b"image bytes")
        sim.users.add("auditor", "s3cret!", "Viewer")
        sim.save()
        vm_names = sorted(v.name for v in sim.vms.values())
    sim.close()

    again = Simulator(state, seed=False)
    try:
        assert sorted(v.name for v in again.vms.values()) == vm_names
        assert again.read_disk(db.uuid, 1, 6 << 30, 18) == b"after the snapshot"
        assert again.read_disk(db.uuid, 1, 2 << 30, MiB) == seed_pattern("db-01", 1, 2 << 30, MiB)
        snap_uuid = snap["metadata"]["uuid"]
        vmdisk = db.data_disks[1].uuid
        assert again.read_snapshot_disk(snap_uuid, vmdisk, 6 << 30, 18) == bytes(18)
        async with client(pe_app(again), "http://127.0.0.2:9440") as pe, \
                client(pc_app(again), "http://127.0.0.1:9440", auth=("auditor", "s3cret!")) as pc:
            got = (await pe.get(f"{V3}/vm_snapshots/{snap_uuid}")).json()
            assert got["status"]["state"] == "COMPLETE"
            path = got["status"]["snapshot_file_list"][1]["snapshot_file_path"]
            r = await pe.post(f"{V3}/data/changed_regions", json={"snapshot_file_path": path})
            assert r.status_code == 200
            assert (await pc.get(f"{V3}/images/{image_uuid}/file")).content == b"image bytes"
            task = snap["status"]["execution_context"]["task_uuid"][0]
            assert (await pc.get(f"{V3}/tasks/{task}")).json()["status"] == "SUCCEEDED"
    finally:
        again.close()


def test_a_new_simulator_without_seed_has_clusters_and_users_but_no_vms(tmp_path: Path) -> None:
    sim = Simulator(tmp_path / "empty", seed=False, pe_count=3)
    try:
        assert sim.vms == {}
        assert [c.external_ip for c in sim.clusters.values()] == [
            "127.0.0.2", "127.0.0.3", "127.0.0.4"]
        assert {u.name for u in sim.users} == {"admin", "backup", "viewer"}
        stored = json.loads((tmp_path / "empty" / "inventory.json").read_text())
        assert "nutanix/4u" not in json.dumps(stored)
    finally:
        sim.close()


@asynccontextmanager
async def _serve_cli(tmp_path: Path, *args: str, until: str) -> AsyncIterator[str]:
    """`ahvbackup [args] simulator serve` on free ports; yields what it printed up to the line
    `until`, then stops it with Ctrl-C and checks it exits 0."""
    exe = Path(sys.executable).with_name("ahvbackup")
    proc = subprocess.Popen(
        [str(exe), *args, "simulator", "serve", "--state", str(tmp_path / "cli"),
         "--port", "0", "--http", "--task-seconds", "0.01"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        with trio.fail_after(60):
            while not lines or lines[-1] != until:
                line = await trio.to_thread.run_sync(proc.stdout.readline)
                assert line, proc.stderr.read() if proc.stderr else "no output"
                lines.append(line.rstrip("\n"))
        yield "\n".join(lines)
        proc.send_signal(signal.SIGINT)
        rc = await trio.to_thread.run_sync(proc.wait, 30)
        assert rc == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


async def _iscsi_targets(portal: str) -> list[str]:
    """The targets an iSCSI SendTargets discovery at "host:port" answers with."""
    host, _, port = portal.rpartition(":")
    found = await discover((host, int(port)), initiator_iqn="iqn.2024-01.test:probe")
    return [t.iqn for t in found]


async def test_cli_serve_prints_endpoints_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    async with _serve_cli(tmp_path, "--json", until="}") as out:
        info = json.loads(out)
        assert info["ca_cert"] is None
        assert info["vms"] == ["app-01", "db-01", "tiny-01", "web-01"]
        assert {u["name"]: u["password"] for u in info["users"]}["admin"] == "nutanix/4u"
        async with httpx.AsyncClient(auth=ADMIN, timeout=10) as c:
            r = await c.get(f"{info['prism_central']}{V3}/users/me")
            assert r.status_code == 200
            pe_url = info["prism_elements"][0]["url"]
            assert (await c.post(f"{pe_url}{V3}/vm_snapshots/list", json={})).status_code == 200
        (pe,) = info["prism_elements"]
        assert pe["iscsi_portal"].startswith(f"{pe['data_services_ip']}:")
        assert await _iscsi_targets(pe["iscsi_portal"]) == []  # no volume group yet


async def test_cli_serve_prints_the_iscsi_portal_to_point_iscsi_port_at(tmp_path: Path) -> None:
    async with _serve_cli(tmp_path, until="Press Ctrl-C to stop.") as out:
        (line,) = [x for x in out.splitlines() if x.startswith("iSCSI portal")]
        portal = line.split()[2]
        assert portal.startswith("127.0.0.102:") and portal != "127.0.0.102:3260"  # --port 0
        assert "sim-cluster-1" in line
        assert await _iscsi_targets(portal) == []  # an iSCSI target, with no VG yet
