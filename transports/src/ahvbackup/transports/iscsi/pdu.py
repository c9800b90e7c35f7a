"""iSCSI PDU framing (RFC 7143 §11): the 48-byte Basic Header Segment, padding and digests.

Pure functions: request headers are built into fresh 48-byte bytearrays, response headers are
read in place with `struct.unpack_from`, so the session can receive a header into one reused
buffer and a data segment straight into the caller's memory.
"""

from __future__ import annotations

__all__ = [
    "BHS_LEN",
    "NO_TAG",
    "Op",
    "ResponseHeader",
    "crc32c",
    "data_out",
    "decode_text",
    "encode_text",
    "login_request",
    "logout_request",
    "nop_out",
    "pad_len",
    "parse_header",
    "scsi_command",
    "serial_lt",
    "text_request",
]

import struct
from dataclasses import dataclass

import crc32c as _crc32c

BHS_LEN = 48
NO_TAG = 0xFFFFFFFF
IMMEDIATE = 0x40
FINAL = 0x80


class Op:
    """Opcodes (byte 0, low six bits)."""

    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT = 0x02
    LOGIN = 0x03
    TEXT = 0x04
    DATA_OUT = 0x05
    LOGOUT = 0x06
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC = 0x32
    REJECT = 0x3F

    NAMES = {
        0x20: "NOP-In", 0x21: "SCSI Response", 0x22: "Task Management Response",
        0x23: "Login Response", 0x24: "Text Response", 0x25: "Data-In",
        0x26: "Logout Response", 0x31: "R2T", 0x32: "Async Message", 0x3F: "Reject",
    }


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC32C (Castagnoli) as iSCSI digests use it; `value` continues a running CRC."""
    return int(_crc32c.crc32c(data, value))


def pad_len(n: int) -> int:
    """Bytes of padding after an n-byte data segment (segments end on a 4-byte boundary)."""
    return -n & 3


def serial_lt(a: int, b: int) -> bool:
    """RFC 1982 serial-number comparison a < b for 32-bit sequence numbers (CmdSN, StatSN)."""
    return a != b and ((b - a) & 0xFFFFFFFF) < 0x80000000


def _header(opcode: int, flags: int, dsl: int, *, immediate: bool = False) -> bytearray:
    if dsl > 0xFFFFFF:
        raise ValueError(f"data segment of {dsl} bytes does not fit 24 bits")
    h = bytearray(BHS_LEN)
    h[0] = opcode | (IMMEDIATE if immediate else 0)
    h[1] = flags
    h[5:8] = dsl.to_bytes(3, "big")
    return h


def login_request(
    *, transit: bool, csg: int, nsg: int, isid: bytes, tsih: int, itt: int, cid: int,
    cmd_sn: int, exp_stat_sn: int, dsl: int,
) -> bytearray:
    flags = (0x80 if transit else 0) | (csg << 2) | (nsg if transit else 0)
    h = _header(Op.LOGIN, flags, dsl, immediate=True)
    h[2] = 0  # version-max
    h[3] = 0  # version-min
    h[8:14] = isid
    struct.pack_into(">HIH2xII", h, 14, tsih, itt, cid, cmd_sn, exp_stat_sn)
    return h


def text_request(
    *, itt: int, ttt: int, cmd_sn: int, exp_stat_sn: int, dsl: int, final: bool = True
) -> bytearray:
    h = _header(Op.TEXT, FINAL if final else 0, dsl)
    struct.pack_into(">IIII", h, 16, itt, ttt, cmd_sn, exp_stat_sn)
    return h


def scsi_command(
    *, lun: int, itt: int, edtl: int, cmd_sn: int, exp_stat_sn: int, cdb: bytes,
    read: bool = False, write: bool = False, final: bool = True, dsl: int = 0,
) -> bytearray:
    """SCSI Command (§11.3), task attribute SIMPLE; `final` is clear when unsolicited
    Data-Out PDUs follow."""
    if len(cdb) > 16:
        raise ValueError("CDBs longer than 16 bytes need an AHS, which we do not send")
    flags = (FINAL if final else 0) | (0x40 if read else 0) | (0x20 if write else 0) | 0x01
    h = _header(Op.SCSI_COMMAND, flags, dsl)
    h[8:16] = encode_lun(lun)
    struct.pack_into(">IIII", h, 16, itt, edtl, cmd_sn, exp_stat_sn)
    h[32 : 32 + len(cdb)] = cdb
    return h


def data_out(
    *, lun: int, itt: int, ttt: int, exp_stat_sn: int, data_sn: int, offset: int, dsl: int,
    final: bool,
) -> bytearray:
    h = _header(Op.DATA_OUT, FINAL if final else 0, dsl)
    h[8:16] = encode_lun(lun)
    struct.pack_into(">II4xI4xII", h, 16, itt, ttt, exp_stat_sn, data_sn, offset)
    return h


def nop_out(*, itt: int, ttt: int, cmd_sn: int, exp_stat_sn: int, lun: bytes = bytes(8),
            dsl: int = 0) -> bytearray:
    """NOP-Out (§11.18), always immediate: a ping (our ITT, TTT=NO_TAG) or the answer to a
    target's ping (ITT=NO_TAG, its TTT and LUN echoed)."""
    h = _header(Op.NOP_OUT, FINAL, dsl, immediate=True)
    h[8:16] = lun
    struct.pack_into(">IIII", h, 16, itt, ttt, cmd_sn, exp_stat_sn)
    return h


def logout_request(*, itt: int, cid: int, cmd_sn: int, exp_stat_sn: int,
                   reason: int = 0) -> bytearray:
    h = _header(Op.LOGOUT, FINAL | reason, 0, immediate=True)
    struct.pack_into(">IH2xII", h, 16, itt, cid, cmd_sn, exp_stat_sn)
    return h


def encode_lun(lun: int) -> bytes:
    """LUN field (SAM): peripheral addressing below 256, flat space addressing up to 16383."""
    if lun < 256:
        return bytes([0, lun]) + bytes(6)
    if lun < 0x4000:
        return bytes([0x40 | (lun >> 8), lun & 0xFF]) + bytes(6)
    raise ValueError(f"LUN {lun} needs an addressing method we do not implement")


def decode_lun(raw: bytes) -> int:
    return ((raw[0] & 0x3F) << 8) | raw[1]


@dataclass(frozen=True, slots=True)
class ResponseHeader:
    """The fields every target-to-initiator PDU carries in the same place."""

    opcode: int
    flags: int
    ahs_len: int
    dsl: int
    itt: int
    ttt: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    raw: bytes

    @property
    def name(self) -> str:
        return Op.NAMES.get(self.opcode, f"opcode 0x{self.opcode:02x}")


_COMMON = struct.Struct(">B B 2x B 3s 8x I I I I I")


def parse_header(bhs: bytes | bytearray | memoryview) -> ResponseHeader:
    """Decode the common fields of a 48-byte BHS (a copy of the bytes is kept in `raw`)."""
    op, flags, ahs, dsl, itt, ttt, stat_sn, exp, mx = _COMMON.unpack_from(bhs, 0)
    return ResponseHeader(
        opcode=op & 0x3F, flags=flags, ahs_len=ahs * 4, dsl=int.from_bytes(dsl, "big"),
        itt=itt, ttt=ttt, stat_sn=stat_sn, exp_cmd_sn=exp, max_cmd_sn=mx, raw=bytes(bhs[:BHS_LEN]),
    )


def encode_text(pairs: list[tuple[str, str]]) -> bytes:
    """Text keys (§6.1): `key=value` each followed by a NUL."""
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


def decode_text(data: bytes | bytearray | memoryview) -> list[tuple[str, str]]:
    """Inverse of `encode_text`; keeps the order and repeated keys (SendTargets repeats
    TargetName/TargetAddress)."""
    out: list[tuple[str, str]] = []
    for item in bytes(data).split(b"\0"):
        if not item:
            continue
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if not sep:
            raise ValueError(f"text key without '=': {key!r}")
        out.append((key, value))
    return out
