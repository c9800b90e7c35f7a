"""What a job reports: per disk, per VM, and the job as a whole."""

from __future__ import annotations

__all__ = ["DiskResult", "JobResult", "VmResult"]

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class DiskResult:
    label: str
    size: int = 0
    ok: bool = False
    bytes_read: int = 0
    bytes_stored: int = 0
    zero_bytes: int = 0
    estimated_bytes: int = 0  # mode=estimate: allocated bytes a backup would read
    read_seconds: float = 0.0  # from the first read to the stream's end (staging excluded)
    error: str | None = None
    kind: str = "full"  # full | incremental | differential (a disk that healed reads "full")
    reference_backup: str | None = None  # the backup a delta builds on
    reference_snapshot: str | None = None
    stream_id: str = ""
    digest: str = ""  # the stream's whole-stream digest (hex), once it is written
    warnings: list[str] = field(default_factory=list)
    sampled_bytes: int = 0  # verify_unchanged_sample: unchanged bytes re-read and compared
    trust_mismatch: str = ""  # what the trust check found wrong ("" when nothing)


@dataclass
class VmResult:
    vm_uuid: str
    vm_name: str
    ok: bool = False
    backup_id: str | None = None
    consistency: str | None = None
    disks: list[DiskResult] = field(default_factory=list)
    error: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def bytes_read(self) -> int:
        return sum(d.bytes_read for d in self.disks)

    @property
    def bytes_stored(self) -> int:
        return sum(d.bytes_stored for d in self.disks)

    def failures(self) -> list[str]:
        """`vm` or `vm/disk` names of what failed, for the job's exit status."""
        out = [f"{self.vm_name}/{d.label}" for d in self.disks if not d.ok and d.error]
        return out or ([self.vm_name] if not self.ok else [])


@dataclass
class JobResult:
    job_id: str
    mode: str
    vms: list[VmResult] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.vms)

    @property
    def failed(self) -> list[str]:
        return [name for v in self.vms if not v.ok for name in v.failures()]

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ok"] = self.ok
        doc["failed"] = self.failed
        doc["bytes_read"] = sum(v.bytes_read for v in self.vms)
        doc["bytes_stored"] = sum(v.bytes_stored for v in self.vms)
        return doc
