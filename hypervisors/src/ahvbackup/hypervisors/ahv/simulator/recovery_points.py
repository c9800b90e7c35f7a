"""v4 recovery points over the simulator's snapshots.

A recovery point (RP) holds one VM recovery point per VM; each is a vm snapshot taken on the VM's
cluster (the same copy-on-write snapshot a v3 ``vm_snapshots`` create makes, so v3 and v4 share
the disk store and its costs) plus the VM's configuration at that moment (for restore). Each
snapshotted disk is a disk recovery point with its own id. The snapshots an RP owns are its own:
v3 ``vm_snapshots/list`` does not show them. State persists in ``recovery_points.json`` next to
the inventory.
"""

from __future__ import annotations

__all__ = ["DiskRecoveryPoint", "RecoveryPoint", "RecoveryPoints", "VmRecoveryPoint"]

import contextlib
import json
import threading
import time
import uuid as uuidlib
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ahvbackup.core.fsutil import atomic_write_json

from .diskstore import ChangedRegions
from .errors import EntityNotFound, InvalidRequest
from .model import Disk, Nic, Task, Vm

if TYPE_CHECKING:
    from .simulator import Simulator

_FORMAT = 1


def _new_uuid() -> str:
    return str(uuidlib.uuid4())


@dataclass
class DiskRecoveryPoint:
    uuid: str
    vmdisk_uuid: str  # the VM disk (v4 ``diskExtId``)
    snapshot_file_path: str


@dataclass
class VmRecoveryPoint:
    uuid: str
    vm_uuid: str
    cluster_uuid: str
    snapshot_uuid: str
    vm_config: dict[str, Any]
    disks: list[DiskRecoveryPoint] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VmRecoveryPoint:
        d = dict(d)
        d["disks"] = [DiskRecoveryPoint(**x) for x in d["disks"]]
        return cls(**d)


@dataclass
class RecoveryPoint:
    uuid: str
    name: str
    recovery_point_type: str
    created: float
    expiration: float | None = None
    vms: list[VmRecoveryPoint] = field(default_factory=list)
    task_uuid: str | None = None
    failed: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RecoveryPoint:
        d = dict(d)
        d["vms"] = [VmRecoveryPoint.from_json(x) for x in d["vms"]]
        return cls(**d)

    def vm_rp(self, uuid: str) -> VmRecoveryPoint:
        for v in self.vms:
            if v.uuid == uuid:
                return v
        raise EntityNotFound("vm_recovery_point", uuid)


class RecoveryPoints:
    """The v4 recovery points of one simulator, ``sim.recovery_points``; thread-safe."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.points: dict[str, RecoveryPoint] = {}
        self._lock = threading.RLock()
        self._path = sim.state_dir / "recovery_points.json"
        if self._path.exists():
            doc = json.loads(self._path.read_text())
            self.points = {p["uuid"]: RecoveryPoint.from_json(p) for p in doc["recovery_points"]}

    def save(self) -> None:
        with self._lock:
            atomic_write_json(self._path, {
                "format": _FORMAT,
                "recovery_points": [asdict(p) for p in self.points.values()],
            })

    def get(self, uuid: str) -> RecoveryPoint:
        rp = self.points.get(uuid)
        if rp is None:
            raise EntityNotFound("recovery_point", uuid)
        return rp

    def owns_snapshot(self, snapshot_uuid: str) -> bool:
        return any(v.snapshot_uuid == snapshot_uuid
                   for p in list(self.points.values()) for v in p.vms)

    def create(self, *, name: str, recovery_point_type: str, vm_uuids: list[str],
               expiration: float | None = None, uuid: str | None = None,
               fail: str | None = None) -> RecoveryPoint:
        """Snapshot each VM on its cluster; the RP's task ends when the snapshots' tasks do."""
        sim = self.sim
        with self._lock:
            if uuid is not None and uuid in self.points:
                return self.points[uuid]
            if not vm_uuids:
                raise InvalidRequest("vmRecoveryPoints: at least one VM is required",
                                     kind="recovery_point")
            vms = [sim.vm(u) for u in vm_uuids]
            rp = RecoveryPoint(uuid=uuid or _new_uuid(), name=name,
                               recovery_point_type=recovery_point_type, created=time.time(),
                               expiration=expiration, failed=fail)
            if fail is None:
                taken: list[str] = []
                try:
                    for vm in vms:
                        snap = sim.create_vm_snapshot(
                            vm_uuid=vm.uuid, name=name, snapshot_type=recovery_point_type,
                            cluster_uuid=vm.cluster_uuid,
                        )
                        taken.append(snap.uuid)
                        rp.vms.append(VmRecoveryPoint(
                            uuid=_new_uuid(), vm_uuid=vm.uuid, cluster_uuid=vm.cluster_uuid,
                            snapshot_uuid=snap.uuid, vm_config=vm.to_json(),
                            disks=[DiskRecoveryPoint(uuid=_new_uuid(), vmdisk_uuid=f.vmdisk_uuid,
                                                     snapshot_file_path=f.snapshot_file_path)
                                   for f in snap.files],
                        ))
                except BaseException:
                    for s in taken:
                        with contextlib.suppress(EntityNotFound):
                            sim.delete_vm_snapshot(s)
                    raise
            task = sim.new_task("kRecoveryPointCreate", kind="recovery_point", uuid=rp.uuid,
                                name=name, cluster_uuid=None, error=fail)
            rp.task_uuid = task.uuid
            self.points[rp.uuid] = rp
            self.save()
            return rp

    def delete(self, uuid: str, *, fail: str | None = None) -> Task:
        sim = self.sim
        with self._lock:
            rp = self.get(uuid)
            task = sim.new_task("kRecoveryPointDelete", kind="recovery_point", uuid=rp.uuid,
                                name=rp.name, cluster_uuid=None, error=fail)
            if fail is None:
                del self.points[uuid]
                for v in rp.vms:
                    with contextlib.suppress(EntityNotFound):
                        sim.delete_vm_snapshot(v.snapshot_uuid)
                self.save()
            return task

    def set_expiration(self, uuid: str, expiration: float | None) -> Task:
        with self._lock:
            rp = self.get(uuid)
            rp.expiration = expiration
            self.save()
            return self.sim.new_task("kRecoveryPointUpdate", kind="recovery_point",
                                     uuid=rp.uuid, name=rp.name, cluster_uuid=None)

    def disk_rp(self, rp_uuid: str, vm_rp_uuid: str, disk_rp_uuid: str) -> DiskRecoveryPoint:
        vrp = self.get(rp_uuid).vm_rp(vm_rp_uuid)
        for d in vrp.disks:
            if d.uuid == disk_rp_uuid:
                return d
        raise EntityNotFound("disk_recovery_point", disk_rp_uuid)

    def find_disk_rp(self, disk_rp_uuid: str) -> tuple[RecoveryPoint, VmRecoveryPoint,
                                                        DiskRecoveryPoint]:
        """Where a disk recovery point is, by its id alone (VG data sources name only that)."""
        for rp in list(self.points.values()):
            for v in rp.vms:
                for d in v.disks:
                    if d.uuid == disk_rp_uuid:
                        return rp, v, d
        raise EntityNotFound("disk_recovery_point", disk_rp_uuid)

    def changed_regions(self, disk: DiskRecoveryPoint, reference: DiskRecoveryPoint | None, *,
                        offset: int, length: int | None) -> ChangedRegions:
        if reference is not None and reference.vmdisk_uuid != disk.vmdisk_uuid:
            raise InvalidRequest(
                f"referenceDiskRecoveryPointExtId: {reference.uuid!r} is a recovery point of "
                f"another disk than {disk.uuid!r}", kind="recovery_point")
        end = None if length is None else offset + length
        return self.sim.changed_regions(
            disk.snapshot_file_path,
            reference_snapshot_file_path=reference.snapshot_file_path if reference else None,
            start_offset=offset, end_offset=end)

    def restore(self, uuid: str, *, cluster_uuid: str | None,
                overrides: dict[str, dict[str, Any]], fail: str | None = None) -> Task:
        """New VMs from the RP's VM recovery points (``overrides``: by VM RP id, ``name`` and
        ``description``); the disks are clones of the snapshot, the VMs powered off."""
        sim = self.sim
        with self._lock:
            rp = self.get(uuid)
            for key in overrides:
                rp.vm_rp(key)
            chosen = [v for v in rp.vms if not overrides or v.uuid in overrides]
            made: list[Vm] = []
            if fail is None:
                for v in chosen:
                    old = Vm.from_json(v.vm_config)
                    over = overrides.get(v.uuid, {})
                    paths = {d.vmdisk_uuid: d.snapshot_file_path for d in v.disks}
                    disks = [
                        Disk(uuid=_new_uuid(), device_type=d.device_type,
                             adapter_type=d.adapter_type, device_index=d.device_index,
                             size=d.size, container_uuid=d.container_uuid,
                             source_path=paths.get(d.uuid))
                        for d in old.disks
                    ]
                    nics = [Nic(uuid=_new_uuid(), mac=n.mac, subnet_uuid=n.subnet_uuid)
                            for n in old.nics]
                    vm = Vm(uuid=_new_uuid(), name=str(over.get("name") or old.name),
                            cluster_uuid=cluster_uuid or v.cluster_uuid,
                            description=str(over.get("description") or old.description),
                            num_sockets=old.num_sockets,
                            num_vcpus_per_socket=old.num_vcpus_per_socket,
                            memory_mib=old.memory_mib, power_state="OFF",
                            boot_type=old.boot_type, disks=disks, nics=nics,
                            ngt_installed=old.ngt_installed, ngt_enabled=old.ngt_enabled,
                            ngt_capabilities=list(old.ngt_capabilities))
                    made.append(sim.create_vm(vm))
            first = made[0] if made else None
            return sim.new_task(
                "kRecoveryPointRestore", kind="vm" if first else "recovery_point",
                uuid=first.uuid if first else rp.uuid, name=first.name if first else rp.name,
                cluster_uuid=first.cluster_uuid if first else None, error=fail)
