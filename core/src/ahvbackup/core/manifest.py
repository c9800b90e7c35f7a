"""The backup manifest: what one backup of one VM holds, typed, versioned and self-checking.

A manifest is written next to the streams (``manifest.json`` in the directory repository,
``vm.json`` in Bacula). It is read here and nowhere else: every other module works with
`Manifest` and `DiskEntry`.

- Format 2 carries ``digest``, a SHA-256 over its canonical JSON without that field, so an
  accidental edit or a truncated file is caught before any stream is read.
- Format 1 (no digest, written before 0.2) still loads; the streams' own headers are then the
  only check, and restore and verify cross-check every field that matters against them.
- A field of the wrong type or a missing one is a `ManifestError` naming the field.
"""

from __future__ import annotations

__all__ = ["FORMAT", "DiskEntry", "Manifest", "ManifestError", "RemovedDisk", "VmIdentity"]

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import StreamFormatError

FORMAT = 2
_REQUIRED: Any = object()
KINDS = frozenset({"full", "incremental", "differential"})


class ManifestError(StreamFormatError):
    """A manifest that cannot be trusted: unreadable, wrongly shaped, or edited."""


@dataclass(frozen=True)
class VmIdentity:
    uuid: str
    name: str
    cluster_uuid: str = ""
    cluster_name: str = ""


@dataclass(frozen=True)
class DiskEntry:
    """One disk of a backup: where it came from and which stream holds it."""

    label: str
    uuid: str
    bus: str
    index: int
    size: int
    container: str = ""
    stream: str = ""  # the stream's file name; "" when the disk has no stream
    stream_id: str = ""
    digest: str = ""  # the stream's whole-stream digest (its trailer's), hex
    kind: str = "full"  # full | incremental | differential
    bytes_read: int = 0
    zero_bytes: int = 0
    bytes_stored: int = 0
    reference_backup: str = ""  # the backup a delta applies on
    reference_snapshot: str = ""
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class RemovedDisk:
    """A disk the VM had at its last backup and no longer has."""

    uuid: str
    label: str
    size: int
    last_backup: str


@dataclass(frozen=True)
class Manifest:
    backup_id: str
    level: str
    created: float
    vm: VmIdentity
    disks: tuple[DiskEntry, ...]
    job_id: str = ""
    completed: float = 0.0
    producer: str = ""
    snapshot_id: str = ""
    consistency: str = ""
    #: the VM's configuration as Prism gave it (opaque here: a restore rebuilds the VM from it)
    config: Mapping[str, Any] = field(default_factory=dict, compare=False)
    removed_disks: tuple[RemovedDisk, ...] = ()
    format: int = FORMAT

    @property
    def streams(self) -> tuple[DiskEntry, ...]:
        """The disks that have a stream, in backup order."""
        return tuple(d for d in self.disks if d.stream)

    @property
    def bytes_stored(self) -> int:
        return sum(d.bytes_stored for d in self.disks)

    def disk(self, *, uuid: str = "", label: str = "") -> DiskEntry | None:
        """The entry of a disk with a stream, by UUID (else by label)."""
        for d in self.streams:
            if (uuid and d.uuid == uuid) or (not uuid and d.label == label):
                return d
        return None

    def with_disks(self, disks: tuple[DiskEntry, ...], **changes: Any) -> Manifest:
        return replace(self, disks=disks, **changes)

    # (de)serialisation -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": FORMAT,
            "producer": self.producer,
            "backup_id": self.backup_id,
            "job_id": self.job_id,
            "level": self.level,
            "created": self.created,
            "completed": self.completed,
            "vm": {"uuid": self.vm.uuid, "name": self.vm.name,
                   "cluster_uuid": self.vm.cluster_uuid, "cluster_name": self.vm.cluster_name},
            "snapshot": {"id": self.snapshot_id, "consistency": self.consistency},
            "config": dict(self.config),
            "disks": [{**d.__dict__, "warnings": list(d.warnings)} for d in self.disks],
            "removed_disks": [r.__dict__ for r in self.removed_disks],
        }
        doc["digest"] = _digest(doc)
        return doc

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, doc: object, *, name: str = "manifest") -> Manifest:
        """A manifest from its parsed JSON; `ManifestError` names what is wrong."""
        r = _Reader(name)
        top = r.obj(doc, "")
        fmt = r.integer(top, "format")
        if fmt not in (1, FORMAT):
            raise ManifestError(f"{name}: format {fmt} is not one this version reads (1, 2)")
        if fmt >= 2:
            stated = r.text(top, "digest")
            if stated != _digest(top):
                raise ManifestError(f"{name}: digest does not match its content (the manifest "
                                    "was edited or damaged)")
        vm = r.obj(top.get("vm"), "vm")
        snapshot = r.obj(top.get("snapshot", {}), "snapshot")
        disks = r.items(top, "disks")
        level = r.text(top, "level")
        if level not in KINDS:
            raise ManifestError(f"{name}: level {level!r} is not one of {', '.join(sorted(KINDS))}")
        return cls(
            format=fmt,
            producer=r.text(top, "producer", ""),
            backup_id=r.text(top, "backup_id"),
            job_id=str(top.get("job_id") or ""),
            level=level,
            created=r.number(top, "created"),
            completed=r.number(top, "completed", 0.0),
            vm=VmIdentity(uuid=r.text(vm, "uuid", where="vm"), name=r.text(vm, "name", where="vm"),
                          cluster_uuid=r.text(vm, "cluster_uuid", "", where="vm"),
                          cluster_name=r.text(vm, "cluster_name", "", where="vm")),
            snapshot_id=r.text(snapshot, "id", "", where="snapshot"),
            consistency=r.text(snapshot, "consistency", "", where="snapshot"),
            config=r.obj(top.get("config", {}), "config"),
            disks=tuple(r.disk(d, f"disks[{i}]") for i, d in enumerate(disks)),
            removed_disks=tuple(r.removed(d, f"removed_disks[{i}]")
                                for i, d in enumerate(r.items(top, "removed_disks", []))),
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, name: str = "manifest") -> Manifest:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            what = "empty" if not data.strip() else f"not JSON ({err})"
            raise ManifestError(f"{name}: {what}") from None
        return cls.from_json(doc, name=name)


def _digest(doc: Mapping[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


class _Reader:
    """Typed field access with errors that name the field."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _bad(self, where: str, key: str, want: str, got: object) -> ManifestError:
        path = f"{where}.{key}" if where else key
        shown = repr(got)
        shown = shown if len(shown) <= 60 else shown[:60] + "..."
        return ManifestError(f"{self.name}: {path} must be {want} (got {shown})")

    def obj(self, value: object, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self._bad("", where or "the manifest", "an object", value)
        return value

    def _get(self, d: Mapping[str, Any], key: str, default: object, where: str) -> object:
        if key in d:
            return d[key]
        if default is _REQUIRED:
            path = f"{where}.{key}" if where else key
            raise ManifestError(f"{self.name}: {path} is missing")
        return default

    def text(self, d: Mapping[str, Any], key: str, default: object = None, *,
            where: str = "") -> str:
        value = self._get(d, key, _REQUIRED if default is None else default, where)
        if value is None and default is not None:
            return str(default)
        if not isinstance(value, str):
            raise self._bad(where, key, "a string", value)
        return value

    def integer(self, d: Mapping[str, Any], key: str, default: object = _REQUIRED, *,
            where: str = "") -> int:
        value = self._get(d, key, default, where)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(where, key, "an integer", value)
        return value

    def number(self, d: Mapping[str, Any], key: str, default: object = _REQUIRED, *,
            where: str = "") -> float:
        value = self._get(d, key, default, where)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(where, key, "a number", value)
        return float(value)

    def items(self, d: Mapping[str, Any], key: str, default: object = _REQUIRED, *,
             where: str = "") -> list[Any]:
        value = self._get(d, key, default, where)
        if not isinstance(value, list):
            raise self._bad(where, key, "a list", value)
        return value

    def disk(self, value: object, where: str) -> DiskEntry:
        d = self.obj(value, where)
        kind = self.text(d, "kind", "full", where=where)
        if kind not in KINDS:
            raise self._bad(where, "kind", f"one of {', '.join(sorted(KINDS))}", kind)
        warnings = self.items(d, "warnings", [], where=where)
        return DiskEntry(
            label=self.text(d, "label", where=where),
            uuid=self.text(d, "uuid", where=where),
            bus=self.text(d, "bus", where=where),
            index=self.integer(d, "index", where=where),
            size=self.integer(d, "size", where=where),
            container=self.text(d, "container", "", where=where),
            stream=self.text(d, "stream", "", where=where),
            stream_id=self.text(d, "stream_id", "", where=where),
            digest=self.text(d, "digest", "", where=where),
            kind=kind,
            bytes_read=self.integer(d, "bytes_read", 0, where=where),
            zero_bytes=self.integer(d, "zero_bytes", 0, where=where),
            bytes_stored=self.integer(d, "bytes_stored", 0, where=where),
            reference_backup=self.text(d, "reference_backup", "", where=where),
            reference_snapshot=self.text(d, "reference_snapshot", "", where=where),
            warnings=tuple(str(w) for w in warnings),
        )

    def removed(self, value: object, where: str) -> RemovedDisk:
        d = self.obj(value, where)
        return RemovedDisk(uuid=self.text(d, "uuid", where=where),
                           label=self.text(d, "label", "", where=where),
                           size=self.integer(d, "size", 0, where=where),
                           last_backup=self.text(d, "last_backup", "", where=where))

