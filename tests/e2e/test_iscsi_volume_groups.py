"""Simulator volume groups over the v2.0 API and its iSCSI target on the DSIP, seen by real
clients: httpx for the API, our initiator and qemu-img (libiscsi) for the data."""

from __future__ import annotations

import os
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from tests.conftest import require_peer
from tests.e2e.e2e_world import MiB

from ahvbackup.hypervisors.ahv.simulator import Simulator, serve_simulator
from ahvbackup.hypervisors.ahv.simulator.model import Disk, Vm
from ahvbackup.hypervisors.ahv.simulator.volume_groups import volume_groups
from ahvbackup.transports.iscsi import IscsiLoginError, IscsiSession, discover

V2 = "/api/nutanix/v2.0/volume_groups"
ME = "iqn.2024-01.test.ahvbackup:reader"


class Cluster:
    def __init__(self, sim: Simulator, api: httpx.AsyncClient, portal: tuple[str, int]) -> None:
        self.sim, self.api, self.portal = sim, api, portal


@pytest.fixture
async def pe(tmp_path: Path) -> AsyncIterator[Cluster]:
    sim = Simulator(tmp_path / "sim", seed=False, task_seconds=0.0, sync=False)
    try:
        async with serve_simulator(sim, port=0, tls=True, iscsi_port=0) as ep:
            (portal,) = ep.iscsi_portals.values()
            tls = ssl.create_default_context(cafile=str(ep.ca_path))
            async with httpx.AsyncClient(base_url=ep.pe_url, verify=tls,
                                         auth=("backup", "backup/4u")) as api:
                yield Cluster(sim, api, portal)
    finally:
        sim.close()


def _vm_with_snapshot(sim: Simulator, size: int) -> tuple[Vm, str, bytes]:
    cluster = next(iter(sim.clusters.values()))
    vm = Vm(uuid=str(uuid.uuid4()), name="vg-src", cluster_uuid=cluster.uuid,
            disks=[Disk(uuid=str(uuid.uuid4()), device_type="DISK", adapter_type="SCSI",
                        device_index=0, size=size, container_uuid=cluster.containers[0].uuid)])
    sim.create_vm(vm)
    data = os.urandom(3 * MiB)
    sim.write_disk(vm.uuid, 0, MiB, data)
    snap = sim.create_vm_snapshot(vm_uuid=vm.uuid, name="s", snapshot_type="CRASH_CONSISTENT",
                                  cluster_uuid=cluster.uuid)
    sim.write_disk(vm.uuid, 0, MiB, bytes(len(data)))  # the live disk moves on
    expect = bytes(MiB) + data + bytes(size - 4 * MiB)
    return vm, snap.files[0].snapshot_file_path, expect


async def _create(pe: Cluster, path: str) -> dict:
    vg_uuid = str(uuid.uuid4())
    r = await pe.api.post(V2, json={"uuid": vg_uuid, "name": "bkp", "disk_list": [
        {"vmdisk_clone_spec": {"snapshot_file_path": path}}]})
    assert r.status_code == 201, r.text
    assert r.json()["task_uuid"]
    r = await pe.api.get(f"{V2}/{vg_uuid}")
    assert r.status_code == 200
    return r.json()


async def test_vg_cloned_from_a_snapshot_serves_the_snapshot_to_attached_initiators_only(
        pe: Cluster) -> None:
    _vm, path, expect = _vm_with_snapshot(pe.sim, 8 * MiB)
    vg = await _create(pe, path)
    assert vg["disk_list"][0]["vmdisk_size_bytes"] == len(expect)
    assert vg["attachment_list"] == []
    listed = (await pe.api.get(V2)).json()["entities"]
    assert [(e["uuid"], e["iscsi_target"]) for e in listed] == [(vg["uuid"],
                                                                 vg["iscsi_target"])]
    target = vg["iscsi_target"]
    # not attached: not even discoverable, and a login is refused
    assert await discover(pe.portal, initiator_iqn=ME) == []
    with pytest.raises(IscsiLoginError, match="authorization failure"):
        async with IscsiSession.connect(portal=pe.portal, target_iqn=target, initiator_iqn=ME):
            pass
    r = await pe.api.post(f"{V2}/{vg['uuid']}/open",
                          json={"iscsi_client": {"client_address": ME}, "operation": "ATTACH"})
    assert r.json() == {"value": True}
    assert (await pe.api.get(f"{V2}/{vg['uuid']}")).json()["attachment_list"] == [
        {"iscsi_initiator_name": ME, "client_address": ME}]
    assert [t.iqn for t in await discover(pe.portal, initiator_iqn=ME)] == [target]
    async with IscsiSession.connect(portal=pe.portal, target_iqn=target, initiator_iqn=ME) as s:
        assert s.size == len(expect)
        buf = bytearray(s.size)
        await s.read_into(0, memoryview(buf))
        assert buf == expect  # the snapshot's bytes, not the live disk's
        # detaching drops the session; the next login is refused
        r = await pe.api.post(f"{V2}/{vg['uuid']}/close", json={
            "iscsi_client": {"client_address": ME}, "operation": "DETACH"})
        assert r.json() == {"value": True}
        with pytest.raises(IscsiLoginError, match="authorization failure"):
            await s.read_into(0, memoryview(bytearray(4096)))
    r = await pe.api.delete(f"{V2}/{vg['uuid']}")
    assert r.status_code == 201
    assert (await pe.api.get(f"{V2}/{vg['uuid']}")).status_code == 404
    assert (await pe.api.get(V2)).json()["entities"] == []


async def test_deleting_a_vg_drops_its_live_sessions(pe: Cluster) -> None:
    _vm, path, _expect = _vm_with_snapshot(pe.sim, 4 * MiB)
    vg = await _create(pe, path)
    await pe.api.post(f"{V2}/{vg['uuid']}/open", json={"iscsi_client": {"client_address": ME}})
    async with IscsiSession.connect(portal=pe.portal, target_iqn=vg["iscsi_target"],
                                    initiator_iqn=ME, reconnect_attempts=1) as s:
        await s.read_into(0, memoryview(bytearray(4096)))
        r = await pe.api.delete(f"{V2}/{vg['uuid']}")
        assert r.status_code == 201, r.text
        with pytest.raises(IscsiLoginError, match="target not found"):
            await s.read_into(0, memoryview(bytearray(4096)))


async def test_qemu_img_reads_a_vg_through_the_simulator_portal(pe: Cluster,
                                                                tmp_path: Path) -> None:
    require_peer("qemu-img")
    _vm, path, expect = _vm_with_snapshot(pe.sim, 6 * MiB)
    vg = await _create(pe, path)
    await pe.api.post(f"{V2}/{vg['uuid']}/open", json={"iscsi_client": {"client_address": ME}})
    host, port = pe.portal
    out = tmp_path / "vg.raw"
    r = await trio.run_process(
        ["qemu-img", "convert", "-O", "raw", "--image-opts",
         f"driver=iscsi,transport=tcp,portal={host}:{port},target={vg['iscsi_target']},lun=0,"
         f"initiator-name={ME}", str(out)],
        capture_stdout=True, capture_stderr=True, check=False)
    assert r.returncode == 0, r.stderr.decode()
    assert out.read_bytes() == expect


async def test_bad_requests_name_the_field(pe: Cluster) -> None:
    r = await pe.api.post(V2, json={"name": "x", "disk_list": [{"vmdisk_clone_spec": {}}]})
    assert r.status_code == 422
    assert "disk_list[0].vmdisk_clone_spec" in r.text
    r = await pe.api.post(V2, json={"name": "x", "disk_list": [
        {"vmdisk_clone_spec": {"snapshot_file_path": "/nope/.snapshot/1/x"}}]})
    assert r.status_code == 404
    vg = await _create(pe, _vm_with_snapshot(pe.sim, 4 * MiB)[1])
    r = await pe.api.post(f"{V2}/{vg['uuid']}/open", json={"iscsi_client": {}})
    assert r.status_code == 422 and "client_address" in r.text
    r = await pe.api.post(f"{V2}/{vg['uuid']}/open",
                          json={"iscsi_client": {"client_address": ME}, "operation": "DETACH"})
    assert r.status_code == 422


async def test_viewer_may_not_create_volume_groups(pe: Cluster) -> None:
    r = await pe.api.post(V2, json={"name": "x", "disk_list": []},
                          auth=("viewer", "viewer/4u"))
    assert r.status_code == 403


def test_volume_groups_survive_a_restart(tmp_path: Path) -> None:
    sim = Simulator(tmp_path / "sim", seed=False, task_seconds=0.0, sync=False)
    try:
        _vm, path, expect = _vm_with_snapshot(sim, 4 * MiB)
        cluster = next(iter(sim.clusters))
        vg = volume_groups(sim).create(cluster_uuid=cluster, name="keep",
                                       disks=[{"clone_from": path}])
        volume_groups(sim).attach(vg.uuid, ME)
    finally:
        sim.close()
    again = Simulator(tmp_path / "sim", task_seconds=0.0, sync=False)
    try:
        got = volume_groups(again).get(vg.uuid)
        assert got.iscsi_target == vg.iscsi_target and got.attachments == [ME]
        assert again.store.read(got.disks[0].uuid, 0, len(expect)) == expect
    finally:
        again.close()
