"""Per-VM state: what the next backup of a VM builds on.

`state_dir/<vm uuid>/state.json` holds, per disk, the snapshot the last successful backup read
(the reference for the next incremental), the snapshot of the last full (the reference for a
differential), the disk size then, and the backups they went into. Those snapshots are kept on
the cluster for as long as the state names them, and no longer. The file is written atomically
(write, fsync, rename) and only after the backup it describes is complete. A missing or
unreadable file is not an error: the next backup is a full, with a warning.
"""

from __future__ import annotations

__all__ = ["DiskState", "StateStore", "VmState"]

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .fsutil import atomic_write_json, ensure_dir

log = logging.getLogger("ahvbackup.state")

STATE_VERSION = 1


@dataclass(frozen=True)
class DiskState:
    disk_uuid: str
    label: str
    size: int
    snapshot_id: str  # the VM snapshot kept on the cluster as the reference
    handle: str  # the disk's snapshot handle (AHV: snapshot file path) for changed regions
    backup_id: str  # the backup whose stream holds this disk at that snapshot
    full_backup_id: str  # the full this chain starts from
    #: the last full's snapshot and handle, kept as the reference of differentials
    full_snapshot_id: str = ""
    full_handle: str = ""
    #: set when the trust check found change tracking wrong: the next backup reads it in full
    force_full: str = ""

    def snapshot_ids(self) -> set[str]:
        return {s for s in (self.snapshot_id, self.full_snapshot_id) if s}


@dataclass(frozen=True)
class VmState:
    vm_uuid: str
    vm_name: str
    disks: dict[str, DiskState] = field(default_factory=dict)
    last_backup_id: str = ""
    last_full_backup_id: str = ""
    cluster_uuid: str = ""

    def snapshot_ids(self) -> set[str]:
        """Every snapshot this state keeps on the cluster."""
        return {s for d in self.disks.values() for s in d.snapshot_ids()}


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = ensure_dir(state_dir, key="state_dir", writable=True)

    def _path(self, vm_uuid: str) -> Path:
        return self.dir / vm_uuid / "state.json"

    def load(self, vm_uuid: str) -> tuple[VmState | None, str | None]:
        """Return (state, warning). A corrupt file yields (None, why) so the caller runs a full."""
        path = self._path(vm_uuid)
        if not path.exists():
            return None, None
        try:
            raw = json.loads(path.read_text())
            if raw.get("version") != STATE_VERSION:
                return None, f"state file {path} has version {raw.get('version')!r}; taking a full"
            disks = {k: DiskState(**v) for k, v in raw["disks"].items()}
            return (
                VmState(
                    vm_uuid=raw["vm_uuid"], vm_name=raw["vm_name"], disks=disks,
                    last_backup_id=raw.get("last_backup_id", ""),
                    last_full_backup_id=raw.get("last_full_backup_id", ""),
                    cluster_uuid=raw.get("cluster_uuid", ""),
                ),
                None,
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            return None, f"state file {path} is unreadable ({err}); taking a full"

    def exists(self, vm_uuid: str) -> bool:
        return self._path(vm_uuid).exists()

    def all(self) -> list[VmState]:
        """Every readable state (unreadable ones are skipped)."""
        out = []
        for path in sorted(self.dir.glob("*/state.json")):
            state, _ = self.load(path.parent.name)
            if state is not None:
                out.append(state)
        return out

    def save(self, state: VmState) -> None:
        path = self._path(state.vm_uuid)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_json(path, {"version": STATE_VERSION, **asdict(state)})
