"""The `ahv` hypervisor driver: the job's view of a Nutanix cluster through Prism v3.

Snapshots are PE backup snapshots (`/vm_snapshots`), the region map comes from PE changed
regions, and the REST data path reads an image cloned from the snapshot file
(`nfs://<cluster>/<snapshot file path>`). Every snapshot and image is recorded on the ledger
under an id we choose *before* asking Prism to create it, so a job killed between the request
and the answer still leaves a record the next run can release.
"""

from __future__ import annotations

__all__ = ["AhvHypervisor", "AhvSession"]

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import marshmallow

from ahvbackup.core import log as msgs
from ahvbackup.core.config.fields import Int
from ahvbackup.core.drivers import HttpSource, Hypervisor, HypervisorSession, IscsiSource
from ahvbackup.core.errors import ApiNotFoundError, ConfigError, HypervisorError
from ahvbackup.core.ledger import Record, ReleaseStack
from ahvbackup.core.model import DiskInfo, DiskSnapshot, Region, VmInfo, VmSnapshot

from . import volume_groups as vgs
from .client import Cluster, Prism, Vm, connect_prism

log = logging.getLogger("ahvbackup.ahv")

SNAPSHOT_TIMEOUT = 900.0
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

    async def release(self, record: Record) -> None:
        try:
            if record.kind == "vg_attachment":
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
