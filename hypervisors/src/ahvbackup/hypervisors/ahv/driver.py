"""The `ahv` hypervisor driver: the job's view of a Nutanix cluster through Prism v3.

Snapshots are PE backup snapshots (`/vm_snapshots`), the region map comes from PE changed
regions, and the REST data path reads an image cloned from the snapshot file
(`nfs://<cluster>/<snapshot file path>`). Every snapshot and image is recorded on the ledger
under an id we choose *before* asking Prism to create it, so a job killed between the request
and the answer still leaves a record the next run can release.
"""

from __future__ import annotations

__all__ = ["AhvHypervisor", "AhvSession"]

import copy
import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import marshmallow

from ahvbackup.core import log as msgs
from ahvbackup.core.config.fields import Int
from ahvbackup.core.drivers import (
    ClusterPlace,
    DiskStage,
    HttpSource,
    HttpUpload,
    Hypervisor,
    HypervisorSession,
    IscsiSource,
    Network,
    NewDisk,
    NewVm,
    NicShape,
    VmShape,
)
from ahvbackup.core.errors import ApiNotFoundError, ConfigError, HypervisorError
from ahvbackup.core.health import HealthCheck
from ahvbackup.core.ledger import Record, ReleaseStack
from ahvbackup.core.model import DiskInfo, DiskSnapshot, Region, VmInfo, VmSnapshot

from . import volume_groups as vgs
from .client import Cluster, Prism, Vm, connect_prism

log = logging.getLogger("ahvbackup.ahv")

SNAPSHOT_TIMEOUT = 900.0
VM_TIMEOUT = 900.0
IMAGE_TIMEOUT = 900.0
VG_TIMEOUT = 900.0
#: the iSCSI port of a cluster's data services address
ISCSI_PORT = 3260


class AhvKeys(marshmallow.Schema):
    """Keys the ahv driver adds: `iscsi_port`, the port of the DSIP's iSCSI portal (3260 on a
    real cluster; a simulator under test may serve another)."""

    iscsi_port = Int(minimum=1, maximum=65535, load_default=ISCSI_PORT)
#: first poll of a task or snapshot; it backs off to the client's cap from there
POLL = 0.1


def vm_info(vm: Vm, clusters: dict[str, Cluster]) -> VmInfo:
    cluster = clusters.get(vm.cluster_uuid)
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
    )


class AhvSession(HypervisorSession):
    def __init__(self, prism: Prism, config: Any) -> None:
        self.prism = prism
        self.config = config
        self._clusters: dict[str, Cluster] = {}
        self._snapshot_cluster: dict[str, str] = {}

    async def _aos_clusters(self) -> dict[str, Cluster]:
        if not self._clusters:
            self._clusters = {c.uuid: c for c in await self.prism.pc.aos_clusters()}
        return self._clusters

    async def discover(self) -> str:
        clusters = await self._aos_clusters()
        names = ",".join(sorted(c.name for c in clusters.values())) or "none"
        return msgs.prism_discovery(self.prism.pc.host, names, "v3")

    async def list_vms(self) -> list[VmInfo]:
        clusters = await self._aos_clusters()
        return [vm_info(vm, clusters) for vm in await self.prism.pc.list_vms()]

    async def snapshot_vm(
        self, vm: VmInfo, *, application_consistent: bool, name: str, stack: ReleaseStack
    ) -> VmSnapshot:
        pe = await self.prism.pe(vm.cluster_uuid)
        snap_id = str(uuid.uuid4())
        stack.record("snapshot", snap_id, cluster=vm.cluster_uuid, vm=vm.name)
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
        cluster = (await self._aos_clusters()).get(self._cluster_of(disk))
        if cluster is None or not cluster.external_ip:
            raise HypervisorError(f"disk {disk.disk.label}: its cluster has no external IP")
        pc = self.prism.pc
        image_id = str(uuid.uuid4())
        stack.record("image", image_id, cluster=cluster.uuid, disk=disk.disk.label)
        created = await pc.create_image(
            f"ahvbackup-{disk.snapshot_id[:8]}-{disk.disk.label}", uuid=image_id,
            source_uri=f"nfs://{cluster.external_ip}{disk.handle}", cluster_uuid=cluster.uuid,
            description="temporary: ahvbackup REST read of a snapshot disk",
        )
        if created.task_uuid:
            await pc.wait_task(created.task_uuid, timeout=IMAGE_TIMEOUT, poll=POLL)
        image = await pc.get_image(image_id)
        headers, ssl_context = pc.data_access()
        return HttpSource(
            url=pc.image_file_url(image_id), size=image.size_bytes or disk.size,
            headers=headers, ssl_context=ssl_context,
        )

    async def iscsi_portal(self, cluster_uuid: str | None = None) -> tuple[str, int] | None:
        """The `dsip` setting, else the cluster's data services IP (the first cluster's when
        none is named), on `iscsi_port` (3260)."""
        extra = getattr(self.config, "extra", None) or {}
        port = int(extra.get("iscsi_port", ISCSI_PORT))
        if self.config.dsip:
            return (str(self.config.dsip), port)
        clusters = await self._aos_clusters()
        cluster = clusters.get(cluster_uuid or "") or next(iter(clusters.values()), None)
        if cluster is None or not cluster.dsip:
            return None
        return (cluster.dsip, port)

    async def stage_iscsi(
        self, disk: DiskSnapshot, *, initiator_iqn: str, stack: ReleaseStack
    ) -> IscsiSource:
        """A volume group cloned from the snapshot disk, attached to `initiator_iqn`."""
        cluster_uuid = self._cluster_of(disk)
        portal = await self.iscsi_portal(cluster_uuid)
        if portal is None:
            raise HypervisorError(f"disk {disk.disk.label}: its cluster has no data services "
                                  "IP; set dsip= or use data_path=rest")
        pe = await self.prism.pe(cluster_uuid)
        vg_id = str(uuid.uuid4())
        stack.record("volume_group", vg_id, cluster=cluster_uuid, disk=disk.disk.label)
        task = await vgs.create_volume_group(
            pe, uuid=vg_id, name=f"ahvbackup-{disk.snapshot_id[:8]}-{disk.disk.label}",
            snapshot_file_path=disk.handle,
            description="temporary: ahvbackup iSCSI read of a snapshot disk",
        )
        if task:
            await pe.wait_task(task, timeout=VG_TIMEOUT, poll=POLL)
        vg = await vgs.get_volume_group(pe, vg_id)
        if not vg.disk_sizes:
            raise HypervisorError(f"disk {disk.disk.label}: volume group {vg_id} has no disk")
        stack.record("vg_attachment", vg_id, cluster=cluster_uuid, initiator=initiator_iqn)
        await vgs.attach_initiator(pe, vg_id, initiator_iqn)
        return IscsiSource(portal=portal, target_iqn=vg.iscsi_target, lun=0,
                           size=vg.disk_sizes[0])

    # -- restore side ----------------------------------------------------------------------

    async def restore_places(self) -> list[ClusterPlace]:
        """Every AOS cluster, with the storage containers its Prism Element lists (v2.0)."""
        out = []
        for cluster in (await self._aos_clusters()).values():
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

    def vm_shape(self, config: Mapping[str, Any]) -> VmShape:
        """From the VM entity Prism returned at backup time (`spec`, else `status`)."""
        spec = config.get("spec") or config.get("status") or {}
        res = spec.get("resources") or {}
        nics = tuple(
            NicShape(network_uuid=str((n.get("subnet_reference") or {}).get("uuid") or ""),
                     mac=n.get("mac_address") or None)
            for n in res.get("nic_list") or [] if isinstance(n, Mapping))
        cref = spec.get("cluster_reference") or (config.get("status") or {}).get(
            "cluster_reference") or {}
        return VmShape(
            cluster_uuid=str(cref.get("uuid") or ""),
            sockets=int(res.get("num_sockets") or 1),
            cores_per_socket=int(res.get("num_vcpus_per_socket") or 1),
            memory_mib=int(res.get("memory_size_mib") or 1024),
            boot_type=str((res.get("boot_config") or {}).get("boot_type") or ""),
            machine_type=str(res.get("machine_type") or ""),
            nics=nics, description=str(spec.get("description") or ""),
        )

    async def stage_empty_iscsi(
        self, *, cluster_uuid: str, container_uuid: str, size: int, name: str,
        initiator_iqn: str, stack: ReleaseStack,
    ) -> tuple[IscsiSource, DiskStage]:
        """A volume group with one empty disk, our IQN attached (v2.0, as `stage_iscsi`)."""
        portal = await self.iscsi_portal(cluster_uuid)
        if portal is None:
            raise HypervisorError(f"disk {name}: the cluster has no data services IP; set "
                                  "dsip= or use data_path=rest")
        pe = await self.prism.pe(cluster_uuid)
        vg_id = str(uuid.uuid4())
        vg_rec = stack.record("volume_group", vg_id, cluster=cluster_uuid, disk=name)
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
                               initiator=initiator_iqn)
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
        rec = stack.record("image", image_id, cluster=cluster_uuid, disk=name)
        created = await pc.create_image(
            f"ahvbackup-restore-{name}", uuid=image_id, cluster_uuid=cluster_uuid,
            description="temporary: ahvbackup REST restore of a disk")
        if created.task_uuid:
            await pc.wait_task(created.task_uuid, timeout=IMAGE_TIMEOUT, poll=POLL)
        headers, ssl_context = pc.data_access()
        upload = HttpUpload(url=pc.image_file_url(image_id), size=size,
                            headers={**headers, "Content-Type": "application/octet-stream"},
                            ssl_context=ssl_context)
        return upload, DiskStage(source_id=f"image:{image_id}", size=size, records=(rec,))

    async def create_vm(self, vm: NewVm, *, stack: ReleaseStack) -> str:
        """POST /vms under an idempotence identifier (recorded first), then its task."""
        pc = self.prism.pc
        (vm_id,) = (await pc.idempotence_identifiers(1)).uuids[:1]
        stack.record("vm", vm_id, cluster=vm.cluster_uuid, name=vm.name)
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
                    await pe.wait_task(task, poll=POLL)
            elif record.kind == "snapshot":
                pe = await self.prism.pe(record.scope["cluster"])
                task = await pe.delete_vm_snapshot(record.resource_id)
                if task:
                    await pe.wait_task(task, poll=POLL)
            elif record.kind == "image":
                task = await self.prism.pc.delete_image(record.resource_id)
                if task:
                    await self.prism.pc.wait_task(task, poll=POLL)
            else:
                raise HypervisorError(f"ahv: cannot release a {record.kind!r} resource")
        except ApiNotFoundError:
            log.debug("%s was already gone", record.describe())



class AhvHypervisor(Hypervisor):
    name = "ahv"
    summary = "Nutanix AHV through Prism Central and Prism Element (v3)"
    config_schema = AhvKeys

    def _pc_url(self) -> str:
        cfg = self.config
        if cfg.prism_central is None:
            raise ConfigError("prism_central: required to reach Prism (host[:port])")
        hp = cfg.prism_central
        host = f"[{hp.host}]" if ":" in hp.host else hp.host
        return f"https://{host}:{hp.port or cfg.prism_port}"

    def _verify(self) -> bool | str:
        cfg = self.config
        if cfg.prism_insecure:
            return False
        return str(cfg.prism_ca_cert) if cfg.prism_ca_cert else True

    async def health_checks(self, *, timeout: float = 10.0) -> list[HealthCheck]:
        """TLS, authentication, clusters, RBAC, DSIP and iSCSI (`.health`)."""
        from .health import run_health_checks

        return await run_health_checks(self, timeout=timeout)

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[AhvSession]:
        cfg = self.config
        if not cfg.user or not cfg.password:
            raise ConfigError("user and password (or passfile): required to reach Prism")
        async with connect_prism(
            self._pc_url(), user=cfg.user, password=cfg.password, verify=self._verify(),
            rate_rpm=cfg.prism_rate_rpm,
        ) as prism:
            yield AhvSession(prism, cfg)
