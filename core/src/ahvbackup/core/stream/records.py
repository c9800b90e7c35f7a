"""What a reader hands out: records and the trailer."""

from __future__ import annotations

__all__ = ["DATA", "ZERO", "Record", "Trailer"]

from dataclasses import dataclass
from typing import Final, Literal

DATA: Final = "data"
ZERO: Final = "zero"


@dataclass(slots=True)
class Record:
    """One data or zero record. `position` is the stream offset of its record header; `data` is
    the verified payload of a data record (a view that may be reused for the next record: copy it
    to keep it), None for zero records and in an index."""

    kind: Literal["data", "zero"]
    seq: int
    offset: int
    length: int
    position: int
    data: memoryview | None = None
    stored: int = 0  # payload bytes in the stream (2.x: compressed and/or encrypted)
    flags: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class Trailer:
    """The stream's totals and whole-stream digest (docs/stream-format.md section 4).
    `digest_verified` is False when the payloads were skipped (an index of a seekable file);
    `unchecked` names what was not authenticated when an encrypted stream's key was absent."""

    data_records: int
    zero_records: int
    data_bytes: int
    zero_bytes: int
    stream_bytes: int
    digest: bytes
    digest_verified: bool
    unchecked: str = ""  # what a read without the stream's key could not check; "" = all


    @property
    def digest_hex(self) -> str:
        return self.digest.hex()
