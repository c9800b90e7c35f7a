"""The simulator's model: one ``Simulator`` holds the inventory, the disks, volume groups, users,
tasks and faults.

Every listener (Prism Central and each Prism Element) is a view of the same ``Simulator``; the
model knows nothing of HTTP (``app.pc_app(sim)`` and ``app.pe_app(sim)`` build the views). The
model's operations are synchronous (they may block on the disk store) and thread-safe; request
handlers run them in worker threads. Tasks are not background jobs: an operation does its work
at once and its task reports QUEUED, RUNNING and then SUCCEEDED or FAILED as the simulator's
clock passes ``task_seconds``, so a client sees real state progression without the simulator
having to schedule anything.
"""

from __future__ import annotations

__all__ = [
    "EntityConflict",
    "EntityNotFound",
    "InvalidRequest",
    "Simulator",
    "SimulatorError",
]

import contextlib
import json
import threading
import time
import uuid as uuidlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from ahvbackup.core.fsutil import atomic_write_json

from .diskstore import ChangedRegions, DiskStore, UnknownDiskError, UnknownSnapshotError
from .errors import EntityConflict, EntityNotFound, InvalidRequest, SimulatorError
from .faults import Faults, Stats
from .model import (
    Cluster,
    Disk,
    Image,
    SnapshotFile,
    Subnet,
    Task,
    Vm,
    VmSnapshot,
)
from .recovery_points import RecoveryPoints
from .seed import seed_inventory
from .tokens import ClusterTokens, RequestIds
from .users import SEED_USERS, Sessions, Users
from .volume_groups import VolumeGroups

_FORMAT = 1
_KEEP_TASKS = 1000
_PERSIST_TASKS = 200


def _new_uuid() -> str:
    return str(uuidlib.uuid4())


class Simulator:
    """A simulated Prism Central with ``pe_count`` Prism Element clusters, kept in ``state_dir``.

    ``task_seconds``: how long every task takes from its request to its final state.
    ``clock``: the clock tasks are timed on (``time.monotonic``; pass ``trio.current_time``
    for tests on trio's autojump clock). ``changed_regions_page_size``: regions per
    ``data/changed_regions`` answer before ``next_offset`` paginates. ``sync``: fsync the disk
    store (off makes large tests faster; state still survives a clean restart).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        seed: bool = True,
        pe_count: int = 1,
        task_seconds: float = 0.3,
        clock: Callable[[], float] = time.monotonic,
        changed_regions_page_size: int = 1024,
        sync: bool = True,
        v4: bool = True,
    ) -> None:
        if not 1 <= pe_count <= 50:
            raise ValueError(f"pe_count: must be 1..50 (got {pe_count})")
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.task_seconds = task_seconds
        self.clock = clock
        self.changed_regions_page_size = changed_regions_page_size
        #: serve the v4 namespaces (False: a Prism that speaks only v3; may change while serving)
        self.v4 = v4
        self.tokens = ClusterTokens()
        self.request_ids = RequestIds()
        self.store = DiskStore(self.state_dir, sync=sync)
        self.faults = Faults()
        self.stats = Stats()
        self.users = Users()
        self.sessions = Sessions()
        self.pc_uuid = _new_uuid()
        self.pc_name = "sim-prism-central"
        self.clusters: dict[str, Cluster] = {}
        self.subnets: dict[str, Subnet] = {}
        self.vms: dict[str, Vm] = {}
        self.images: dict[str, Image] = {}
        self.snapshots: dict[str, VmSnapshot] = {}
        self.tasks: OrderedDict[str, Task] = OrderedDict()
        self.orphan_disks: set[str] = set()
        self.idempotence: dict[str, str] = {}
        self._files: dict[str, tuple[str, str]] = {}
        self._lock = threading.RLock()
        self._vm_locks: dict[str, threading.Lock] = {}
        self._inventory = self.state_dir / "inventory.json"
        if self._inventory.exists():
            self._load()
        else:
            seed_inventory(self, pe_count=pe_count, with_vms=seed)
            self.save()
        self.volume_groups = VolumeGroups(self)  # loaded from state_dir, like the inventory
        self.recovery_points = RecoveryPoints(self)  # v4 recovery points, likewise

    # ---- persistence -------------------------------------------------------------------------

    def save(self) -> None:
        """Write the inventory atomically (the disks persist themselves in the store)."""
        with self._lock:
            tasks = list(self.tasks.values())[-_PERSIST_TASKS:]
            doc = {
                "format": _FORMAT,
                "pc": {"uuid": self.pc_uuid, "name": self.pc_name},
                "clusters": [c.to_json() for c in self.clusters.values()],
                "subnets": [s.to_json() for s in self.subnets.values()],
                "vms": [v.to_json() for v in self.vms.values()],
                "images": [i.to_json() for i in self.images.values()],
                "snapshots": [s.to_json() for s in self.snapshots.values()],
                "tasks": [t.to_json() for t in tasks],
                "users": self.users.to_json(),
                "orphan_disks": sorted(self.orphan_disks),
            }
            atomic_write_json(self._inventory, doc)

    def _load(self) -> None:
        doc = json.loads(self._inventory.read_text())
        if doc.get("format") != _FORMAT:
            raise InvalidRequest(
                f"{self._inventory}: format: unsupported inventory format (got {doc.get('format')})"
            )
        self.pc_uuid = doc["pc"]["uuid"]
        self.pc_name = doc["pc"]["name"]
        self.clusters = {c["uuid"]: Cluster.from_json(c) for c in doc["clusters"]}
        self.subnets = {s["uuid"]: Subnet(**s) for s in doc["subnets"]}
        self.vms = {v["uuid"]: Vm.from_json(v) for v in doc["vms"]}
        self.images = {i["uuid"]: Image(**i) for i in doc["images"]}
        self.snapshots = {s["uuid"]: VmSnapshot.from_json(s) for s in doc["snapshots"]}
        for t in doc["tasks"]:
            task = Task(**t)
            task.final = True
            self.tasks[task.uuid] = task
        self.users.load(doc["users"])
        self.orphan_disks = set(doc.get("orphan_disks", []))
        for snap in self.snapshots.values():
            for f in snap.files:
                self._files[f.snapshot_file_path] = (snap.uuid, f.vmdisk_uuid)

    def close(self) -> None:
        self.store.close()

    def seed_users(self) -> None:
        for name, password, role in SEED_USERS:
            self.users.add(name, password, role)

    # ---- lookups -----------------------------------------------------------------------------

    def cluster(self, uuid: str) -> Cluster:
        try:
            return self.clusters[uuid]
        except KeyError:
            raise EntityNotFound("cluster", uuid) from None

    def vm(self, uuid: str) -> Vm:
        try:
            return self.vms[uuid]
        except KeyError:
            raise EntityNotFound("vm", uuid) from None

    def find_vm(self, name: str) -> Vm:
        """The VM named ``name`` (a convenience for tests and demos)."""
        for vm in list(self.vms.values()):
            if vm.name == name:
                return vm
        raise EntityNotFound("vm", name)

    def image(self, uuid: str) -> Image:
        try:
            return self.images[uuid]
        except KeyError:
            raise EntityNotFound("image", uuid) from None

    def snapshot(self, uuid: str) -> VmSnapshot:
        try:
            return self.snapshots[uuid]
        except KeyError:
            raise EntityNotFound("vm_snapshot", uuid) from None

    def subnet(self, uuid: str) -> Subnet:
        try:
            return self.subnets[uuid]
        except KeyError:
            raise EntityNotFound("subnet", uuid) from None

    def task(self, uuid: str) -> Task:
        try:
            return self.tasks[uuid]
        except KeyError:
            raise EntityNotFound("task", uuid) from None

    # ---- tasks -------------------------------------------------------------------------------

    def new_task(
        self, operation: str, *, kind: str, uuid: str, name: str, cluster_uuid: str | None,
        error: str | None = None,
    ) -> Task:
        task = Task(
            uuid=_new_uuid(),
            operation_type=operation,
            cluster_uuid=cluster_uuid,
            entity_kind=kind,
            entity_uuid=uuid,
            entity_name=name,
            created=time.time(),
            started=self.clock(),
            duration=self.task_seconds,
            error=error,
            error_code="INTERNAL_ERROR" if error else None,
        )
        with self._lock:
            self.tasks[task.uuid] = task
            while len(self.tasks) > _KEEP_TASKS:
                self.tasks.popitem(last=False)
        return task

    def task_progress(self, task: Task) -> tuple[str, int]:
        """The task's status (QUEUED, RUNNING, SUCCEEDED, FAILED) and percentage now."""
        if not task.final:
            elapsed = self.clock() - task.started
            if elapsed < task.duration:
                if elapsed < task.duration * 0.2:
                    return "QUEUED", 0
                return "RUNNING", min(99, int(100 * elapsed / task.duration))
            task.final = True
        return ("FAILED" if task.error else "SUCCEEDED"), 100

    def task_done(self, task_uuid: str | None) -> bool:
        if task_uuid is None or task_uuid not in self.tasks:
            return True
        return self.task_progress(self.tasks[task_uuid])[0] in ("SUCCEEDED", "FAILED")

    def entity_state(self, task_uuid: str | None, failed: str | None) -> str:
        """v3 ``status.state`` of an entity whose last operation ran as ``task_uuid``."""
        if not self.task_done(task_uuid):
            return "PENDING"
        return "ERROR" if failed else "COMPLETE"

    # ---- VMs ---------------------------------------------------------------------------------

    def _vm_lock(self, vm_uuid: str) -> threading.Lock:
        with self._lock:
            return self._vm_locks.setdefault(vm_uuid, threading.Lock())

    def _materialize(self, disk: Disk) -> None:
        if disk.device_type != "DISK":
            return
        if disk.source_path:
            source_disk, sid = self.resolve_file(disk.source_path)
            self.store.clone_disk(disk.uuid, source_disk=source_disk, snapshot=sid)
            size = self.store.size(disk.uuid)
            disk.size = max(disk.size, size)
            if disk.size > size:
                self.store.resize(disk.uuid, disk.size)
        elif disk.source_image:
            image = self.image(disk.source_image)
            if image.disk_id is None or image.size is None:
                raise InvalidRequest(
                    f"image {image.uuid!r} has no data yet; upload it before using it as a "
                    "disk source", kind="image", details={"uuid": image.uuid},
                )
            self.store.clone_disk(disk.uuid, source_disk=image.disk_id, snapshot=None)
            disk.size = max(disk.size, image.size)
            if disk.size > image.size:
                self.store.resize(disk.uuid, disk.size)
        else:
            self.store.create_disk(disk.uuid, disk.size)

    def _release_disk(self, disk_id: str) -> None:
        """Delete a disk, or keep it (orphaned) while vm snapshots still hold it."""
        if any(f.vmdisk_uuid == disk_id for s in self.snapshots.values() for f in s.files):
            self.orphan_disks.add(disk_id)
            return
        self.orphan_disks.discard(disk_id)
        with contextlib.suppress(UnknownDiskError):
            self.store.delete_disk(disk_id)

    def create_vm(self, vm: Vm, *, fail: str | None = None) -> Vm:
        """Add ``vm`` (its disks are made in the store: empty, or cloned from their image)."""
        with self._lock:
            if vm.uuid in self.vms:
                return self.vms[vm.uuid]
            self.cluster(vm.cluster_uuid)
            now = time.time()
            vm.created = vm.updated = now
            if fail is None:
                made: list[str] = []
                try:
                    for disk in vm.disks:
                        self._materialize(disk)
                        made.append(disk.uuid)
                except BaseException:
                    for d in made:
                        self.store.delete_disk(d)
                    raise
            else:
                vm.failed = fail
            task = self.new_task(
                "kVmCreate", kind="vm", uuid=vm.uuid, name=vm.name,
                cluster_uuid=vm.cluster_uuid, error=fail,
            )
            vm.task_uuid = task.uuid
            self.vms[vm.uuid] = vm
            self.save()
            return vm

    def update_vm(self, new: Vm, *, spec_version: int | None, fail: str | None = None) -> Vm:
        """Replace a VM's spec by ``new``: disks are matched by UUID, added, grown or removed."""
        with self._lock:
            old = self.vm(new.uuid)
            if spec_version is not None and spec_version != old.spec_version:
                raise EntityConflict(
                    f"vm {old.uuid!r}: spec_version {spec_version} is stale (current "
                    f"{old.spec_version}); GET the VM and retry",
                    kind="vm", details={"spec_version": old.spec_version},
                )
            if fail is None:
                old_disks = {d.uuid: d for d in old.disks}
                for disk in new.disks:
                    prev = old_disks.get(disk.uuid)
                    if prev is None:
                        self._materialize(disk)
                    elif disk.device_type == "DISK":
                        if disk.size < prev.size:
                            raise InvalidRequest(
                                f"vm {old.uuid!r}: disk {disk.uuid}: disk_size_bytes cannot "
                                f"shrink (from {prev.size} to {disk.size})", kind="vm",
                            )
                        if disk.size > prev.size:
                            self.store.resize(disk.uuid, disk.size)
                kept = {d.uuid for d in new.disks}
                for d in old.disks:
                    if d.uuid not in kept and d.device_type == "DISK":
                        self._release_disk(d.uuid)
                new.spec_version = old.spec_version + 1
                new.created = old.created
                new.updated = time.time()
                new.failed = None
            else:
                new = old
            task = self.new_task(
                "kVmUpdate", kind="vm", uuid=new.uuid, name=new.name,
                cluster_uuid=new.cluster_uuid, error=fail,
            )
            new.task_uuid = task.uuid
            self.vms[new.uuid] = new
            self.save()
            return new

    def delete_vm(self, vm_uuid: str, *, fail: str | None = None) -> Task:
        with self._lock:
            vm = self.vm(vm_uuid)
            task = self.new_task(
                "kVmDelete", kind="vm", uuid=vm.uuid, name=vm.name,
                cluster_uuid=vm.cluster_uuid, error=fail,
            )
            if fail is None:
                del self.vms[vm_uuid]
                if vm.failed is None:
                    for d in vm.data_disks:
                        self._release_disk(d.uuid)
            else:
                vm.task_uuid = task.uuid
            self.save()
            return task

    # ---- workload ----------------------------------------------------------------------------

    def _disk_id(self, vm_uuid: str, disk_index: int) -> str:
        with self._lock:
            disks = self.vm(vm_uuid).data_disks
            if not 0 <= disk_index < len(disks):
                raise InvalidRequest(
                    f"vm {vm_uuid!r}: disk_index {disk_index} out of range (the VM has "
                    f"{len(disks)} disks)", kind="vm",
                )
            return disks[disk_index].uuid

    def write_disk(self, vm_uuid: str, disk_index: int, offset: int, data: bytes) -> None:
        """Write into a VM's live disk (index into its data disks, in ``disk_list`` order)."""
        disk_id = self._disk_id(vm_uuid, disk_index)
        with self._vm_lock(vm_uuid):
            self._range_ok(disk_id, offset, len(data))
            self.store.write(disk_id, offset, data)

    def zero_disk(self, vm_uuid: str, disk_index: int, offset: int, length: int) -> None:
        disk_id = self._disk_id(vm_uuid, disk_index)
        with self._vm_lock(vm_uuid):
            self._range_ok(disk_id, offset, length)
            self.store.zero(disk_id, offset, length)

    def trim_disk(self, vm_uuid: str, disk_index: int, offset: int, length: int) -> None:
        disk_id = self._disk_id(vm_uuid, disk_index)
        with self._vm_lock(vm_uuid):
            self._range_ok(disk_id, offset, length)
            self.store.trim(disk_id, offset, length)

    def read_disk(self, vm_uuid: str, disk_index: int, offset: int, length: int) -> bytes:
        disk_id = self._disk_id(vm_uuid, disk_index)
        self._range_ok(disk_id, offset, length)
        return self.store.read(disk_id, offset, length)

    def _range_ok(self, disk_id: str, offset: int, length: int) -> None:
        size = self.store.size(disk_id)
        if offset < 0 or length < 0 or offset + length > size:
            raise InvalidRequest(
                f"disk {disk_id}: range offset={offset} length={length} is outside the disk "
                f"(size {size})", kind="vm_disk",
            )

    def read_snapshot_disk(
        self, snapshot_uuid: str, vmdisk_uuid: str, offset: int, length: int
    ) -> bytes:
        """Bytes of one disk as captured by a vm snapshot."""
        snap = self.snapshot(snapshot_uuid)
        for f in snap.files:
            if f.vmdisk_uuid == vmdisk_uuid:
                return self.store.read_snapshot(vmdisk_uuid, f.store_snapshot, offset, length)
        raise EntityNotFound("vm_disk", vmdisk_uuid)

    # ---- vm snapshots (Prism Element) --------------------------------------------------------

    def create_vm_snapshot(
        self,
        *,
        vm_uuid: str,
        name: str,
        snapshot_type: str,
        cluster_uuid: str,
        uuid: str | None = None,
        expiration_time_msecs: int | None = None,
        fail: str | None = None,
    ) -> VmSnapshot:
        """Snapshot every disk of the VM at one instant (writes to the VM wait meanwhile)."""
        with self._lock:
            if uuid is not None and uuid in self.snapshots:
                return self.snapshots[uuid]
            vm = self.vm(vm_uuid)
            if vm.cluster_uuid != cluster_uuid:
                raise EntityNotFound("vm", vm_uuid)
            if snapshot_type not in ("CRASH_CONSISTENT", "APPLICATION_CONSISTENT"):
                raise InvalidRequest(
                    f"spec.snapshot_type: must be CRASH_CONSISTENT or APPLICATION_CONSISTENT "
                    f"(got {snapshot_type!r})", kind="vm_snapshot",
                )
            if snapshot_type == "APPLICATION_CONSISTENT" and not vm.app_consistent_capable:
                cause = (
                    "NGT_NOT_INSTALLED" if not vm.ngt_installed
                    else "NGT_NOT_ENABLED" if not vm.ngt_enabled
                    else "VSS_SNAPSHOT_NOT_ENABLED"
                )
                raise InvalidRequest(
                    f"vm {vm.name!r} ({vm.uuid}) cannot take an APPLICATION_CONSISTENT snapshot: "
                    f"{cause} (Nutanix Guest Tools must be enabled with VSS_SNAPSHOT)",
                    kind="vm_snapshot",
                    details={"vm_uuid": vm.uuid, "snapshot_type": snapshot_type, "cause": cause},
                )
            cluster = self.cluster(cluster_uuid)
            entity_id = cluster.next_entity_id
            cluster.next_entity_id += 1
            snap = VmSnapshot(
                uuid=uuid or _new_uuid(),
                name=name,
                vm_uuid=vm.uuid,
                cluster_uuid=cluster_uuid,
                snapshot_type=snapshot_type,
                entity_id=entity_id,
                expiration_time_msecs=expiration_time_msecs,
                created=time.time(),
                failed=fail,
            )
            if fail is None:
                with self._vm_lock(vm.uuid):
                    taken: list[tuple[str, str]] = []
                    try:
                        for disk in vm.data_disks:
                            taken.append((disk.uuid, self.store.snapshot(disk.uuid)))
                    except BaseException:
                        for disk_id, sid in taken:
                            self.store.delete_snapshot(disk_id, sid)
                        raise
                for disk_id, sid in taken:
                    container = cluster.container(
                        next(d.container_uuid for d in vm.disks if d.uuid == disk_id)
                    ).name
                    rel = f".acropolis/vmdisk/{disk_id}"
                    f = SnapshotFile(
                        vmdisk_uuid=disk_id,
                        file_path=f"/{container}/{rel}",
                        snapshot_file_path=(
                            f"/{container}/.snapshot/{entity_id % 100:02d}/"
                            f"{cluster.cluster_id}-{cluster.incarnation}-{entity_id}/{rel}"
                        ),
                        store_snapshot=sid,
                    )
                    snap.files.append(f)
                    self._files[f.snapshot_file_path] = (snap.uuid, disk_id)
            running = sum(
                1 for t in self.tasks.values()
                if t.operation_type == "kVmSnapshotCreate" and not self.task_done(t.uuid)
            )
            self.stats.peak_concurrent_snapshot_creations = max(
                self.stats.peak_concurrent_snapshot_creations, running + 1
            )
            task = self.new_task(
                "kVmSnapshotCreate", kind="vm_snapshot", uuid=snap.uuid, name=name,
                cluster_uuid=cluster_uuid, error=fail,
            )
            snap.task_uuid = task.uuid
            self.snapshots[snap.uuid] = snap
            self.save()
            return snap

    def delete_vm_snapshot(self, snapshot_uuid: str, *, fail: str | None = None) -> Task:
        with self._lock:
            snap = self.snapshot(snapshot_uuid)
            task = self.new_task(
                "kVmSnapshotDelete", kind="vm_snapshot", uuid=snap.uuid, name=snap.name,
                cluster_uuid=snap.cluster_uuid, error=fail,
            )
            if fail is None:
                del self.snapshots[snapshot_uuid]
                for f in snap.files:
                    self._files.pop(f.snapshot_file_path, None)
                    with contextlib.suppress(UnknownDiskError, UnknownSnapshotError):
                        self.store.delete_snapshot(f.vmdisk_uuid, f.store_snapshot)
                    if f.vmdisk_uuid in self.orphan_disks:
                        self._release_disk(f.vmdisk_uuid)
            self.save()
            return task

    def resolve_file(self, path: str) -> tuple[str, str | None]:
        """(disk id, store snapshot id or None for live) of a snapshot or vmdisk file path."""
        with self._lock:
            hit = self._files.get(path)
            if hit is not None:
                snap_uuid, disk_id = hit
                snap = self.snapshots[snap_uuid]
                sid = next(f.store_snapshot for f in snap.files if f.vmdisk_uuid == disk_id)
                return disk_id, sid
            parts = path.strip("/").split("/")
            if len(parts) == 4 and parts[1:3] == [".acropolis", "vmdisk"]:
                for vm in self.vms.values():
                    for d in vm.data_disks:
                        if d.uuid == parts[3]:
                            return d.uuid, None
                vgs = getattr(self, "volume_groups", None)  # made after the inventory loads
                for vg in list(vgs.groups.values()) if vgs is not None else ():
                    for vd in vg.disks:
                        if vd.uuid == parts[3]:
                            return vd.uuid, None
        raise EntityNotFound("file", path)

    def vmdisk_size(self, vmdisk_uuid: str, *, cluster_uuid: str, where: str) -> int:
        """The size of a vmdisk (a VM's or a volume group's disk) that a new disk of a VM on
        `cluster_uuid` clones; one on another cluster (or none) is refused."""
        with self._lock:
            found = [(vm.cluster_uuid, d.size) for vm in self.vms.values()
                     for d in vm.data_disks if d.uuid == vmdisk_uuid]
            found += [(vg.cluster_uuid, vd.size) for vg in list(self.volume_groups.groups.values())
                      for vd in vg.disks if vd.uuid == vmdisk_uuid]
        if not found:
            raise InvalidRequest(f"{where}.uuid: no vm_disk {vmdisk_uuid!r}", kind="vm",
                                 details={"uuid": vmdisk_uuid})
        cluster, size = found[0]
        if cluster != cluster_uuid:
            raise InvalidRequest(f"{where}.uuid: vm_disk {vmdisk_uuid!r} is on another cluster "
                                 "(a disk clones only within its cluster)", kind="vm",
                                 details={"uuid": vmdisk_uuid})
        return size

    def changed_regions(
        self,
        snapshot_file_path: str,
        *,
        reference_snapshot_file_path: str | None = None,
        start_offset: int = 0,
        end_offset: int | None = None,
    ) -> ChangedRegions:
        """Changed regions between two snapshot files of the same disk (one page)."""
        hit = self._files.get(snapshot_file_path)
        if hit is None:
            raise EntityNotFound("snapshot_file_path", snapshot_file_path)
        disk_id, sid = self.resolve_file(snapshot_file_path)
        ref_sid = None
        if reference_snapshot_file_path:
            if reference_snapshot_file_path not in self._files:
                raise EntityNotFound("reference_snapshot_file_path", reference_snapshot_file_path)
            ref_disk, ref_sid = self.resolve_file(reference_snapshot_file_path)
            if ref_disk != disk_id:
                raise InvalidRequest(
                    f"reference_snapshot_file_path: {reference_snapshot_file_path!r} is a "
                    f"snapshot of another disk than {snapshot_file_path!r}", kind="data",
                )
        try:
            return self.store.changed_regions(
                disk_id, sid or "", ref_sid, start=start_offset, end=end_offset,
                limit=self.changed_regions_page_size,
            )
        except ValueError as err:
            raise InvalidRequest(str(err), kind="data") from err

    # ---- images (Prism Central) --------------------------------------------------------------

    def create_image(
        self,
        *,
        name: str,
        description: str = "",
        image_type: str = "DISK_IMAGE",
        source_uri: str | None = None,
        source_vmdisk: str | None = None,
        uuid: str | None = None,
        fail: str | None = None,
    ) -> Image:
        """A new image: a copy-on-write clone of a snapshot file / vmdisk, or empty for upload."""
        with self._lock:
            if uuid is not None and uuid in self.images:
                return self.images[uuid]
            image = Image(
                uuid=uuid or _new_uuid(), name=name, description=description,
                image_type=image_type, source_uri=source_uri, created=time.time(),
            )
            image.updated = image.created
            source: tuple[str, str | None] | None = None
            if source_uri is not None:
                source = self.resolve_file(self._nfs_path(source_uri))
            elif source_vmdisk is not None:
                source = self.resolve_file(f"/x/.acropolis/vmdisk/{source_vmdisk}")
            if fail is not None:
                image.failed = fail
            elif source is not None:
                disk_id, sid = source
                image.disk_id = f"image-{image.uuid}"
                self.store.clone_disk(image.disk_id, source_disk=disk_id, snapshot=sid)
                image.size = self.store.size(image.disk_id)
            task = self.new_task(
                "kImageCreate", kind="image", uuid=image.uuid, name=name, cluster_uuid=None,
                error=fail,
            )
            image.task_uuid = task.uuid
            self.images[image.uuid] = image
            self.save()
            return image

    def _nfs_path(self, uri: str) -> str:
        prefix = "nfs://"
        if not uri.startswith(prefix):
            raise InvalidRequest(
                f"spec.resources.source_uri: the simulator imports only nfs://<cluster ip>/<path> "
                f"of its own clusters (got {uri!r})", kind="image",
            )
        host, _, path = uri[len(prefix):].partition("/")
        hosts = {c.external_ip for c in self.clusters.values()} | {
            c.dsip for c in self.clusters.values()
        }
        if host.split(":")[0] not in hosts:
            raise InvalidRequest(
                f"spec.resources.source_uri: {host!r} is not a cluster of this simulator "
                f"(known: {', '.join(sorted(hosts))})", kind="image",
            )
        try:
            self.resolve_file("/" + path)
        except EntityNotFound:
            raise InvalidRequest(
                f"spec.resources.source_uri: no snapshot file or vmdisk at {'/' + path!r}",
                kind="image", details={"source_uri": uri},
            ) from None
        return "/" + path

    def start_upload(self, image_uuid: str, size: int) -> str:
        """Make the image's (empty) disk for an upload of ``size`` bytes; returns its disk id."""
        with self._lock:
            image = self.image(image_uuid)
            if image.disk_id is not None:
                raise EntityConflict(
                    f"image {image_uuid!r} already has data; create a new image to upload",
                    kind="image",
                )
            disk_id = f"image-{image.uuid}"
            self.store.create_disk(disk_id, size)
            image.disk_id = disk_id
            return disk_id

    def finish_upload(self, image_uuid: str, *, ok: bool) -> None:
        with self._lock:
            image = self.image(image_uuid)
            if image.disk_id is None:
                return
            if ok:
                image.size = self.store.size(image.disk_id)
                image.updated = time.time()
            else:
                self.store.delete_disk(image.disk_id)
                image.disk_id = None
                image.size = None
            self.save()

    def delete_image(self, image_uuid: str, *, fail: str | None = None) -> Task:
        with self._lock:
            image = self.image(image_uuid)
            task = self.new_task(
                "kImageDelete", kind="image", uuid=image.uuid, name=image.name,
                cluster_uuid=None, error=fail,
            )
            if fail is None:
                del self.images[image_uuid]
                if image.disk_id is not None:
                    with contextlib.suppress(UnknownDiskError):
                        self.store.delete_disk(image.disk_id)
            self.save()
            return task

    def read_image(self, image_uuid: str, offset: int, length: int) -> bytes:
        image = self.image(image_uuid)
        if image.disk_id is None:
            raise EntityNotFound("image file", image_uuid)
        return self.store.read(image.disk_id, offset, length)

    # ---- idempotence identifiers -------------------------------------------------------------

    def reserve_uuids(self, client_identifier: str, count: int) -> list[str]:
        uuids = [_new_uuid() for _ in range(count)]
        with self._lock:
            for u in uuids:
                self.idempotence[u] = client_identifier
        return uuids
