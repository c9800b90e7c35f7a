"""Volume groups on the simulated Prism Elements, and what their iSCSI targets serve.

A volume group (VG) holds disks cloned from a snapshot file or a VM disk (copy-on-write clones
in the disk store, like images) and a list of attached external iSCSI initiators (by IQN). Each
cluster's iSCSI target (see `serve.py`) serves the VGs of that cluster: one target per VG, named
`iscsi_target` (`iqn.2010-06.com.nutanix:<name>-<uuid>`, read by clients from the API), one LUN
per disk in index order; only attached initiators may log in. State persists in
`volume_groups.json` next to the inventory.

Faults and counters for tests: `lun_shortfall` bytes are cut from every LUN's size as the target
reports it (the "LUN smaller than the API said" case); `read_latency` seconds are added to every
LUN read; a VG cloned from a vmdisk in `unoffered` (vmdisk uuids) is left out of its target's
discovery (a target that does not offer the disk); `active_reads` and `bytes_read` count what the
targets are doing.
"""

from __future__ import annotations

__all__ = ["VgDisk", "VolumeGroup", "VolumeGroups", "volume_groups"]

import contextlib
import json
import re
import threading
import time
import uuid as uuidlib
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ahvbackup.core.fsutil import atomic_write_json

from .diskstore import UnknownDiskError
from .errors import EntityNotFound, InvalidRequest

if TYPE_CHECKING:
    from .simulator import Simulator

TARGET_PREFIX = "iqn.2010-06.com.nutanix"
_FORMAT = 1


def _iqn_part(name: str) -> str:
    """A VG name as it may appear in an IQN (lower case letters, digits, '.', '-')."""
    return re.sub(r"[^a-z0-9.-]+", "-", name.lower()).strip("-") or "vg"


@dataclass
class VgDisk:
    uuid: str  # vmdisk uuid of the VG disk, also its id in the disk store
    index: int
    size: int
    container_uuid: str
    source: str  # the snapshot file path or vmdisk it was cloned from ("" when created empty)


@dataclass
class VolumeGroup:
    uuid: str
    name: str
    cluster_uuid: str
    iscsi_target: str
    description: str = ""
    disks: list[VgDisk] = field(default_factory=list)
    attachments: list[str] = field(default_factory=list)  # initiator IQNs
    created: float = 0.0
    task_uuid: str | None = None
    usage_type: str = "USER"  # v4 usageType
    is_hidden: bool = False  # v4 isHidden

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VolumeGroup:
        d = dict(d)
        d["disks"] = [VgDisk(**x) for x in d["disks"]]
        return cls(**d)


class _StoreLun:
    """A VG disk as an iSCSI LUN backend (blocking calls, run by the target in threads)."""

    def __init__(self, vgs: VolumeGroups, disk: VgDisk) -> None:
        self._vgs = vgs
        self._disk = disk

    @property
    def size(self) -> int:
        return max(0, self._disk.size - self._vgs.lun_shortfall)

    def read_into(self, offset: int, buf: memoryview) -> None:
        vgs = self._vgs
        with vgs._lock:
            vgs.active_reads += 1
        try:
            if vgs.read_latency:
                time.sleep(vgs.read_latency)
            buf[:] = vgs.sim.store.read(self._disk.uuid, offset, len(buf))
        except (UnknownDiskError, ValueError) as err:  # deleted under a running read
            raise OSError(f"volume group disk {self._disk.uuid}: {err}") from err
        finally:
            with vgs._lock:
                vgs.active_reads -= 1
                vgs.bytes_read += len(buf)

    def write(self, offset: int, data: memoryview) -> None:
        try:
            self._vgs.sim.store.write(self._disk.uuid, offset, data)
        except (UnknownDiskError, ValueError) as err:
            raise OSError(f"volume group disk {self._disk.uuid}: {err}") from err


class VolumeGroups:
    """The volume groups of one simulator (all clusters), ``sim.volume_groups``; thread-safe
    like the simulator."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.groups: dict[str, VolumeGroup] = {}
        self.lun_shortfall = 0
        self.read_latency = 0.0
        self.unoffered: set[str] = set()
        self.active_reads = 0
        self.bytes_read = 0
        self._lock = threading.RLock()
        self._path = sim.state_dir / "volume_groups.json"
        self._on_detach: list[Any] = []
        if self._path.exists():
            doc = json.loads(self._path.read_text())
            self.groups = {g["uuid"]: VolumeGroup.from_json(g) for g in doc["volume_groups"]}

    def save(self) -> None:
        with self._lock:
            atomic_write_json(self._path, {
                "format": _FORMAT,
                "volume_groups": [asdict(g) for g in self.groups.values()],
            })

    def on_detach(self, callback: Any) -> None:
        """`callback(target_iqn, initiator_iqn or None)` when access is withdrawn (the served
        target drops those sessions, as a real cluster does)."""
        self._on_detach.append(callback)

    def _withdrawn(self, target: str, initiator: str | None) -> None:
        for cb in list(self._on_detach):
            cb(target, initiator)

    def get(self, vg_uuid: str, *, cluster_uuid: str | None = None) -> VolumeGroup:
        vg = self.groups.get(vg_uuid)
        if vg is None or (cluster_uuid is not None and vg.cluster_uuid != cluster_uuid):
            raise EntityNotFound("volume_group", vg_uuid)
        return vg

    def of_cluster(self, cluster_uuid: str) -> list[VolumeGroup]:
        return [g for g in list(self.groups.values()) if g.cluster_uuid == cluster_uuid]

    def create(self, *, cluster_uuid: str, name: str, description: str = "",
               disks: list[dict[str, Any]], uuid: str | None = None,
               fail: str | None = None, usage_type: str = "USER",
               is_hidden: bool = False) -> VolumeGroup:
        """A new VG; each disk spec is {"clone_from": path or vmdisk uuid} or {"size": n}."""
        sim = self.sim
        with self._lock:
            if uuid is not None and uuid in self.groups:
                return self.groups[uuid]
            cluster = sim.cluster(cluster_uuid)
            vg_uuid = uuid or str(uuidlib.uuid4())
            vg = VolumeGroup(uuid=vg_uuid, name=name, cluster_uuid=cluster_uuid,
                             description=description, created=time.time(),
                             iscsi_target=f"{TARGET_PREFIX}:{_iqn_part(name)}-{vg_uuid}",
                             usage_type=usage_type, is_hidden=is_hidden)
            if fail is None:
                made: list[str] = []
                try:
                    for index, spec in enumerate(disks):
                        vg.disks.append(self._make_disk(cluster, index, spec))
                        made.append(vg.disks[-1].uuid)
                except BaseException:
                    for d in made:
                        with contextlib.suppress(UnknownDiskError):
                            sim.store.delete_disk(d)
                    raise
            task = sim.new_task("kVolumeGroupCreate", kind="volume_group", uuid=vg.uuid,
                                name=name, cluster_uuid=cluster_uuid, error=fail)
            vg.task_uuid = task.uuid
            if fail is None:
                self.groups[vg.uuid] = vg
                self.save()
            return vg

    def _make_disk(self, cluster: Any, index: int, spec: dict[str, Any]) -> VgDisk:
        sim = self.sim
        disk_id = str(uuidlib.uuid4())
        wanted = spec.get("container_uuid")
        if wanted and all(c.uuid != wanted for c in cluster.containers):
            raise InvalidRequest(f"disk_list[{index}]: cluster {cluster.name} has no container "
                                 f"{wanted!r}", kind="volume_group")
        container = cluster.container(wanted).uuid
        source = spec.get("clone_from")
        if source:
            path = source if "/" in source else f"/x/.acropolis/vmdisk/{source}"
            src_disk, sid = sim.resolve_file(path)
            sim.store.clone_disk(disk_id, source_disk=src_disk, snapshot=sid)
        else:
            sim.store.create_disk(disk_id, int(spec["size"]))
        return VgDisk(uuid=disk_id, index=index, size=sim.store.size(disk_id),
                      container_uuid=container, source=source or "")

    def add_disk(self, vg_uuid: str, spec: dict[str, Any], *, cluster_uuid: str | None = None,
                 fail: str | None = None) -> tuple[VgDisk | None, Any]:
        """Add one disk (a spec as for ``create``) at the next free index; (disk, task)."""
        sim = self.sim
        with self._lock:
            vg = self.get(vg_uuid, cluster_uuid=cluster_uuid)
            disk = None
            if fail is None:
                index = spec.get("index")
                if index is None:
                    index = max((d.index for d in vg.disks), default=-1) + 1
                if any(d.index == index for d in vg.disks):
                    raise InvalidRequest(f"index: volume group {vg.uuid!r} already has a disk "
                                         f"at index {index}", kind="volume_group")
                disk = self._make_disk(sim.cluster(vg.cluster_uuid), int(index), spec)
                vg.disks.append(disk)
                vg.disks.sort(key=lambda d: d.index)
                self.save()
            task = sim.new_task("kVolumeDiskCreate", kind="volume_group", uuid=vg.uuid,
                                name=vg.name, cluster_uuid=vg.cluster_uuid, error=fail)
            return disk, task

    def attach(self, vg_uuid: str, initiator: str, *, cluster_uuid: str | None = None) -> None:
        if not initiator.startswith(("iqn.", "eui.", "naa.")):
            raise InvalidRequest(
                f"iscsi_client.client_address: the simulator attaches initiators by IQN "
                f"(got {initiator!r})", kind="volume_group")
        with self._lock:
            vg = self.get(vg_uuid, cluster_uuid=cluster_uuid)
            if initiator not in vg.attachments:
                vg.attachments.append(initiator)
                self.save()

    def detach(self, vg_uuid: str, initiator: str, *, cluster_uuid: str | None = None) -> None:
        with self._lock:
            vg = self.get(vg_uuid, cluster_uuid=cluster_uuid)
            if initiator in vg.attachments:
                vg.attachments.remove(initiator)
                self.save()
        self._withdrawn(vg.iscsi_target, initiator)

    def delete(self, vg_uuid: str, *, cluster_uuid: str | None = None,
               fail: str | None = None) -> Any:
        sim = self.sim
        with self._lock:
            vg = self.get(vg_uuid, cluster_uuid=cluster_uuid)
            task = sim.new_task("kVolumeGroupDelete", kind="volume_group", uuid=vg.uuid,
                                name=vg.name, cluster_uuid=vg.cluster_uuid, error=fail)
            if fail is not None:
                return task
            del self.groups[vg_uuid]
            self.save()
        self._withdrawn(vg.iscsi_target, None)
        for d in vg.disks:
            with contextlib.suppress(UnknownDiskError):
                sim.store.delete_disk(d.uuid)
        return task

    def exports(self, cluster_uuid: str) -> dict[str, Any]:
        """What the cluster's iSCSI target serves now: {target IQN: Export}."""
        from ahvbackup.transports.iscsi.target import Export

        out: dict[str, Any] = {}
        for vg in self.of_cluster(cluster_uuid):
            if any(d.source.rsplit("/", 1)[-1] in self.unoffered for d in vg.disks):
                continue
            attached = frozenset(vg.attachments)
            out[vg.iscsi_target] = Export(
                iqn=vg.iscsi_target, luns=[_StoreLun(self, d) for d in vg.disks],
                read_only=False, allowed=attached.__contains__, serial=vg.uuid,
            )
        return out


def volume_groups(sim: Simulator) -> VolumeGroups:
    """The volume groups of `sim` (the same as ``sim.volume_groups``; kept for callers)."""
    return sim.volume_groups
