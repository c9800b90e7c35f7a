"""The official v4 Python SDKs, unmodified, as the judge of the simulator's v4 API.

The simulator is served over HTTPS with its own CA; each SDK (``ntnx-*-py-client``, test
dependencies in requirements-dev.txt) makes real calls and deserialises every answer through its
own models. ``modelled`` then walks the result: every object must have become a model (no
``$objectType`` dict the SDK could not place), no field may be unknown to the model, and no enum
may have fallen back to ``$UNKNOWN``. SDK calls are blocking (urllib3); they run in a thread while
trio serves.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from tests.conftest import peers_required

from ahvbackup.hypervisors.ahv.simulator import Endpoints, Simulator, serve_simulator
from ahvbackup.transports.iscsi.initiator import IscsiSession, discover


def _sdk(name: str) -> Any:
    """An SDK package (requirements-dev.txt): skipped when missing, but failed under CI."""
    if peers_required():
        return importlib.import_module(name)
    return pytest.importorskip(name)


ntnx_vmm = _sdk("ntnx_vmm_py_client")
ntnx_cm = _sdk("ntnx_clustermgmt_py_client")
ntnx_dp = _sdk("ntnx_dataprotection_py_client")
ntnx_vol = _sdk("ntnx_volumes_py_client")
ntnx_prism = _sdk("ntnx_prism_py_client")

T = TypeVar("T")
IQN = "iqn.2024-01.test.sdk:backup"


@dataclass
class Served:
    sim: Simulator
    ep: Endpoints

    def client(self, pkg: Any, *, pe: bool = False, user: tuple[str, str] | None = ("admin",
               "nutanix/4u")) -> Any:
        c = pkg.Configuration()
        url = self.ep.pe_url if pe else self.ep.pc_url
        c.host = url.split("://", 1)[1].rsplit(":", 1)[0]
        c.port = self.ep.port
        c.scheme = "https"
        c.verify_ssl = True
        c.root_ca_certificate_file = str(self.ep.ca_path)
        if user is not None:
            c.username, c.password = user
        c.max_retry_attempts = 1
        c.backoff_factor = 0
        return pkg.ApiClient(configuration=c)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    sim = Simulator(tmp_path / "sim", task_seconds=0.05, sync=False)
    try:
        async with serve_simulator(sim, port=0, tls=True) as ep:
            yield Served(sim, ep)
    finally:
        sim.close()


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


def modelled(obj: Any, where: str = "answer") -> Any:
    """Fail unless ``obj`` deserialised wholly into the SDK's models; returns it."""
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            modelled(item, f"{where}[{i}]")
    elif isinstance(obj, dict):
        assert "$objectType" not in obj, f"{where}: left as a dict, $objectType unknown: {obj}"
        for k, v in obj.items():
            modelled(v, f"{where}.{k}")
    elif isinstance(obj, str):
        assert obj != "$UNKNOWN", f"{where}: an enum value the SDK does not know"
    elif hasattr(obj, "swagger_types"):
        unknown = {k: v for k, v in (obj.get_unknown_fields() or {}).items()
                   if not k.startswith("$")}  # $dataItemDiscriminator etc. are not modelled
        assert not unknown, f"{where} ({type(obj).__name__}): fields unknown to the model: " \
                            f"{sorted(unknown)}"
        for attr in obj.swagger_types:
            if not attr.startswith("_"):
                modelled(getattr(obj, attr), f"{where}.{obj.attribute_map[attr]}")
    return obj


async def wait_task(prism: Any, ext_id: str) -> Any:
    """Poll a task with the prism SDK until it is final; returns it (states seen checked)."""
    api = ntnx_prism.TasksApi(api_client=prism)
    seen = []
    for _ in range(200):
        task = modelled((await call(api.get_task_by_id, ext_id)).data)
        seen.append(task.status)
        if task.status in ("SUCCEEDED", "FAILED"):
            assert set(seen) <= {"QUEUED", "RUNNING", "SUCCEEDED", "FAILED"}
            return task
        await trio.sleep(0.01)
    raise AssertionError(f"task {ext_id} never finished: {seen}")


def affected(task: Any, rel: str) -> str:
    return next(e.ext_id for e in task.entities_affected if e.rel == rel)


async def test_vmm_clustermgmt_prism_list_get_power_create(served: Served) -> None:
    pc_vmm = served.client(ntnx_vmm)
    prism = served.client(ntnx_prism)
    vms = ntnx_vmm.VmApi(api_client=pc_vmm)

    listed = modelled(await call(vms.list_vms, _limit=2))
    assert listed.metadata.total_available_results == 4
    assert len(listed.data) == 2 and {link.rel for link in listed.metadata.links} >= {"next"}
    page = modelled(await call(vms.list_vms, _filter="name eq 'db-01'"))
    [db] = page.data
    assert isinstance(db, ntnx_vmm.AhvConfigVm) and db.power_state == "ON"
    assert [d.backing_info.disk_size_bytes for d in db.disks] == [1 << 30, 8 << 30, 256 << 20]
    assert isinstance(db.disks[0].backing_info, ntnx_vmm.AhvConfigVmDisk)

    got = modelled(await call(vms.get_vm_by_id, db.ext_id))
    etag = ntnx_vmm.ApiClient.get_etag(got.data)
    assert etag
    task_ref = modelled(await call(vms.power_off_vm, db.ext_id, if_match=etag)).data
    task = await wait_task(prism, task_ref.ext_id)
    assert task.status == "SUCCEEDED"
    assert affected(task, "vmm:ahv:config:vm") == db.ext_id
    assert (await call(vms.get_vm_by_id, db.ext_id)).data.power_state == "OFF"

    clusters = modelled(await call(ntnx_cm.ClustersApi(api_client=served.client(ntnx_cm))
                                   .list_clusters))
    aos = [c for c in clusters.data if "AOS" in c.config.cluster_function]
    [pcs] = [c for c in clusters.data if "PRISM_CENTRAL" in c.config.cluster_function]
    assert pcs.ext_id == served.sim.pc_uuid
    cluster = served.sim.cluster(aos[0].ext_id)
    assert aos[0].network.external_data_service_ip.ipv4.value == cluster.dsip
    assert aos[0].network.external_address.ipv4.value == cluster.external_ip

    subnet = next(iter(served.sim.subnets.values()))
    new = ntnx_vmm.AhvConfigVm(
        name="sdk-made", num_sockets=2, num_cores_per_socket=1, memory_size_bytes=2 << 30,
        cluster=ntnx_vmm.AhvConfigClusterReference(ext_id=aos[0].ext_id),
        disks=[ntnx_vmm.AhvConfigDisk(
            disk_address=ntnx_vmm.AhvConfigDiskAddress(bus_type="SCSI", index=0),
            backing_info=ntnx_vmm.AhvConfigVmDisk(disk_size_bytes=64 << 20))],
        nics=[ntnx_vmm.AhvConfigNic(network_info=ntnx_vmm.AhvConfigNicNetworkInfo(
            subnet=ntnx_vmm.SubnetReference(ext_id=subnet.uuid)))],
    )
    created = modelled(await call(vms.create_vm, new)).data
    task = await wait_task(prism, created.ext_id)
    made = modelled((await call(vms.get_vm_by_id, affected(task, "vmm:ahv:config:vm"))).data)
    assert (made.name, made.num_sockets, made.memory_size_bytes) == ("sdk-made", 2, 2 << 30)
    assert made.disks[0].backing_info.disk_size_bytes == 64 << 20
    assert made.nics[0].network_info.subnet.ext_id == subnet.uuid
    # the SDKs negotiated their version first (and kept their own: the simulator serves it)
    assert served.sim.stats.requests["pc OPTIONS /api/{ns}/unversioned/info"] >= 3
    assert served.sim.stats.requests["pc GET /api/vmm/{version:v4ver}/ahv/config/vms"] == 2


async def test_recovery_points_changed_regions_vg_restore(served: Served) -> None:
    sim = served.sim
    db = sim.find_vm("db-01")
    prism = served.client(ntnx_prism)
    rps = ntnx_dp.RecoveryPointsApi(api_client=served.client(ntnx_dp))

    async def make_rp(name: str) -> Any:
        spec = ntnx_dp.RecoveryPoint(
            name=name, recovery_point_type="CRASH_CONSISTENT",
            expiration_time=dt.datetime.now(dt.UTC) + dt.timedelta(days=1),
            vm_recovery_points=[ntnx_dp.VmRecoveryPoint(vm_ext_id=db.uuid)])
        ref = modelled(await call(rps.create_recovery_point, spec)).data
        task = await wait_task(prism, ref.ext_id)
        assert task.status == "SUCCEEDED"
        rp_id = affected(task, "dataprotection:config:recovery-point")
        return modelled((await call(rps.get_recovery_point_by_id, rp_id)).data)

    full = await make_rp("full")
    assert full.status == "COMPLETE"
    [vm_rp] = full.vm_recovery_points
    assert vm_rp.vm_ext_id == db.uuid and len(vm_rp.disk_recovery_points) == 3
    got = modelled(await call(rps.get_vm_recovery_point_by_id, full.ext_id, vm_rp.ext_id)).data
    assert got.disk_recovery_points[1].disk_ext_id == db.data_disks[1].uuid
    listed = modelled(await call(rps.list_recovery_points))
    assert [p.ext_id for p in listed.data] == [full.ext_id]

    sim.write_disk(db.uuid, 1, 3 << 20, b"\x5a" * 65536)
    incr = await make_rp("incr")
    [incr_vm] = incr.vm_recovery_points
    drp = incr_vm.disk_recovery_points[1].disk_recovery_point_ext_id
    ref_drp = vm_rp.disk_recovery_points[1].disk_recovery_point_ext_id

    discover_spec = ntnx_dp.ClusterDiscoverSpec(
        operation="COMPUTE_CHANGED_REGIONS",
        spec=ntnx_dp.ComputeChangedRegionsClusterDiscoverSpec(
            disk_recovery_point=ntnx_dp.VmDiskRecoveryPointReference(
                recovery_point_ext_id=incr.ext_id, vm_recovery_point_ext_id=incr_vm.ext_id,
                disk_recovery_point_ext_id=drp),
            reference_disk_recovery_point=ntnx_dp.VmDiskRecoveryPointReference(
                recovery_point_ext_id=full.ext_id, vm_recovery_point_ext_id=vm_rp.ext_id,
                disk_recovery_point_ext_id=ref_drp)))
    info = modelled(await call(rps.discover_cluster_for_recovery_point_id, incr.ext_id,
                               discover_spec)).data
    assert info.cluster_ip.ipv4.value == "127.0.0.2"

    pe_client = served.client(ntnx_dp, pe=True, user=None)  # the JWT is the only credential
    pe_client.add_default_header("Cookie", f"NTNX_IGW_SESSION={info.jwt_token}")
    pe_rps = ntnx_dp.RecoveryPointsApi(api_client=pe_client)
    changed = modelled(await call(
        pe_rps.vm_recovery_point_compute_changed_regions, incr.ext_id, incr_vm.ext_id, drp,
        ntnx_dp.VmRecoveryPointChangedRegionsComputeSpec(
            offset=0, block_size_byte=65536, reference_recovery_point_ext_id=full.ext_id,
            reference_vm_recovery_point_ext_id=vm_rp.ext_id,
            reference_disk_recovery_point_ext_id=ref_drp)))
    regular = [(r.offset, r.length) for r in changed.data if r.region_type == "REGULAR"]
    assert regular == [(3 << 20, 65536)]
    assert all(isinstance(r, ntnx_dp.ChangedRegion) for r in changed.data)
    # a second call on the same client goes on with the cookie the PE set (the JWT again)
    again = await call(pe_rps.vm_recovery_point_compute_changed_regions, incr.ext_id,
                       incr_vm.ext_id, drp, ntnx_dp.VmRecoveryPointChangedRegionsComputeSpec())
    assert sum(r.length for r in again.data) == 8 << 30  # no reference: the whole disk tiled

    # a VG whose disk is the disk recovery point, attached to an iSCSI client
    vol = served.client(ntnx_vol)
    vgs = ntnx_vol.VolumeGroupsApi(api_client=vol)
    cluster = db.cluster_uuid
    vg_task = modelled(await call(vgs.create_volume_group, ntnx_vol.VolumeGroup(
        name="bkp-sdk", cluster_reference=cluster, usage_type="BACKUP_TARGET", is_hidden=True,
        sharing_status="SHARED"))).data
    vg_id = affected(await wait_task(prism, vg_task.ext_id), "volumes:config:volume-group")
    disk_task = modelled(await call(vgs.create_volume_disk, vg_id, ntnx_vol.VolumeDisk(
        disk_data_source_reference=ntnx_vol.EntityReference(
            ext_id=drp, entity_type="DISK_RECOVERY_POINT")))).data
    await wait_task(prism, disk_task.ext_id)
    vg = modelled((await call(vgs.get_volume_group_by_id, vg_id)).data)
    assert (vg.usage_type, vg.is_hidden, vg.cluster_reference) == ("BACKUP_TARGET", True, cluster)
    [disk] = modelled((await call(vgs.list_volume_disks_by_volume_group_id, vg_id)).data)
    assert disk.disk_size_bytes == 8 << 30
    assert disk.disk_data_source_reference.entity_type == "DISK_RECOVERY_POINT"
    assert sim.store.read(disk.ext_id, 3 << 20, 4) == b"\x5a" * 4

    attach = modelled(await call(vgs.attach_iscsi_client, vg_id,
                                 ntnx_vol.IscsiClient(iscsi_initiator_name=IQN))).data
    await wait_task(prism, attach.ext_id)
    [att] = modelled((await call(vgs.list_external_iscsi_attachments_by_volume_group_id,
                                 vg_id)).data)
    client = modelled((await call(ntnx_vol.IscsiClientsApi(api_client=vol)
                                  .get_iscsi_client_by_id, att.ext_id)).data)
    [target] = client.attached_targets
    portal = served.ep.iscsi_portals[cluster]
    offered = await discover(portal, initiator_iqn=IQN)
    assert target.iscsi_target_name in {t.iqn for t in offered}
    async with IscsiSession.connect(portal=portal, target_iqn=target.iscsi_target_name,
                                    initiator_iqn=IQN) as lun:
        buf = bytearray(65536)
        await lun.read_into(3 << 20, memoryview(buf))
        assert bytes(buf) == b"\x5a" * 65536  # the incremental's data, read over iSCSI
    detach = modelled(await call(vgs.detach_iscsi_client, vg_id, ntnx_vol.IscsiClientAttachment(
        ext_id=att.ext_id))).data
    await wait_task(prism, detach.ext_id)
    assert target.iscsi_target_name not in {t.iqn for t in await discover(portal,
                                                                            initiator_iqn=IQN)}
    delete = modelled(await call(vgs.delete_volume_group_by_id, vg_id)).data
    await wait_task(prism, delete.ext_id)
    assert vg_id not in sim.volume_groups.groups

    # restore the full recovery point as a new VM, then retire both recovery points
    restore = modelled(await call(rps.restore_recovery_point, full.ext_id,
                                  ntnx_dp.RecoveryPointRestorationSpec(
                                      vm_recovery_point_restore_overrides=[
                                          ntnx_dp.VmRecoveryPointRestoreOverride(
                                              vm_recovery_point_ext_id=vm_rp.ext_id,
                                              vm_override_spec=ntnx_dp.AhvVmOverrideSpec(
                                                  name="db-01-restored"))]))).data
    new_vm = affected(await wait_task(prism, restore.ext_id), "vmm:ahv:config:vm")
    restored = sim.vm(new_vm)
    assert restored.name == "db-01-restored" and restored.power_state == "OFF"
    assert sim.read_disk(new_vm, 1, 3 << 20, 4) == db_disk_before(sim, full, 1)
    for rp in (full, incr):
        await wait_task(prism, modelled(await call(rps.delete_recovery_point_by_id,
                                                   rp.ext_id)).data.ext_id)
    assert not sim.recovery_points.points


def db_disk_before(sim: Simulator, rp: Any, index: int) -> bytes:
    """4 bytes at 3 MiB of disk ``index`` as the recovery point holds them."""
    v = sim.recovery_points.get(rp.ext_id).vms[0]
    snap = sim.snapshot(v.snapshot_uuid)
    return sim.read_snapshot_disk(snap.uuid, snap.files[index].vmdisk_uuid, 3 << 20, 4)


async def test_errors_rbac_version_switch_through_the_sdk(served: Served) -> None:
    vms = ntnx_vmm.VmApi(api_client=served.client(ntnx_vmm))
    with pytest.raises(ntnx_vmm.rest.ApiException) as err:
        await call(vms.get_vm_by_id, "00000000-0000-4000-8000-000000000000")
    assert err.value.status == 404
    body = ntnx_vmm.ApiClient().deserialize(json.loads(err.value.body),
                                            "vmm.v4.ahv.config.GetVmApiResponse")
    error = modelled(body).data
    assert isinstance(error, ntnx_vmm.ErrorResponse)
    [msg] = error.error
    assert msg.severity == "ERROR" and "not found" in msg.message

    db = served.sim.find_vm("db-01")
    etag = ntnx_vmm.ApiClient.get_etag((await call(vms.get_vm_by_id, db.uuid)).data)
    viewer = ntnx_vmm.VmApi(api_client=served.client(ntnx_vmm, user=("viewer", "viewer/4u")))
    with pytest.raises(ntnx_vmm.rest.ApiException) as err:
        await call(viewer.power_off_vm, db.uuid, if_match=etag)
    assert err.value.status == 403
    with pytest.raises(ntnx_vmm.rest.ApiException) as err:
        await call(vms.power_off_vm, db.uuid, if_match='"stale"')
    assert err.value.status == 412

    # PE-only on PC: compute-changed-regions is not routed there
    pc_rps = ntnx_dp.RecoveryPointsApi(api_client=served.client(ntnx_dp))
    with pytest.raises(ntnx_dp.rest.ApiException) as err:
        await call(pc_rps.vm_recovery_point_compute_changed_regions, "a", "b", "c",
                   ntnx_dp.VmRecoveryPointChangedRegionsComputeSpec())
    assert err.value.status == 404

    served.sim.v4 = False  # a Prism that speaks only v3
    with pytest.raises(ntnx_vmm.rest.ApiException) as err:
        await call(vms.list_vms)
    assert err.value.status == 404


def test_the_judge_catches_what_the_models_do_not_know() -> None:
    api = ntnx_vmm.ApiClient()
    ok = {"data": {"extId": "x", "name": "a", "$objectType": "vmm.v4.ahv.config.Vm"},
          "$dataItemDiscriminator": "vmm.v4.ahv.config.Vm"}
    modelled(api.deserialize(json.loads(json.dumps(ok)), "vmm.v4.ahv.config.GetVmApiResponse"))
    extra = {"data": {**ok["data"], "vmDiskUuid": "y"}}
    with pytest.raises(AssertionError, match="vmDiskUuid"):
        modelled(api.deserialize(extra, "vmm.v4.ahv.config.GetVmApiResponse"))
    untyped = {"data": {"extId": "x", "$objectType": "vmm.v4.ahv.config.NoSuchThing"}}
    with pytest.raises(AssertionError, match="left as a dict"):
        modelled(api.deserialize(untyped, "vmm.v4.ahv.config.GetVmApiResponse"))
