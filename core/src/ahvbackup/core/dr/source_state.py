"""The DR source's per-VM state: the last point its receiver acknowledged, and its snapshot.

`state_dir/dr-source/<vm uuid>.json` names, per VM, the receiver it pushes to, the number and
snapshot of the last point that receiver committed, and per disk the snapshot handle and size
then: the reference the next delta's changed regions are asked against. It is a namespace of
its own: a backup's references (`state.py`, `state_dir/<vm uuid>/state.json`) and a DR
push's never name each other's snapshots, so neither job deletes what the other builds on.
The file is written atomically, and only after the receiver committed the point it names.
"""

from __future__ import annotations

__all__ = ["DrDiskRef", "DrStateStore", "DrVmState"]

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..fsutil import atomic_write_json, ensure_dir

DR_STATE_VERSION = 1


@dataclass(frozen=True)
class DrDiskRef:
    """One disk at the last acknowledged point: its snapshot handle (for changed regions)."""

    label: str
    size: int
    handle: str


@dataclass(frozen=True)
class DrVmState:
    """`point` and `snapshot_id` of the last point `receiver` (host:port) committed."""

    vm_uuid: str
    vm_name: str
    cluster_uuid: str
    receiver: str
    point: int
    snapshot_id: str
    disks: dict[str, DrDiskRef] = field(default_factory=dict)


class DrStateStore:
    def __init__(self, state_dir: Path) -> None:
        ensure_dir(state_dir, key="state_dir", writable=True)
        self.dir = ensure_dir(state_dir / "dr-source", key="state_dir", writable=True)

    def _path(self, vm_uuid: str) -> Path:
        return self.dir / f"{vm_uuid}.json"

    def load(self, vm_uuid: str) -> tuple[DrVmState | None, str | None]:
        """(state, None), (None, None) when there is none, or (None, why) when it is
        unreadable (the caller seeds, with the warning)."""
        path = self._path(vm_uuid)
        if not path.exists():
            return None, None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("version") != DR_STATE_VERSION:
                return None, f"DR state {path} has version {raw.get('version')!r}"
            disks = {k: DrDiskRef(**v) for k, v in raw["disks"].items()}
            return DrVmState(vm_uuid=raw["vm_uuid"], vm_name=raw["vm_name"],
                             cluster_uuid=raw["cluster_uuid"], receiver=raw["receiver"],
                             point=int(raw["point"]), snapshot_id=raw["snapshot_id"],
                             disks=disks), None
        except (OSError, ValueError, KeyError, TypeError) as err:
            return None, f"DR state {path} is unreadable ({err})"

    def all(self) -> list[DrVmState]:
        """Every readable state, by VM name."""
        out = [s for p in sorted(self.dir.glob("*.json")) if (s := self.load(p.stem)[0])]
        return sorted(out, key=lambda s: (s.vm_name, s.vm_uuid))

    def _started_path(self, vm_uuid: str) -> Path:
        return self.dir / f"{vm_uuid}.started"

    def begin(self, vm_uuid: str, *, receiver: str, point: int) -> None:
        """Note the point a push starts, before any of it reaches the receiver. A push killed
        after the receiver committed but before `save` leaves the receiver a point ahead of
        the state; the next push numbers after this one (`started`), so it never collides."""
        atomic_write_json(self._started_path(vm_uuid), {"receiver": receiver, "point": point})

    def started(self, vm_uuid: str, *, receiver: str) -> int:
        """The point a push to `receiver` began and never recorded (0: none)."""
        try:
            raw = json.loads(self._started_path(vm_uuid).read_text(encoding="utf-8"))
            return int(raw["point"]) if raw.get("receiver") == receiver else 0
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def save(self, state: DrVmState) -> None:
        atomic_write_json(self._path(state.vm_uuid), {"version": DR_STATE_VERSION,
                                                      **asdict(state)})
        self._started_path(state.vm_uuid).unlink(missing_ok=True)
