"""Per-VM state: what the next backup of a VM builds on.

`state_dir/<vm uuid>/state.json` holds, per disk, the snapshot the last successful backup read
(the reference for the next incremental), the disk size then, and the backup it went into. It is
written atomically (write, fsync, rename) and only after the backup it describes is complete. A
missing or unreadable file is not an error: the next backup is a full, with a warning.
"""

from __future__ import annotations

__all__ = ["DiskState", "StateStore", "VmState"]

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .fsutil import atomic_write_json

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


@dataclass(frozen=True)
class VmState:
    vm_uuid: str
    vm_name: str
    disks: dict[str, DiskState] = field(default_factory=dict)
    last_backup_id: str = ""
    last_full_backup_id: str = ""


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

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
                ),
                None,
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            return None, f"state file {path} is unreadable ({err}); taking a full"

    def save(self, state: VmState) -> None:
        path = self._path(state.vm_uuid)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_json(path, {"version": STATE_VERSION, **asdict(state)})
