"""What each disk of a backup is a delta against, and which snapshots stay on the cluster.

Incremental and differential backups read the changes against a reference snapshot kept on the
cluster from an earlier backup (the state names it). Whenever that cannot work for one disk (no
state, the disk is new, it was resized, the reference snapshot or its backup is gone, the trust
check failed last time, the reference was taken through another API than today's) that disk
alone is read in full, with a warning that names the cause; the job goes on.

After a successful backup its snapshot becomes the reference (it leaves the cleanup ledger so it
is not released), and every snapshot the new state no longer names is deleted. The old ones are
put on the ledger *before* the state is replaced, so a job killed in between still has them
swept by the next run; on any failure the old state and its snapshots stay as they were.
"""

from __future__ import annotations

__all__ = ["DiskPlan", "handle_api", "plan_disk", "unreferenced"]

from collections.abc import Mapping
from dataclasses import dataclass

from ..drivers import StoredBackup
from ..manifest import DiskEntry
from ..model import DiskSnapshot
from ..state import DiskState, VmState


@dataclass(frozen=True)
class DiskPlan:
    """How one disk is read: `kind` full (no reference) or a delta against `reference`."""

    kind: str  # full | incremental | differential
    reference: DiskState | None = None
    reference_handle: str = ""
    reference_snapshot_id: str = ""
    reference_backup: StoredBackup | None = None
    reference_entry: DiskEntry | None = None
    warning: str = ""  # why a delta was wanted but a full is taken

    def full(self, why: str) -> DiskPlan:
        return DiskPlan(kind="full", warning=why)


def plan_disk(
    *, level: str, vm_name: str, disk: DiskSnapshot, state: VmState | None,
    state_problem: str | None, backups: Mapping[str, StoredBackup],
) -> DiskPlan:
    """The reference a `level` backup of `disk` can use, or a full with the reason why not."""
    if level == "full":
        return DiskPlan(kind="full")
    who = f"VM {vm_name} disk {disk.disk.label}"
    if state is None:
        why = state_problem or "no previous backup is recorded (no state file)"
        return DiskPlan(kind="full", warning=f"{who}: {why}; reading it in full")
    prev = state.disks.get(disk.disk.uuid)
    if prev is None:
        return DiskPlan(kind="full",
                        warning=f"{who}: disk added since the last backup; reading it in full")
    if prev.force_full:
        return DiskPlan(kind="full", warning=f"{who}: {prev.force_full}; reading it in full")
    if prev.size != disk.size:
        return DiskPlan(kind="full", warning=(
            f"{who}: disk resized from {prev.size} to {disk.size} bytes since the last backup; "
            "reading it in full"))
    if level == "differential":
        snap_id, handle, backup_id = prev.full_snapshot_id, prev.full_handle, prev.full_backup_id
    else:
        snap_id, handle, backup_id = prev.snapshot_id, prev.handle, prev.backup_id
    if not snap_id or not handle:
        return DiskPlan(kind="full", warning=f"{who}: no reference snapshot is recorded; "
                                             "reading it in full")
    if handle_api(handle) != handle_api(disk.handle):
        return DiskPlan(kind="full", warning=(
            f"{who}: reference snapshot {snap_id} was taken through "
            f"{handle_api(handle) or 'the original API'} and this one through "
            f"{handle_api(disk.handle) or 'the original API'}, which cannot compare them; "
            "reading it in full"))
    ref = backups.get(backup_id)
    entry = ref.manifest.disk(uuid=disk.disk.uuid) if ref is not None else None
    if ref is None or entry is None:
        return DiskPlan(kind="full", warning=(
            f"{who}: reference backup {backup_id} is no longer in the repository; "
            "reading it in full"))
    return DiskPlan(kind=level, reference=prev, reference_handle=handle,
                    reference_snapshot_id=snap_id, reference_backup=ref, reference_entry=entry)


def handle_api(handle: str) -> str:
    """The API a disk handle names by its ``<api>:`` prefix (AHV: ``v4:`` for a v4 disk
    recovery point), or "" for a handle without one (the API the driver started with)."""
    head, sep, _ = handle.partition(":")
    return head if sep and head.isalnum() and not head.isdigit() else ""


def unreferenced(old: VmState | None, new: VmState) -> set[str]:
    """Snapshots the old state kept that the new one no longer names."""
    if old is None:
        return set()
    return old.snapshot_ids() - new.snapshot_ids()
