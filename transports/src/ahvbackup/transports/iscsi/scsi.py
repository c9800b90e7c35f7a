"""SCSI commands the initiator sends (SPC/SBC) and the answers it decodes.

CDB builders return bytes; parsers take the data a target returned. Nothing here touches the
network, so every decoder is tested on its own.
"""

from __future__ import annotations

__all__ = [
    "Capacity",
    "Inquiry",
    "Sense",
    "SenseKey",
    "Status",
    "inquiry",
    "parse_capacity16",
    "parse_inquiry",
    "parse_report_luns",
    "parse_sense",
    "read16",
    "read_capacity16",
    "report_luns",
    "test_unit_ready",
    "write16",
]

import struct
from dataclasses import dataclass


class Status:
    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40

    NAMES = {0x00: "GOOD", 0x02: "CHECK CONDITION", 0x04: "CONDITION MET", 0x08: "BUSY",
             0x18: "RESERVATION CONFLICT", 0x28: "TASK SET FULL", 0x30: "ACA ACTIVE",
             0x40: "TASK ABORTED"}


class SenseKey:
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB

    NAMES = {0x0: "NO SENSE", 0x1: "RECOVERED ERROR", 0x2: "NOT READY", 0x3: "MEDIUM ERROR",
             0x4: "HARDWARE ERROR", 0x5: "ILLEGAL REQUEST", 0x6: "UNIT ATTENTION",
             0x7: "DATA PROTECT", 0x8: "BLANK CHECK", 0x9: "VENDOR SPECIFIC",
             0xA: "COPY ABORTED", 0xB: "ABORTED COMMAND", 0xD: "VOLUME OVERFLOW",
             0xE: "MISCOMPARE"}


_ASC_NAMES = {
    (0x04, 0x00): "logical unit not ready",
    (0x20, 0x00): "invalid command operation code",
    (0x21, 0x00): "logical block address out of range",
    (0x24, 0x00): "invalid field in CDB",
    (0x25, 0x00): "logical unit not supported",
    (0x27, 0x00): "write protected",
    (0x28, 0x00): "not ready to ready change, medium may have changed",
    (0x29, 0x00): "power on, reset, or bus device reset occurred",
    (0x29, 0x01): "power on occurred",
    (0x29, 0x07): "I_T nexus loss occurred",
    (0x2A, 0x01): "mode parameters changed",
    (0x2A, 0x09): "capacity data has changed",
    (0x3F, 0x0E): "reported LUNs data has changed",
}


def test_unit_ready() -> bytes:
    return bytes(6)


def inquiry(*, evpd_page: int | None = None, alloc: int = 255) -> bytes:
    evpd = 1 if evpd_page is not None else 0
    return struct.pack(">BBBHB", 0x12, evpd, evpd_page or 0, alloc, 0)


def report_luns(*, alloc: int = 4096) -> bytes:
    return struct.pack(">B5xIxx", 0xA0, alloc)


def read_capacity16(*, alloc: int = 32) -> bytes:
    return struct.pack(">BB8xIxx", 0x9E, 0x10, alloc)


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIxx", 0x88, 0, lba, blocks)


def write16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIxx", 0x8A, 0, lba, blocks)


@dataclass(frozen=True, slots=True)
class Capacity:
    """READ CAPACITY(16): size in blocks and bytes, and whether the LUN is thin (LBPME)."""

    blocks: int
    block_size: int
    thin: bool

    @property
    def size(self) -> int:
        return self.blocks * self.block_size


def parse_capacity16(data: bytes) -> Capacity:
    if len(data) < 12:
        raise ValueError(f"READ CAPACITY(16) returned {len(data)} bytes, need 12")
    last_lba, block_size = struct.unpack_from(">QI", data, 0)
    thin = len(data) > 14 and bool(data[14] & 0x80)
    return Capacity(blocks=last_lba + 1, block_size=block_size, thin=thin)


@dataclass(frozen=True, slots=True)
class Inquiry:
    device_type: int
    vendor: str
    product: str
    revision: str


def parse_inquiry(data: bytes) -> Inquiry:
    if len(data) < 36:
        raise ValueError(f"standard INQUIRY returned {len(data)} bytes, need 36")

    def text(a: int, b: int) -> str:
        return data[a:b].decode("ascii", "replace").strip()

    return Inquiry(device_type=data[0] & 0x1F, vendor=text(8, 16), product=text(16, 32),
                   revision=text(32, 36))


def parse_report_luns(data: bytes) -> list[int]:
    if len(data) < 8:
        raise ValueError(f"REPORT LUNS returned {len(data)} bytes, need 8")
    (length,) = struct.unpack_from(">I", data, 0)
    luns = []
    for pos in range(8, min(8 + length, len(data)) - 7, 8):
        luns.append(((data[pos] & 0x3F) << 8) | data[pos + 1])
    return luns


@dataclass(frozen=True, slots=True)
class Sense:
    key: int
    asc: int
    ascq: int

    @property
    def unit_attention(self) -> bool:
        return self.key == SenseKey.UNIT_ATTENTION

    def __str__(self) -> str:
        key = SenseKey.NAMES.get(self.key, f"sense key 0x{self.key:x}")
        what = _ASC_NAMES.get((self.asc, self.ascq)) or _ASC_NAMES.get((self.asc, 0))
        code = f"ASC/ASCQ 0x{self.asc:02x}/0x{self.ascq:02x}"
        return f"{key}, {what} ({code})" if what else f"{key}, {code}"


def parse_sense(data: bytes) -> Sense | None:
    """Fixed (0x70/0x71) or descriptor (0x72/0x73) sense data; None when absent or unknown."""
    if len(data) < 2:
        return None
    code = data[0] & 0x7F
    if code in (0x70, 0x71) and len(data) >= 14:
        return Sense(key=data[2] & 0x0F, asc=data[12], ascq=data[13])
    if code in (0x72, 0x73) and len(data) >= 4:
        return Sense(key=data[1] & 0x0F, asc=data[2], ascq=data[3])
    return None
