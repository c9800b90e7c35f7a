"""The simulator calls a restore to AHV makes, in-process: an empty volume-group disk written
through the store and cloned into a VM on a chosen cluster and container, VM disks from an
uploaded image, per-cluster subnets, power on, the 403 naming the permission, faults."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.hypervisors.conftest import BACKUP, V3, client

from ahvbackup.hypervisors.ahv.simulator import Simulator, pc_app, pe_app
from ahvbackup.hypervisors.ahv.simulator.model import Cluster

MiB = 1 << 20
VG = "/api/nutanix/v2.0/volume_groups"


@pytest.fixture
def sim2(tmp_path: Path) -> Iterator[Simulator]:
    s = Simulator(tmp_path / "state", pe_count=2, task_seconds=0.0, sync=False)
    yield s
    s.close()


def _cluster(sim: Simulator, n: int) -> Cluster:
    return list(sim.clusters.values())[n]


async def _vg_disk(sim: Simulator, pe: httpx.AsyncClient, *, container: str, size: int,
                   data: bytes) -> str:
    vg_uuid = str(uuid.uuid4())
    r = await pe.post(VG, json={"uuid": vg_uuid, "name": "stage", "disk_list": [
        {"create_spec": {"container_uuid": container, "size": size}}]})
    assert r.status_code == 201, r.text
    (disk,) = sim.volume_groups.get(vg_uuid).disks
    assert (disk.size, disk.container_uuid) == (size, container)
    assert sim.store.read(disk.uuid, 0, size) == bytes(size)  # created empty
    sim.store.write(disk.uuid, MiB, data)  # what an iSCSI write does (the LUN's backend)
    return disk.uuid


def _vm_body(name: str, cluster: str, disk_source: dict[str, str], container: str,
             subnet: str) -> dict[str, object]:
    return {"metadata": {"kind": "vm"}, "spec": {
        "name": name, "cluster_reference": {"kind": "cluster", "uuid": cluster},
        "resources": {"num_sockets": 3, "memory_size_mib": 512, "machine_type": "Q35",
                      "disk_list": [{"data_source_reference": disk_source,
                                     "storage_config": {"storage_container_reference": {
                                         "kind": "storage_container", "uuid": container}}}],
                      "nic_list": [{"subnet_reference": {"kind": "subnet", "uuid": subnet}}]}}}


async def test_a_vm_on_the_second_cluster_clones_a_volume_group_disk_and_powers_on(
        sim2: Simulator) -> None:
    sim = sim2
    c2 = _cluster(sim, 1)
    data = os.urandom(256 << 10)
    subnet = next(s for s in sim.subnets.values() if s.cluster_uuid == c2.uuid)
    async with client(pe_app(sim, c2.uuid), f"http://{c2.external_ip}:9440") as pe, \
            client(pc_app(sim), "http://127.0.0.1:9440") as pc:
        vmdisk = await _vg_disk(sim, pe, container=c2.containers[1].uuid, size=4 * MiB + 512,
                                data=data)
        r = await pc.post(f"{V3}/vms", json=_vm_body(
            "restored", c2.uuid, {"kind": "vm_disk", "uuid": vmdisk}, c2.containers[1].uuid,
            subnet.uuid))
        assert r.status_code == 202, r.text
        vm = sim.vms[r.json()["metadata"]["uuid"]]
        assert (vm.cluster_uuid, vm.num_sockets, vm.memory_mib, vm.machine_type) == (
            c2.uuid, 3, 512, "Q35")
        (disk,) = vm.data_disks
        assert (disk.size, disk.container_uuid) == (4 * MiB + 512, c2.containers[1].uuid)
        # the VM's disk is a clone: deleting the volume group keeps it
        for vg in list(sim.volume_groups.groups):
            assert (await pe.delete(f"{VG}/{vg}")).status_code == 201
        assert sim.read_disk(vm.uuid, 0, MiB, len(data)) == data
        assert sim.read_disk(vm.uuid, 0, 0, MiB) == bytes(MiB)
        got = (await pc.get(f"{V3}/vms/{vm.uuid}")).json()
        got.pop("status")
        got["spec"]["resources"]["power_state"] = "ON"
        assert (await pc.put(f"{V3}/vms/{vm.uuid}", json=got)).status_code == 202
        assert sim.vms[vm.uuid].power_state == "ON"
        subnets = (await pc.post(f"{V3}/subnets/list", json={
            "filter": f"cluster_uuid=={c2.uuid}"})).json()["entities"]
        assert sorted((e["spec"]["name"], e["spec"]["resources"]["ip_config"]["subnet_ip"])
                      for e in subnets) == [("backup-net-2", "10.111.0.0"),
                                            ("vlan0-2", "10.11.0.0")]


async def test_a_vm_disk_from_an_uploaded_image(sim: Simulator, pc: httpx.AsyncClient) -> None:
    image = str(uuid.uuid4())
    r = await pc.post(f"{V3}/images", json={"metadata": {"kind": "image", "uuid": image},
                                            "spec": {"name": "up", "resources": {}}})
    assert r.status_code == 202, r.text
    body = os.urandom(MiB) + bytes(MiB)
    assert (await pc.put(f"{V3}/images/{image}/file", content=body)).status_code == 200
    c = _cluster(sim, 0)
    subnet = next(s for s in sim.subnets.values() if s.cluster_uuid == c.uuid)
    r = await pc.post(f"{V3}/vms", json=_vm_body("from-image", c.uuid,
                                                 {"kind": "image", "uuid": image},
                                                 c.containers[0].uuid, subnet.uuid))
    assert r.status_code == 202, r.text
    vm = sim.vms[r.json()["metadata"]["uuid"]]
    assert sim.read_disk(vm.uuid, 0, 0, len(body)) == body


async def test_refusals_of_what_a_cluster_cannot_do(sim2: Simulator) -> None:
    sim = sim2
    c1, c2 = _cluster(sim, 0), _cluster(sim, 1)
    s1 = next(s for s in sim.subnets.values() if s.cluster_uuid == c1.uuid)
    s2 = next(s for s in sim.subnets.values() if s.cluster_uuid == c2.uuid)
    async with client(pe_app(sim, c1.uuid), f"http://{c1.external_ip}:9440") as pe, \
            client(pc_app(sim), "http://127.0.0.1:9440") as pc, \
            client(pc_app(sim), "http://127.0.0.1:9440", auth=BACKUP) as backup:
        vmdisk = await _vg_disk(sim, pe, container=c1.containers[0].uuid, size=MiB * 2,
                                data=b"x" * 512)
        before = set(sim.vms)
        cases = [
            (pc, _vm_body("x", c2.uuid, {"kind": "vm_disk", "uuid": vmdisk},
                          c2.containers[0].uuid, s2.uuid), 422, "on another cluster"),
            (pc, _vm_body("x", c1.uuid, {"kind": "vm_disk", "uuid": vmdisk},
                          c2.containers[0].uuid, s1.uuid), 422, "has no container"),
            (pc, _vm_body("x", c1.uuid, {"kind": "vm_disk", "uuid": vmdisk},
                          c1.containers[0].uuid, s2.uuid), 422, "is not on cluster"),
            (backup, _vm_body("x", c1.uuid, {"kind": "vm_disk", "uuid": vmdisk},
                              c1.containers[0].uuid, s1.uuid), 403,
             "lacks the permission Create_Virtual_Machine"),
        ]
        for who, body, status, said in cases:
            r = await who.post(f"{V3}/vms", json=body)
            assert r.status_code == status, r.text
            (msg,) = r.json()["message_list"]
            assert said in msg["message"], msg
            if status == 403:
                assert msg["details"] == {"permission": "Create_Virtual_Machine"}
        r = await pe.post(VG, json={"name": "bad", "disk_list": [
            {"create_spec": {"container_uuid": c2.containers[0].uuid, "size": MiB}}]})
        assert r.status_code == 422 and "has no container" in r.text
        # faults apply to these calls like any other
        sim.faults.add(method="POST", path=r"/volume_groups$", status=503, count=1)
        r = await pe.post(VG, json={"name": "busy", "disk_list": [
            {"create_spec": {"container_uuid": c1.containers[0].uuid, "size": MiB}}]})
        assert r.status_code == 503
        assert set(sim.vms) == before
