"""What a disk stream says about itself: whose disk, which snapshot, against which reference."""

from __future__ import annotations

__all__ = ["KINDS", "StreamHeader"]

import datetime
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .. import __version__
from ..errors import StreamFormatError

KINDS = ("full", "incremental", "differential")
#: keys every 2.x header has (how payloads are stored); a 1.x header has none of them
PAYLOAD_KEYS = ("compression", "encryption", "key_id", "wrapped_key")
COMPRESSIONS = ("none", "zstd")
ENCRYPTIONS = ("none", "aes-256-gcm")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, kw_only=True)
class StreamHeader:
    """The stream's metadata (docs/stream-format.md section 2). `extra` holds keys this version
    does not know: a reader keeps them, a writer writes them back."""

    kind: str
    vm_uuid: str
    disk_uuid: str
    disk_size: int
    snapshot_id: str
    vm_name: str = ""
    disk_label: str = ""
    disk_bus: str = ""
    disk_index: int = 0
    block_size: int = 0
    backup_id: str = ""
    stream_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    reference_snapshot_id: str = ""
    reference_backup_id: str = ""
    reference_stream_id: str = ""
    created: str = field(default_factory=_now)
    producer: str = f"ahvbackup {__version__}"
    # 2.x: how payloads are stored (section 7); the writer's codec sets them
    compression: str = "none"
    encryption: str = "none"
    key_id: str = ""
    wrapped_key: str = ""  # hex: the data key, wrapped by the key `key_id` names
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem:
            raise StreamFormatError(f"stream header: {problem}")

    @property
    def identity(self) -> str:
        """VM and disk, as error messages name them."""
        vm = f"VM {self.vm_name} ({self.vm_uuid})" if self.vm_name else f"VM {self.vm_uuid}"
        disk = self.disk_label or "disk"
        return f"{vm} {disk} ({self.disk_uuid})"

    @property
    def transformed(self) -> bool:
        """Whether payloads are compressed or encrypted (a 2.x stream)."""
        return self.compression != "none" or self.encryption != "none"

    def to_json(self) -> bytes:
        doc = dict(self.extra)
        skip = {"extra"} if self.transformed else {"extra", *PAYLOAD_KEYS}
        doc.update({f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip})
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, raw: bytes | memoryview, *, major: int = 1) -> StreamHeader:
        """Parse metadata: unknown keys go to `extra`; a missing or mistyped known key fails.
        The payload keys are known (and required) from major 2 on."""
        try:
            doc = json.loads(bytes(raw).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StreamFormatError(f"stream header: metadata is not UTF-8 JSON ({err})") from err
        if not isinstance(doc, dict):
            raise StreamFormatError("stream header: metadata is not a JSON object")
        known: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "extra" or (major < 2 and f.name in PAYLOAD_KEYS):
                continue
            if f.name not in doc:
                raise StreamFormatError(f"stream header: required key {f.name} is missing")
            value = doc.pop(f.name)
            want = int if f.type == "int" else str
            if type(value) is not want:
                kind = "an integer" if want is int else "a string"
                raise StreamFormatError(
                    f"stream header: {f.name} must be {kind} (got {value!r:.80})"
                )
            known[f.name] = value
        header = cls(**known, extra=doc)
        if major >= 2 and not header.transformed:
            raise StreamFormatError("stream header: a 2.x stream compresses or encrypts "
                                    "(compression and encryption are both none)")
        return header


def _problem(h: StreamHeader) -> str:
    if h.kind not in KINDS:
        return f"kind must be one of {', '.join(KINDS)} (got {h.kind!r})"
    if h.disk_size <= 0:
        return f"disk_size must be > 0 (got {h.disk_size})"
    if h.block_size < 0 or h.disk_index < 0:
        return "block_size and disk_index must be >= 0"
    refs = (h.reference_snapshot_id, h.reference_backup_id, h.reference_stream_id)
    if h.kind == "full" and any(refs):
        return "a full stream has no reference (reference ids must be empty)"
    if h.kind != "full" and not h.reference_snapshot_id:
        return f"kind {h.kind} needs reference_snapshot_id (the snapshot it is a delta against)"
    if h.compression not in COMPRESSIONS:
        return f"compression must be one of {', '.join(COMPRESSIONS)} (got {h.compression!r})"
    if h.encryption not in ENCRYPTIONS:
        return f"encryption must be one of {', '.join(ENCRYPTIONS)} (got {h.encryption!r})"
    encrypted = h.encryption != "none"
    if encrypted != bool(h.key_id) or encrypted != bool(h.wrapped_key):
        return "key_id and wrapped_key are set exactly when the stream is encrypted"
    if h.wrapped_key and not _is_hex(h.wrapped_key):
        return "wrapped_key must be hex"
    return ""


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True
