"""Prism v4 behind the `PrismApi` seam (docs/prism-client.md, "v4").

- VMs and clusters: vmm `ahv/config/vms`, clustermgmt `config/clusters` (DSIP from
  `network.externalDataServiceIp`).
- Snapshots are recovery points (dataprotection `config/recovery-points`, crash- or
  application-consistent); their id is ``v4:<extId>`` and a disk's handle
  ``v4:<rp>/<vm rp>/<disk rp>``.
- Changed regions: `$actions/discover-cluster` on Prism Central gives the PE address and a JWT;
  `compute-changed-regions` on that PE, with the JWT as its only credential, continues page
  after page through `metadata.extraInfo` `nextOffset`.
- iSCSI: a volumes VG whose disk is the disk recovery point (`DISK_RECOVERY_POINT`), our IQN
  attached with `attach-iscsi-client`; the target IQN is read from the client's
  `attachedTargets`.
- REST: v4 has no byte read of a recovery point's disk (docs/nutanix-api.md 3.2 item 3): a
  powered-off VM is made with a clone of the disk recovery point, an image of that disk (v3
  `POST /images` with a `vm_disk` source), and its bytes read with v3 ranged GETs.
- Restore: VGs with an empty disk (volumes), the VM created and powered on through vmm, its
  disks added with vmm `POST /vms/{id}/disks` (a clone of the VG disk, or of the image).
  Storage containers come from clustermgmt `config/storage-containers`. Where v4 has no
  equivalent among the namespaces used, the v3 calls a real tool uses serve: an image upload
  (`PUT /api/nutanix/v3/images/{uuid}/file`; v4 has no upload) and subnets (`POST
  /subnets/list`; the networking namespace is not among the five), recorded with `api=v3`.

A created entity's extId is the server's choice, known only from its task. So each create is
first recorded by the unique name it will carry (`<kind>_pending`, released by finding that
name), and once the task names the entity, recorded by extId and the name record dropped.
"""

from __future__ import annotations

__all__ = ["V4Api", "parse_handle", "vm_info_v4"]

import dataclasses
import datetime as dt
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

from .api_v3 import POLL, SNAPSHOT_TIMEOUT, VG_TIMEOUT, VM_TIMEOUT, V3Api
from .client import Cluster, Prism
from .client.api import V4_PREFIX
from .client.v4 import PrismV4
from .client.v4_models import ClusterAccess, RecoveryPoint, cluster_from_v4

log = logging.getLogger("ahvbackup.ahv")

RP_REL = "dataprotection:config:recovery-point"
VG_REL = "volumes:config:volume-group"
VM_REL = "vmm:ahv:config:vm"
#: a compute-changed-regions answer that stops further than this past its start is a loop
_MAX_PAGES = 100_000


def vm_info_v4(vm: Mapping[str, Any], clusters: dict[str, Cluster]) -> VmInfo:
    """A vmm v4 `Vm` as the engine's VmInfo; a disk's uuid is its vmdisk
    (`backingInfo.diskExtId`), the same id v3 lists, so a chain goes on across APIs."""
    cluster_uuid = str((vm.get("cluster") or {}).get("extId") or "")
    disks = []
    for d in vm.get("disks") or []:
        backing = d.get("backingInfo") or {}
        if not str(backing.get("$objectType", "")).endswith(".VmDisk"):
            continue  # a volume group disk is not the VM's to back up
        addr = d.get("diskAddress") or {}
        disks.append(DiskInfo(
            uuid=str(backing.get("diskExtId") or d.get("extId")), bus=str(addr.get("busType")),
            index=int(addr.get("index") or 0), size=int(backing.get("diskSizeBytes") or 0),
            container=str((backing.get("storageContainer") or {}).get("extId") or "")))
    tools = vm.get("guestTools") or {}
    cluster = clusters.get(cluster_uuid)
    return VmInfo(
        uuid=str(vm.get("extId")), name=str(vm.get("name") or ""), cluster_uuid=cluster_uuid,
        cluster_name=cluster.name if cluster else cluster_uuid, disks=tuple(disks),
        app_consistent_capable=bool(tools.get("isEnabled") and (
            tools.get("isVssSnapshotCapable") or "VSS_SNAPSHOT" in (tools.get("capabilities")
                                                                    or []))),
        config=dict(vm),
    )


def parse_handle(handle: str) -> tuple[str, str, str]:
    """(recovery point, VM recovery point, disk recovery point) of a v4 disk handle."""
    parts = handle[len(V4_PREFIX):].split("/") if handle.startswith(V4_PREFIX) else []
    if len(parts) != 3 or not all(parts):
        raise HypervisorError(f"{handle!r} is not a v4 disk recovery point handle "
                              "(v4:<rp>/<vm rp>/<disk rp>)")
    return parts[0], parts[1], parts[2]


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class V4Api:
    """Prism v4 (PC namespaces, PE compute-changed-regions); `v3` for what v4 lacks."""

    version = "v4"

    def __init__(self, prism: Prism, v4: PrismV4, v3: V3Api) -> None:
        self.prism = prism
        self.v4 = v4
        self.v3 = v3
        self._clusters: dict[str, Cluster] = {}
        self._rp_cluster: dict[str, str] = {}  # recovery points taken in this session

    async def clusters(self) -> dict[str, Cluster]:
        if not self._clusters:
            items = await self.v4.list_all("clustermgmt", "config/clusters")
            found = [cluster_from_v4(c, endpoint="GET clustermgmt config/clusters")
                     for c in items]
            self._clusters = {c.uuid: c for c in found if not c.is_prism_central}
        return self._clusters

    async def list_vms(self) -> list[VmInfo]:
        clusters = await self.clusters()
        vms = [vm_info_v4(vm, clusters) for vm in await self.v4.list_all("vmm",
                                                                          "ahv/config/vms")]
        # a v4 VM answer names no project: take each VM's from its v3 answer (project=)
        projects = {v.uuid: (v.project_uuid, v.project_name) for v in await self.v3.list_vms()}
        return [dataclasses.replace(v, project_uuid=projects[v.uuid][0],
                                    project_name=projects[v.uuid][1])
                if v.uuid in projects else v for v in vms]

    # -- created by name first, then by extId --------------------------------------------------

    async def _created(self, stack: ReleaseStack, kind: str, unique: str, rel: str,
                       method: str, ns: str, rest: str, body: Any, *, timeout: float,
                       **scope: Any) -> tuple[str, Record]:
        """Create an entity named `unique`, recorded by that name until its task names it;
        returns its extId and its record."""
        pending = stack.record(f"{kind}_pending", unique, api="v4", **scope)
        task = await self.v4.run(method, ns, rest, json=body, timeout=timeout, poll=POLL)
        ext_id = task.entity(rel)
        if not ext_id:
            raise HypervisorError(f"Prism at {self.v4.host}: {task.operation} task "
                                  f"{task.ext_id} names no {rel} it created")
        rid = V4_PREFIX + ext_id if kind == "snapshot" else ext_id
        rec = stack.record(kind, rid, api="v4", **scope)
        stack.keep(pending)
        return ext_id, rec

    async def _by_name(self, ns: str, rest: str, name: str) -> list[str]:
        items = await self.v4.list_all(ns, rest, filter=f"name eq {_quote(name)}")
        return [str(i["extId"]) for i in items if isinstance(i, Mapping) and i.get("extId")]

    # -- snapshots ------------------------------------------------------------------------------

    async def snapshot_vm(self, vm: VmInfo, *, application_consistent: bool, name: str,
                          stack: ReleaseStack) -> VmSnapshot:
        kind = "APPLICATION_CONSISTENT" if application_consistent else "CRASH_CONSISTENT"
        unique = f"{name}-{uuid.uuid4().hex[:8]}"
        vm_rp: dict[str, Any] = {"vmExtId": vm.uuid,
                                 "$objectType": "dataprotection.v4.config.VmRecoveryPoint"}
        if application_consistent:
            vm_rp["applicationConsistentProperties"] = {
                "backupType": "FULL_BACKUP", "shouldIncludeWriters": True,
                "shouldStoreVssMetadata": False,
                "$objectType": "dataprotection.v4.common.VssProperties"}
        body = {"name": unique, "recoveryPointType": kind, "vmRecoveryPoints": [vm_rp],
                "$objectType": "dataprotection.v4.config.RecoveryPoint"}
        rp_id, _rec = await self._created(
            stack, "snapshot", unique, RP_REL, "POST", "dataprotection", "config/recovery-points",
            body, timeout=SNAPSHOT_TIMEOUT, cluster=vm.cluster_uuid, vm=vm.name)
        rp = RecoveryPoint.from_api(
            await self.v4.get("dataprotection", f"config/recovery-points/{rp_id}"),
            endpoint=f"GET recovery-points/{rp_id}")
        mine = next((v for v in rp.vms if v.vm_ext_id == vm.uuid), None)
        drps = {d.disk_ext_id: d.ext_id for d in mine.disks} if mine else {}
        missing = [d.label for d in vm.disks if d.uuid not in drps]
        if mine is None or missing:
            raise HypervisorError(f"VM {vm.name}: recovery point {rp_id} has no disk recovery "
                                  f"point for disk(s) {', '.join(missing) or 'any'}")
        snap_id = V4_PREFIX + rp_id
        self._rp_cluster[rp_id] = vm.cluster_uuid
        return VmSnapshot(
            id=snap_id, vm_uuid=vm.uuid, cluster_uuid=vm.cluster_uuid,
            consistency="application" if application_consistent else "crash",
            disks=tuple(DiskSnapshot(disk=d, snapshot_id=snap_id,
                                     handle=f"{V4_PREFIX}{rp_id}/{mine.ext_id}/{drps[d.uuid]}",
                                     size=d.size)
                        for d in vm.disks))

    async def _discover(self, rp: str, vm_rp: str, drp: str,
                        reference: tuple[str, str, str] | None) -> ClusterAccess:
        def ref(ids: tuple[str, str, str]) -> dict[str, Any]:
            return {"recoveryPointExtId": ids[0], "vmRecoveryPointExtId": ids[1],
                    "diskRecoveryPointExtId": ids[2],
                    "$objectType": "dataprotection.v4.content.VmDiskRecoveryPointReference"}

        spec: dict[str, Any] = {
            "diskRecoveryPoint": ref((rp, vm_rp, drp)),
            "$objectType": "dataprotection.v4.content.ComputeChangedRegionsClusterDiscoverSpec"}
        if reference:
            spec["referenceDiskRecoveryPoint"] = ref(reference)
        body = {"operation": "COMPUTE_CHANGED_REGIONS", "spec": spec,
                "$objectType": "dataprotection.v4.content.ClusterDiscoverSpec"}
        data = await self.v4.change(
            "POST", "dataprotection", f"config/recovery-points/{rp}/$actions/discover-cluster",
            json=body)
        return ClusterAccess.from_api(data, endpoint=f"POST recovery-points/{rp}/$actions/"
                                                     "discover-cluster")

    async def regions(self, disk: DiskSnapshot, *, reference: str | None = None,
                      ) -> AsyncIterator[Region]:
        rp, vm_rp, drp = parse_handle(disk.handle)
        ref = parse_handle(reference) if reference else None
        access = await self._discover(rp, vm_rp, drp, ref)
        cluster = next((c for c in (await self.clusters()).values()
                        if access.cluster_ip in (c.external_ip, c.dsip)), None)
        if cluster is None:
            raise HypervisorError(f"discover-cluster of recovery point {rp} named "
                                  f"{access.cluster_ip}, which is no cluster Prism lists")
        base: dict[str, Any] = {
            "$objectType": "dataprotection.v4.content.VmRecoveryPointChangedRegionsComputeSpec"}
        if ref:
            base.update(referenceRecoveryPointExtId=ref[0], referenceVmRecoveryPointExtId=ref[1],
                        referenceDiskRecoveryPointExtId=ref[2])
        rest = (f"content/recovery-points/{rp}/vm-recovery-points/{vm_rp}/disk-recovery-points/"
                f"{drp}/$actions/compute-changed-regions")
        async with self.prism.jwt_pe(cluster, access.jwt) as http:
            pe = PrismV4(http, self.v4.versions)
            offset = 0
            for _ in range(_MAX_PAGES):
                body = {**base, "offset": offset, "length": max(0, disk.size - offset)}
                path = pe.path("dataprotection", rest)
                page = await http.request_json("POST", path, json=body, idempotent=True)
                for r in page.get("data") or []:
                    yield Region(int(r["offset"]), int(r["length"]),
                                 zero=r.get("regionType") == "ZEROED")
                extra = {e.get("name"): e.get("value")
                         for e in (page.get("metadata") or {}).get("extraInfo") or []}
                nxt = extra.get("nextOffset")
                if not isinstance(nxt, int) or nxt <= offset or nxt >= disk.size:
                    return
                log.debug("Prism at %s: changed regions continue at %d", http.host, nxt)
                offset = nxt

    # -- data paths -----------------------------------------------------------------------------

    async def _attach(self, vg: str, initiator_iqn: str, stack: ReleaseStack, *,
                      cluster: str, disk: str) -> tuple[Record, str, list[Mapping[str, Any]]]:
        """Attach our IQN (recorded first); the target IQN from the client's
        `attachedTargets`, and the VG's disks by index."""
        rec = stack.record("vg_attachment", vg, api="v4", cluster=cluster,
                           initiator=initiator_iqn)
        await self.v4.run("POST", "volumes", f"config/volume-groups/{vg}/$actions/"
                          "attach-iscsi-client", timeout=VG_TIMEOUT, poll=POLL,
                          expect="vg attach",
                          json={"iscsiInitiatorName": initiator_iqn,
                                "$objectType": "volumes.v4.config.IscsiClient"})
        group = await self.v4.get("volumes", f"config/volume-groups/{vg}")
        wanted = str(group.get("targetName") or "")
        clients = await self.v4.list_all("volumes", "config/iscsi-clients",
                                         filter=f"iscsiInitiatorName eq {_quote(initiator_iqn)}")
        names = [str(t.get("iscsiTargetName")) for c in clients
                 for t in c.get("attachedTargets") or []]
        target = next((n for n in names if wanted and (n == wanted or n.endswith(":" + wanted))),
                      None)
        disks = await self.v4.list_all("volumes", f"config/volume-groups/{vg}/disks")
        if target is None or not disks:
            raise HypervisorError(f"disk {disk}: volume group {vg} shows no iSCSI target for "
                                  f"{initiator_iqn} or has no disk")
        return rec, target, sorted(disks, key=lambda d: int(d.get("index") or 0))

    async def stage_iscsi(self, disks: Sequence[DiskSnapshot], *, initiator_iqn: str,
                          portal: tuple[str, int], stack: ReleaseStack,
                          ) -> tuple[IscsiSource, ...]:
        """One VG whose disk i is the recovery point of `disks[i]` (LUN i), attached."""
        if not disks:
            return ()
        handles = [parse_handle(d.handle) for d in disks]
        rp = handles[0][0]
        cluster = self._rp_cluster.get(rp) or await self._cluster_of_rp(rp)
        labels = ",".join(d.disk.label for d in disks)
        name = f"ahvbackup-{rp[:8]}-{disks[0].disk.label}-{uuid.uuid4().hex[:8]}"
        body = {"name": name, "clusterReference": cluster, "usageType": "BACKUP_TARGET",
                "isHidden": True, "sharingStatus": "SHARED",
                "description": "temporary: ahvbackup iSCSI read of disk recovery points",
                "disks": [{"index": i, "diskDataSourceReference": {
                    "extId": drp, "entityType": "DISK_RECOVERY_POINT"},
                    "$objectType": "volumes.v4.config.VolumeDisk"}
                    for i, (_rp, _vm_rp, drp) in enumerate(handles)],
                "$objectType": "volumes.v4.config.VolumeGroup"}
        vg, _rec = await self._created(stack, "volume_group", name, VG_REL, "POST", "volumes",
                                       "config/volume-groups", body, timeout=VG_TIMEOUT,
                                       cluster=cluster, disk=labels)
        _att, target, found = await self._attach(vg, initiator_iqn, stack, cluster=cluster,
                                                 disk=labels)
        if len(found) != len(disks):
            raise HypervisorError(f"disk(s) {labels}: volume group {vg} has {len(found)} "
                                  f"disk(s), not {len(disks)}")
        return tuple(IscsiSource(portal=portal, target_iqn=target, lun=i,
                                 size=int(d.get("diskSizeBytes") or 0))
                     for i, d in enumerate(found))

    async def _cluster_of_rp(self, rp: str) -> str:
        data = await self.v4.get("dataprotection", f"config/recovery-points/{rp}")
        parsed = RecoveryPoint.from_api(data, endpoint=f"GET recovery-points/{rp}")
        vm_uuid = parsed.vms[0].vm_ext_id if parsed.vms else ""
        vm = await self.v4.get("vmm", f"ahv/config/vms/{vm_uuid}")
        return str((vm.get("cluster") or {}).get("extId") or "")

    async def stage_http(self, disk: DiskSnapshot, *, stack: ReleaseStack) -> HttpSource:
        """v4 has no byte read of a disk recovery point, so, as docs/nutanix-api.md 3.2 has
        it, the disk is materialised: a powered-off VM whose one disk is a clone of the disk
        recovery point (`VmDiskRecoveryPointReference`), an image of that disk, and the
        image's bytes over HTTP ranges. The VM goes once the image is made."""
        rp, vm_rp, drp = parse_handle(disk.handle)
        cluster = self._rp_cluster.get(rp) or await self._cluster_of_rp(rp)
        name = f"ahvbackup-read-{rp[:8]}-{disk.disk.label}-{uuid.uuid4().hex[:8]}"
        ref = {"diskRecoveryPointExtId": drp, "vmRecoveryPointExtId": vm_rp,
               "$objectType": "vmm.v4.ahv.config.VmDiskRecoveryPointReference"}
        body = {"name": name, "cluster": {"extId": cluster}, "numSockets": 1,
                "memorySizeBytes": 1 << 30, "powerState": "OFF",
                "description": "temporary: ahvbackup REST read of a disk recovery point",
                "disks": [{"diskAddress": {"busType": "SCSI", "index": 0},
                           "backingInfo": {"dataSource": {"reference": ref},
                                           "$objectType": "vmm.v4.ahv.config.VmDisk"},
                           "$objectType": "vmm.v4.ahv.config.Disk"}],
                "$objectType": "vmm.v4.ahv.config.Vm"}
        vm_id, vm_rec = await self._created(stack, "vm", name, VM_REL, "POST", "vmm",
                                            "ahv/config/vms", body, timeout=VM_TIMEOUT,
                                            cluster=cluster, name=name)
        clone = vm_info_v4(await self.v4.get("vmm", f"ahv/config/vms/{vm_id}"), {})
        if not clone.disks:
            raise HypervisorError(f"disk {disk.disk.label}: VM {vm_id} made from disk recovery "
                                  f"point {drp} has no disk")
        source = await self.v3.stage_image(clone.disks[0].uuid, cluster_uuid=cluster,
                                           name=name, label=disk.disk.label,
                                           size=clone.disks[0].size or disk.size, stack=stack)
        await stack.release(vm_rec)  # the image is a copy: the VM is not needed any more
        return source

    # -- restore --------------------------------------------------------------------------------

    async def restore_places(self) -> list[ClusterPlace]:
        """Every AOS cluster with its storage containers (clustermgmt `storage-containers`)."""
        clusters = await self.clusters()
        found: dict[str, list[tuple[str, str]]] = {u: [] for u in clusters}
        for c in await self.v4.list_all("clustermgmt", "config/storage-containers"):
            owner = str(c.get("clusterExtId") or "")
            if owner in found:
                found[owner].append((str(c.get("containerExtId") or c.get("extId")),
                                     str(c.get("name") or "")))
        return [ClusterPlace(uuid=u, name=clusters[u].name, containers=tuple(found[u]))
                for u in clusters]

    async def list_networks(self) -> list[Network]:
        return await self.v3.list_networks()

    async def stage_empty_iscsi(
        self, *, cluster_uuid: str, container_uuid: str, size: int, name: str,
        initiator_iqn: str, portal: tuple[str, int], stack: ReleaseStack,
    ) -> tuple[IscsiSource, DiskStage]:
        unique = f"ahvbackup-restore-{name}-{uuid.uuid4().hex[:8]}"
        body = {"name": unique, "clusterReference": cluster_uuid, "usageType": "TEMPORARY",
                "sharingStatus": "SHARED",
                "description": "temporary: ahvbackup iSCSI restore of a disk",
                "disks": [{"index": 0, "diskSizeBytes": size,
                           "storageContainerId": container_uuid,
                           "$objectType": "volumes.v4.config.VolumeDisk"}],
                "$objectType": "volumes.v4.config.VolumeGroup"}
        vg, vg_rec = await self._created(stack, "volume_group", unique, VG_REL, "POST",
                                         "volumes", "config/volume-groups", body,
                                         timeout=VG_TIMEOUT, cluster=cluster_uuid, disk=name)
        att_rec, target, disks = await self._attach(vg, initiator_iqn, stack,
                                                    cluster=cluster_uuid, disk=name)
        got = int(disks[0].get("diskSizeBytes") or 0)
        if got < size:
            raise HypervisorError(f"disk {name}: volume group {vg} has no disk of {size} bytes")
        disk_id = str(disks[0]["extId"])
        source = IscsiSource(portal=portal, target_iqn=target, lun=0, size=got)
        return source, DiskStage(source_id=f"volume_disk:{vg}/{disk_id}", size=size,
                                 records=(vg_rec, att_rec))

    async def stage_upload(self, *, cluster_uuid: str, size: int, name: str,
                           stack: ReleaseStack) -> tuple[HttpUpload, DiskStage]:
        return await self.v3.stage_upload(cluster_uuid=cluster_uuid, size=size, name=name,
                                          stack=stack)

    async def create_vm(self, vm: NewVm, *, stack: ReleaseStack) -> str:
        body: dict[str, Any] = {
            "name": vm.name, "description": vm.description, "cluster": {"extId": vm.cluster_uuid},
            "numSockets": vm.sockets, "numCoresPerSocket": vm.cores_per_socket,
            "memorySizeBytes": vm.memory_mib << 20, "powerState": "OFF",
            "nics": [{"backingInfo": {"model": "VIRTIO",
                                      **({"macAddress": n.mac} if n.mac else {})},
                      "networkInfo": {"nicType": "NORMAL_NIC",
                                      "subnet": {"extId": n.network_uuid}}}
                     for n in vm.nics],
            "$objectType": "vmm.v4.ahv.config.Vm"}
        if vm.boot_type:
            body["bootConfig"] = ({"$objectType": "vmm.v4.ahv.config.LegacyBoot"}
                                  if vm.boot_type == "LEGACY" else
                                  {"isSecureBootEnabled": vm.boot_type == "SECURE_BOOT",
                                   "$objectType": "vmm.v4.ahv.config.UefiBoot"})
        if vm.machine_type:
            body["machineType"] = vm.machine_type
        vm_id, _rec = await self._created(stack, "vm", vm.name, VM_REL, "POST", "vmm",
                                          "ahv/config/vms", body, timeout=VM_TIMEOUT,
                                          cluster=vm.cluster_uuid, name=vm.name)
        return vm_id

    async def attach_disks(self, vm_id: str, disks: Sequence[NewDisk]) -> None:
        """One vmm `POST /vms/{id}/disks` per disk: a clone of the VG disk
        (`VolumeDiskReference`) or of the uploaded image (`ImageReference`)."""
        for d in disks:
            kind, _, ref = d.stage.source_id.partition(":")
            if kind == "volume_disk":
                vg, _, disk_id = ref.partition("/")
                source = {"diskExtId": disk_id, "volumeGroupExtId": vg,
                          "$objectType": "vmm.v4.ahv.config.VolumeDiskReference"}
            elif kind == "image":
                source = {"imageExtId": ref, "$objectType": "vmm.v4.ahv.config.ImageReference"}
            else:
                raise HypervisorError(f"disk {d.bus}.{d.index}: cannot attach a {kind!r} "
                                      "through Prism v4")
            backing: dict[str, Any] = {"diskSizeBytes": d.stage.size,
                                       "dataSource": {"reference": source},
                                       "$objectType": "vmm.v4.ahv.config.VmDisk"}
            if d.container_uuid:
                backing["storageContainer"] = {"extId": d.container_uuid}
            body = {"diskAddress": {"busType": d.bus.upper(), "index": d.index},
                    "backingInfo": backing, "$objectType": "vmm.v4.ahv.config.Disk"}
            await self.v4.run("POST", "vmm", f"ahv/config/vms/{vm_id}/disks", json=body,
                              timeout=VM_TIMEOUT, poll=POLL)

    async def power_on(self, vm_id: str) -> None:
        vm, etag = await self.v4.get_with_etag("vmm", f"ahv/config/vms/{vm_id}")
        if vm.get("powerState") == "ON":
            return
        await self.v4.run("POST", "vmm", f"ahv/config/vms/{vm_id}/$actions/power-on",
                          headers={"If-Match": etag} if etag else None, timeout=VM_TIMEOUT,
                          poll=POLL)

    # -- release --------------------------------------------------------------------------------

    async def release(self, record: Record) -> None:
        try:
            await self._release(record)
        except ApiNotFoundError:
            log.debug("%s was already gone", record.describe())

    async def _release(self, record: Record) -> None:
        kind, rid = record.kind, record.resource_id
        if kind == "snapshot":
            rp = rid[len(V4_PREFIX):] if rid.startswith(V4_PREFIX) else rid
            await self.v4.run("DELETE", "dataprotection", f"config/recovery-points/{rp}",
                              poll=POLL)
        elif kind == "snapshot_pending":
            for rp in await self._by_name("dataprotection", "config/recovery-points", rid):
                await self.v4.run("DELETE", "dataprotection", f"config/recovery-points/{rp}",
                                  poll=POLL)
        elif kind == "vg_attachment":
            clients = await self.v4.list_all(
                "volumes", "config/iscsi-clients",
                filter=f"iscsiInitiatorName eq {_quote(str(record.scope['initiator']))}")
            for c in clients:
                await self.v4.run("POST", "volumes",
                                  f"config/volume-groups/{rid}/$actions/detach-iscsi-client",
                                  json={"extId": c["extId"],
                                        "$objectType": "volumes.v4.config.IscsiClientAttachment"},
                                  poll=POLL)
        elif kind == "volume_group":
            await self.v4.run("DELETE", "volumes", f"config/volume-groups/{rid}", poll=POLL)
        elif kind == "volume_group_pending":
            for vg in await self._by_name("volumes", "config/volume-groups", rid):
                await self.v4.run("DELETE", "volumes", f"config/volume-groups/{vg}", poll=POLL)
        elif kind == "vm":
            await self.v4.get("vmm", f"ahv/config/vms/{rid}")
            await self.v4.run("DELETE", "vmm", f"ahv/config/vms/{rid}", poll=POLL)
        elif kind == "vm_pending":
            # only a VM made after the record: a same-named older VM is not ours
            for vm in await self.v4.list_all("vmm", "ahv/config/vms",
                                             filter=f"name eq {_quote(rid)}"):
                made = str(vm.get("createTime") or "")
                if made and _epoch(made) >= record.created - 5:
                    await self.v4.run("DELETE", "vmm", f"ahv/config/vms/{vm['extId']}",
                                      poll=POLL)
        else:
            raise HypervisorError(f"ahv (v4): cannot release a {kind!r} resource")


def _epoch(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
