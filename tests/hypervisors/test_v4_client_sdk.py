"""The v4 calls a restore through v4 makes that the simulator serves for it (add a VM disk
cloned from a volume-group disk, delete the VM, list storage containers), judged by the
official SDKs' models as the other v4 routes are (tests/hypervisors/test_simulator_v4_sdk.py)."""

from __future__ import annotations

from tests.hypervisors.test_simulator_v4_sdk import (
    Served,
    affected,
    call,
    modelled,
    ntnx_cm,
    ntnx_prism,
    ntnx_vmm,
    ntnx_vol,
    wait_task,
)
from tests.hypervisors.test_simulator_v4_sdk import served as served_sim  # noqa: F401

MiB = 1 << 20


async def test_a_vm_gets_a_clone_of_a_vg_disk_and_is_deleted(
        served_sim: Served) -> None:  # noqa: F811 - the imported fixture
    sim = served_sim.sim
    prism = served_sim.client(ntnx_prism)
    vms = ntnx_vmm.VmApi(api_client=served_sim.client(ntnx_vmm))
    vgs = ntnx_vol.VolumeGroupsApi(api_client=served_sim.client(ntnx_vol))
    cluster = next(iter(sim.clusters.values()))
    task = modelled(await call(vms.create_vm, ntnx_vmm.AhvConfigVm(
        name="sdk-restore", num_sockets=1, memory_size_bytes=1 << 30,
        cluster=ntnx_vmm.AhvConfigClusterReference(ext_id=cluster.uuid)))).data
    vm_id = affected(await wait_task(prism, task.ext_id), "vmm:ahv:config:vm")
    task = modelled(await call(vgs.create_volume_group, ntnx_vol.VolumeGroup(
        name="staging", cluster_reference=cluster.uuid, usage_type="TEMPORARY",
        disks=[ntnx_vol.VolumeDisk(index=0, disk_size_bytes=4 * MiB)]))).data
    vg_id = affected(await wait_task(prism, task.ext_id), "volumes:config:volume-group")
    [vg_disk] = modelled((await call(vgs.list_volume_disks_by_volume_group_id, vg_id)).data)
    sim.store.write(vg_disk.ext_id, MiB, b"\x42" * 4096)

    task = modelled(await call(vms.create_disk, vm_id, ntnx_vmm.AhvConfigDisk(
        disk_address=ntnx_vmm.AhvConfigDiskAddress(bus_type="SCSI", index=2),
        backing_info=ntnx_vmm.AhvConfigVmDisk(data_source=ntnx_vmm.DataSource(
            reference=ntnx_vmm.VolumeDiskReference(disk_ext_id=vg_disk.ext_id,
                                                   volume_group_ext_id=vg_id)))))).data
    assert (await wait_task(prism, task.ext_id)).status == "SUCCEEDED"
    vm = modelled((await call(vms.get_vm_by_id, vm_id)).data)
    [disk] = vm.disks
    assert (disk.disk_address.bus_type, disk.disk_address.index) == ("SCSI", 2)
    assert disk.backing_info.disk_size_bytes == 4 * MiB
    assert sim.read_disk(vm_id, 0, MiB, 4096) == b"\x42" * 4096  # a clone of the VG disk

    task = modelled(await call(vms.delete_vm_by_id, vm_id)).data
    assert (await wait_task(prism, task.ext_id)).status == "SUCCEEDED"
    assert vm_id not in sim.vms


async def test_storage_containers_list_by_cluster(
        served_sim: Served) -> None:  # noqa: F811 - the imported fixture
    sim = served_sim.sim
    api = ntnx_cm.StorageContainersApi(api_client=served_sim.client(ntnx_cm))
    listed = modelled(await call(api.list_storage_containers))
    want = {(k.uuid, k.name, c.uuid) for c in sim.clusters.values() for k in c.containers}
    assert {(x.container_ext_id, x.name, x.cluster_ext_id) for x in listed.data} == want
    one = next(iter(sim.clusters.values()))
    only = modelled(await call(api.list_storage_containers,
                               _filter=f"clusterExtId eq '{one.uuid}'"))
    assert {x.name for x in only.data} == {k.name for k in one.containers}
