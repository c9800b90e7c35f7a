"""Prism v3 behind the `PrismApi` seam: what the ahv driver did before v4.

Snapshots are PE backup snapshots (`/vm_snapshots`), the region map comes from PE changed
regions, the iSCSI path reads a PE v2.0 volume group cloned from the snapshot file and the REST
path an image cloned from it (`nfs://<cluster>/<snapshot file path>`). Every snapshot and image
is recorded on the ledger under an id we choose *before* asking Prism to create it, so a job
killed between the request and the answer still leaves a record the next run can release.
"""

from __future__ import annotations

__all__ = ["V3Api", "vm_info"]

import copy
import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from ahvbackup.core.drivers import (
    ClusterPlace,
    DiskStage,
    HttpSource,
    HttpUpload,
    IscsiSource,
    Network,
    NewDisk,
    NewVm,
)
from ahvbackup.core.errors import ApiNotFoundError, HypervisorError
from ahvbackup.core.ledger import Record, ReleaseStack
from ahvbackup.core.model import DiskInfo, DiskSnapshot, Region, VmInfo, VmSnapshot

from . import volume_groups as vgs
from .client import Cluster, Prism, Vm

log = logging.getLogger("ahvbackup.ahv")

SNAPSHOT_TIMEOUT = 900.0
VM_TIMEOUT = 900.0
IMAGE_TIMEOUT = 900.0
VG_TIMEOUT = 900.0
#: first poll of a task or snapshot; it backs off to the client's cap from there
POLL = 0.1


def vm_info(vm: Vm, clusters: dict[str, Cluster]) -> VmInfo:
    cluster = clusters.get(vm.cluster_uuid)
    project = (vm.raw.get("metadata") or {}).get("project_reference") or {}
    disks = tuple(
        DiskInfo(
            uuid=d.uuid, bus=d.adapter_type, index=d.device_index, size=d.size_bytes,
            container=d.container_name or d.container_uuid or "",
        )
        for d in vm.data_disks
    )
    return VmInfo(
        uuid=vm.uuid, name=vm.name, cluster_uuid=vm.cluster_uuid,
        cluster_name=cluster.name if cluster else vm.cluster_uuid, disks=disks,
        app_consistent_capable=bool(vm.ngt and vm.ngt.can_quiesce),
        config=dict(vm.raw),
        project_uuid=str(project.get("uuid") or ""), project_name=str(project.get("name") or ""),
    )


class V3Api:
    """Prism v3 (PC), the PE v3 backup calls and PE v2.0 volume groups."""

    version = "v3"

    def __init__(self, prism: Prism) -> None:
        self.prism = prism
        self._clusters: dict[str, Cluster] = {}
        self._snapshot_cluster: dict[str, str] = {}

    async def clusters(self) -> dict[str, Cluster]:
        if not self._clusters:
            self._clusters = {c.uuid: c for c in await self.prism.pc.aos_clusters()}
            self.prism.remember(self._clusters.values())
        return self._clusters

    async def list_vms(self) -> list[VmInfo]:
        clusters = await self.clusters()
        return [vm_info(vm, clusters) for vm in await self.prism.pc.list_vms()]

    async def snapshot_vm(
        self, vm: VmInfo, *, application_consistent: bool, name: str, stack: ReleaseStack
    ) -> VmSnapshot:
        pe = await self.prism.pe(vm.cluster_uuid)
        snap_id = str(uuid.uuid4())
        stack.record("snapshot", snap_id, cluster=vm.cluster_uuid, vm=vm.name, api="v3")
        self._snapshot_cluster[snap_id] = vm.cluster_uuid
        kind = "APPLICATION_CONSISTENT" if application_consistent else "CRASH_CONSISTENT"
        await pe.create_vm_snapshot(vm.uuid, name=name, snapshot_type=kind, uuid=snap_id)
        snap = await pe.wait_vm_snapshot(snap_id, timeout=SNAPSHOT_TIMEOUT, poll=POLL)
        files = {f.vmdisk_uuid: f.snapshot_file_path for f in snap.files}
        missing = [d.label for d in vm.disks if d.uuid not in files]
        if missing:
            raise HypervisorError(
                f"VM {vm.name}: snapshot {snap_id} has no file for disk(s) {', '.join(missing)}"
            )
        return VmSnapshot(
            id=snap_id, vm_uuid=vm.uuid, cluster_uuid=vm.cluster_uuid,
            consistency="application" if application_consistent else "crash",
            disks=tuple(
                DiskSnapshot(disk=d, snapshot_id=snap_id, handle=files[d.uuid], size=d.size)
                for d in vm.disks
            ),
        )

    async def regions(
        self, disk: DiskSnapshot, *, reference: str | None = None
    ) -> AsyncIterator[Region]:
        pe = await self.prism.pe(self._cluster_of(disk))
        async for r in pe.changed_regions(disk.handle, reference=reference, end=disk.size):
            yield Region(r.offset, r.length, zero=r.type == "ZEROED")

    def _cluster_of(self, disk: DiskSnapshot) -> str:
        cluster = self._snapshot_cluster.get(disk.snapshot_id)
        if cluster is None:
            raise HypervisorError(f"snapshot {disk.snapshot_id} was not taken in this session")
        return cluster

    async def stage_http(self, disk: DiskSnapshot, *, stack: ReleaseStack) -> HttpSource:
        cluster = (await self.clusters()).get(self._cluster_of(disk))
        if cluster is None or not cluster.external_ip:
            raise HypervisorError(f"disk {disk.disk.label}: its cluster has no external IP")
        pc = self.prism.pc
        image_id = str(uuid.uuid4())
        stack.record("image", image_id, cluster=cluster.uuid, disk=disk.disk.label,
                     api="v3")
        created = await pc.create_image(
            f"ahvbackup-{disk.snapshot_id[:8]}-{disk.disk.label}", uuid=image_id,
            source_uri=f"nfs://{cluster.external_ip}{disk.handle}", cluster_uuid=cluster.uuid,
            description="temporary: ahvbackup REST read of a snapshot disk",
        )
        if created.task_uuid:
            await pc.wait_task(created.task_uuid, timeout=IMAGE_TIMEOUT, poll=POLL,
                                  expect="image create")
        # no GET of the image: a clone of the snapshot file is the disk's size, and the
        # ranged reads check what the image serves
        headers, ssl_context = pc.data_access()
        return HttpSource(
            url=pc.image_file_url(image_id), size=disk.size,
            headers=headers, ssl_context=ssl_context,
        )

    async def stage_image(self, vmdisk_uuid: str, *, cluster_uuid: str, name: str, label: str,
                          size: int, stack: ReleaseStack) -> HttpSource:
        """An image cloned from a VM disk (`data_source_reference` kind `vm_disk`), readable
        over HTTP ranges: the REST path of v4, which has no byte read of its own."""
        pc = self.prism.pc
        image_id = str(uuid.uuid4())
        stack.record("image", image_id, cluster=cluster_uuid, disk=label, api="v3")
        created = await pc.create_image(
            name, uuid=image_id, data_source={"kind": "vm_disk", "uuid": vmdisk_uuid},
            cluster_uuid=cluster_uuid, description="temporary: ahvbackup REST read of a disk")
        if created.task_uuid:
            await pc.wait_task(created.task_uuid, timeout=IMAGE_TIMEOUT, poll=POLL,
                                  expect="image create")
        headers, ssl_context = pc.data_access()  # no GET: the clone is `size` bytes
        return HttpSource(url=pc.image_file_url(image_id), size=size,
                          headers=headers, ssl_context=ssl_context)

    async def stage_iscsi(
        self, disks: Sequence[DiskSnapshot], *, initiator_iqn: str, portal: tuple[str, int],
        stack: ReleaseStack,
    ) -> tuple[IscsiSource, ...]:
        """One volume group cloned from the snapshot's disks (LUN i is `disks[i]`), attached
        to `initiator_iqn`: five calls (create, its task, the VG for its target, attach,
        and, at release, detach and delete with its task) whatever the disk count."""
        if not disks:
            return ()
        first = disks[0]
        cluster_uuid = self._cluster_of(first)
        pe = await self.prism.pe(cluster_uuid)
        vg_id = str(uuid.uuid4())
        labels = ",".join(d.disk.label for d in disks)
        stack.record("volume_group", vg_id, cluster=cluster_uuid, disk=labels, api="v3")
        task = await vgs.create_volume_group(
            pe, uuid=vg_id, name=f"ahvbackup-{first.snapshot_id[:8]}-{first.disk.label}"
            + (f"-{len(disks)}disks" if len(disks) > 1 else ""),
            snapshot_file_paths=[d.handle for d in disks],
            description="temporary: ahvbackup iSCSI read of a snapshot's disks",
        )
        if task:
            await pe.wait_task(task, timeout=VG_TIMEOUT, poll=POLL, expect="vg create")
        vg = await vgs.get_volume_group(pe, vg_id)
        if len(vg.disk_sizes) != len(disks):
            raise HypervisorError(f"disk(s) {labels}: volume group {vg_id} has "
                                  f"{len(vg.disk_sizes)} disk(s), not {len(disks)}")
        stack.record("vg_attachment", vg_id, cluster=cluster_uuid, initiator=initiator_iqn,
                     api="v3")
        await vgs.attach_initiator(pe, vg_id, initiator_iqn)
        return tuple(IscsiSource(portal=portal, target_iqn=vg.iscsi_target, lun=i, size=size)
                     for i, size in enumerate(vg.disk_sizes))

    # -- restore side ----------------------------------------------------------------------

    async def restore_places(self) -> list[ClusterPlace]:
        """Every AOS cluster, with the storage containers its Prism Element lists (v2.0)."""
        out = []
        for cluster in (await self.clusters()).values():
            pe = await self.prism.pe(cluster.uuid)
            data = await pe.request_json("GET", "/api/nutanix/v2.0/storage_containers")
            entities = data.get("entities") if isinstance(data, Mapping) else None
            containers = tuple(
                (str(e.get("storage_container_uuid")), str(e.get("name")))
                for e in entities or [] if isinstance(e, Mapping))
            out.append(ClusterPlace(uuid=cluster.uuid, name=cluster.name, containers=containers))
        return out

    async def list_networks(self) -> list[Network]:
        """The v3 subnets (PC lists every cluster's), with `ip_config` as the CIDR."""
        def parse(e: Any, *, endpoint: str) -> Network:
            if not isinstance(e, Mapping):
                raise HypervisorError(f"{endpoint}: a subnet entity is not an object")
            spec = e.get("spec") or {}
            res = (e.get("status") or spec).get("resources") or {}
            ip = res.get("ip_config") or {}
            cidr = (f"{ip['subnet_ip']}/{ip['prefix_length']}"
                    if ip.get("subnet_ip") and ip.get("prefix_length") is not None else "")
            cref = (e.get("status") or {}).get("cluster_reference") or spec.get(
                "cluster_reference") or {}
            return Network(uuid=str((e.get("metadata") or {}).get("uuid")),
                           name=str((e.get("status") or spec).get("name") or ""), cidr=cidr,
                           cluster_uuid=str(cref.get("uuid") or ""))

        return await self.prism.pc._list_all("subnet", parse)

    async def stage_empty_iscsi(
        self, *, cluster_uuid: str, container_uuid: str, size: int, name: str,
        initiator_iqn: str, portal: tuple[str, int], stack: ReleaseStack,
    ) -> tuple[IscsiSource, DiskStage]:
        """A volume group with one empty disk, our IQN attached (v2.0, as `stage_iscsi`)."""
        pe = await self.prism.pe(cluster_uuid)
        vg_id = str(uuid.uuid4())
        vg_rec = stack.record("volume_group", vg_id, cluster=cluster_uuid, disk=name, api="v3")
        task = await vgs.create_empty_volume_group(
            pe, uuid=vg_id, name=f"ahvbackup-restore-{name}", container_uuid=container_uuid,
            size=size, description="temporary: ahvbackup iSCSI restore of a disk")
        if task:
            await pe.wait_task(task, timeout=VG_TIMEOUT, poll=POLL)
        vg = await vgs.get_volume_group(pe, vg_id)
        if not vg.disk_sizes or not vg.disk_uuids or vg.disk_sizes[0] < size:
            raise HypervisorError(f"disk {name}: volume group {vg_id} has no disk of {size} "
                                  "bytes")
        att_rec = stack.record("vg_attachment", vg_id, cluster=cluster_uuid,
                               initiator=initiator_iqn, api="v3")
        await vgs.attach_initiator(pe, vg_id, initiator_iqn)
        source = IscsiSource(portal=portal, target_iqn=vg.iscsi_target, lun=0,
                             size=vg.disk_sizes[0])
        return source, DiskStage(source_id=f"vm_disk:{vg.disk_uuids[0]}", size=size,
                                 records=(vg_rec, att_rec))

    async def stage_upload(
        self, *, cluster_uuid: str, size: int, name: str, stack: ReleaseStack,
    ) -> tuple[HttpUpload, DiskStage]:
        """An image without a source, placed on the cluster, waiting for its bytes."""
        pc = self.prism.pc
        image_id = str(uuid.uuid4())
        rec = stack.record("image", image_id, cluster=cluster_uuid, disk=name, api="v3")
        created = await pc.create_image(
            f"ahvbackup-restore-{name}", uuid=image_id, cluster_uuid=cluster_uuid,
            description="temporary: ahvbackup REST restore of a disk")
        if created.task_uuid:
            await pc.wait_task(created.task_uuid, timeout=IMAGE_TIMEOUT, poll=POLL,
                                  expect="image create")
        headers, ssl_context = pc.data_access()
        upload = HttpUpload(url=pc.image_file_url(image_id), size=size,
                            headers={**headers, "Content-Type": "application/octet-stream"},
                            ssl_context=ssl_context)
        return upload, DiskStage(source_id=f"image:{image_id}", size=size, records=(rec,))

    async def create_vm(self, vm: NewVm, *, stack: ReleaseStack) -> str:
        """POST /vms under an idempotence identifier (recorded first), then its task."""
        pc = self.prism.pc
        (vm_id,) = (await pc.idempotence_identifiers(1)).uuids[:1]
        stack.record("vm", vm_id, cluster=vm.cluster_uuid, name=vm.name, api="v3")
        resources: dict[str, Any] = {
            "num_sockets": vm.sockets, "num_vcpus_per_socket": vm.cores_per_socket,
            "memory_size_mib": vm.memory_mib, "power_state": "OFF", "disk_list": [],
            "nic_list": [
                {"subnet_reference": {"kind": "subnet", "uuid": n.network_uuid},
                 **({"mac_address": n.mac} if n.mac else {})}
                for n in vm.nics],
        }
        if vm.boot_type:
            resources["boot_config"] = {"boot_type": vm.boot_type}
        if vm.machine_type:
            resources["machine_type"] = vm.machine_type
        spec = {"name": vm.name, "description": vm.description, "resources": resources,
                "cluster_reference": {"kind": "cluster", "uuid": vm.cluster_uuid}}
        created = await pc.create_vm(spec, uuid=vm_id)
        if created.task_uuid:
            await pc.wait_task(created.task_uuid, timeout=VM_TIMEOUT, poll=POLL)
        return vm_id

    async def attach_disks(self, vm_id: str, disks: Sequence[NewDisk]) -> None:
        """PUT the VM with a disk per staged disk (`data_source_reference` to the VG's vmdisk
        or the image), then wait for its task."""
        pc = self.prism.pc
        vm = await pc.get_vm(vm_id)
        spec = copy.deepcopy(dict(vm.raw.get("spec") or {}))
        disk_list = spec.setdefault("resources", {}).setdefault("disk_list", [])
        for d in disks:
            kind, _, ref = d.stage.source_id.partition(":")
            item: dict[str, Any] = {
                "device_properties": {"device_type": "DISK", "disk_address": {
                    "adapter_type": d.bus.upper(), "device_index": d.index}},
                "data_source_reference": {"kind": kind, "uuid": ref},
                "disk_size_bytes": d.stage.size,
            }
            if d.container_uuid:
                item["storage_config"] = {"storage_container_reference": {
                    "kind": "storage_container", "uuid": d.container_uuid}}
            disk_list.append(item)
        task = await pc.update_vm(vm, spec)
        if task:
            await pc.wait_task(task, timeout=VM_TIMEOUT, poll=POLL)

    async def power_on(self, vm_id: str) -> None:
        task = await self.prism.pc.set_power(vm_id, on=True)
        if task:
            await self.prism.pc.wait_task(task, timeout=VM_TIMEOUT, poll=POLL)

    async def release(self, record: Record) -> None:
        try:
            if record.kind == "vm":
                # GET first: a VM whose create was refused (403) is simply gone, even for a
                # user who may not delete VMs
                await self.prism.pc.get_vm(record.resource_id)
                task = await self.prism.pc.delete_vm(record.resource_id)
                if task:
                    await self.prism.pc.wait_task(task, poll=POLL)
            elif record.kind == "vg_attachment":
                pe = await self.prism.pe(record.scope["cluster"])
                await vgs.detach_initiator(pe, record.resource_id, record.scope["initiator"])
            elif record.kind == "volume_group":
                pe = await self.prism.pe(record.scope["cluster"])
                task = await vgs.delete_volume_group(pe, record.resource_id)
                if task:
                    await pe.wait_task(task, poll=POLL, expect="vg delete")
            elif record.kind == "snapshot":
                pe = await self.prism.pe(record.scope["cluster"])
                task = await pe.delete_vm_snapshot(record.resource_id)
                if task:
                    await pe.wait_task(task, poll=POLL, expect="snapshot delete")
            elif record.kind == "image":
                task = await self.prism.pc.delete_image(record.resource_id)
                if task:
                    await self.prism.pc.wait_task(task, poll=POLL,
                                                  expect="image delete")
            else:
                raise HypervisorError(f"ahv: cannot release a {record.kind!r} resource")
        except ApiNotFoundError:
            log.debug("%s was already gone", record.describe())
