"""Our target against RFC 7143 and SBC-3/SPC-4, one behaviour per test, with hand-built PDUs:
the CmdSN window, DataSN order, protection fields, the VPD pages, residuals on reads and writes,
task management, MODE SENSE pages. Each of these failed before the target was brought to
conformance (libiscsi's iscsi-test-cu found them; test_iscsi_conformance_suite.py runs it)."""

from __future__ import annotations

import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from tests.transports.conftest import INITIATOR_IQN, pattern

from ahvbackup.transports.iscsi.pdu import (
    BHS_LEN,
    NO_TAG,
    Op,
    data_out,
    decode_text,
    encode_text,
    login_request,
    pad_len,
    scsi_command,
)
from ahvbackup.transports.iscsi.target import Export, IscsiTarget, MemoryLun

IQN = "iqn.2010-06.com.nutanix:vg-conformance"
BS = 512
QUIET = 0.3  # how long "no answer" is waited for


class Pdu:
    def __init__(self, hdr: bytes, data: bytes) -> None:
        self.hdr, self.data = hdr, data

    @property
    def op(self) -> int:
        return self.hdr[0] & 0x3F

    @property
    def itt(self) -> int:
        return int(struct.unpack_from(">I", self.hdr, 16)[0])

    def u32(self, at: int) -> int:
        return int(struct.unpack_from(">I", self.hdr, at)[0])


class Raw:
    """A bare initiator connection: we build every PDU, the target's answers are returned
    as they come."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.cmd_sn = 0
        self.exp_stat_sn = 0
        self.max_cmd_sn = 0
        self.itt = 0x100

    async def _recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            try:
                chunk = await self.stream.receive_some(65536)
            except trio.BrokenResourceError as err:
                raise EOFError("target reset the connection") from err
            if not chunk:
                raise EOFError("target closed the connection")
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def recv(self, timeout: float = 5) -> Pdu:
        with trio.fail_after(timeout):
            hdr = await self._recv_exact(BHS_LEN)
            dsl = int.from_bytes(hdr[5:8], "big")
            data = await self._recv_exact(dsl + pad_len(dsl))
        pdu = Pdu(hdr, data[:dsl])
        if pdu.op in (Op.SCSI_RESPONSE, Op.TASK_MGMT_RESPONSE, Op.NOP_IN, Op.TEXT_RESPONSE) or (
                pdu.op == Op.DATA_IN and hdr[1] & 0x01):
            self.exp_stat_sn = (pdu.u32(24) + 1) & 0xFFFFFFFF
        if pdu.op != Op.REJECT:
            self.max_cmd_sn = pdu.u32(32)
        return pdu

    async def quiet(self, seconds: float = QUIET) -> Pdu | None:
        """The next PDU if one comes within `seconds`, else None."""
        with trio.move_on_after(seconds):
            return await self.recv(seconds + 1)
        return None

    async def send(self, hdr: bytearray, data: bytes = b"") -> None:
        await self.stream.send_all(bytes(hdr) + data + bytes(pad_len(len(data))))

    async def login(self, initiator: str = INITIATOR_IQN, isid: bytes = b"\x80\0\0\0\0\1",
                    **keys: str) -> None:
        offer = {"InitiatorName": initiator, "TargetName": IQN, "SessionType": "Normal",
                 "HeaderDigest": "None", "DataDigest": "None", "ImmediateData": "Yes",
                 "InitialR2T": "No", "MaxRecvDataSegmentLength": "262144",
                 "MaxBurstLength": "262144", "FirstBurstLength": "65536", **keys}
        body = encode_text(list(offer.items()))
        await self.send(login_request(transit=True, csg=1, nsg=3, isid=isid,
                                      tsih=0, itt=1, cid=0, cmd_sn=self.cmd_sn,
                                      exp_stat_sn=0, dsl=len(body)), body)
        answer = await self.recv()
        assert answer.op == Op.LOGIN_RESPONSE and answer.hdr[36:38] == b"\0\0", answer.hdr
        assert answer.hdr[1] & 0x83 == 0x83, "not in full feature phase"
        self.negotiated = dict(decode_text(answer.data))
        self.exp_stat_sn = (answer.u32(24) + 1) & 0xFFFFFFFF
        self.cmd_sn = answer.u32(28)
        self.max_cmd_sn = answer.u32(32)

    def next_itt(self) -> int:
        self.itt += 1
        return self.itt

    async def command(self, cdb: bytes, *, edtl: int, read: bool = False,
                      write: bool = False, data: bytes = b"", final: bool = True,
                      cmd_sn: int | None = None, itt: int | None = None,
                      lun: int = 0) -> int:
        itt = self.next_itt() if itt is None else itt
        sn = self.cmd_sn if cmd_sn is None else cmd_sn
        if cmd_sn is None:
            self.cmd_sn = (self.cmd_sn + 1) & 0xFFFFFFFF
        await self.send(scsi_command(lun=lun, itt=itt, edtl=edtl, cmd_sn=sn,
                                     exp_stat_sn=self.exp_stat_sn, cdb=cdb.ljust(16, b"\0"),
                                     read=read, write=write, final=final, dsl=len(data)),
                        data)
        return itt

    async def data_out(self, itt: int, ttt: int, data_sn: int, offset: int, data: bytes,
                       final: bool) -> None:
        await self.send(data_out(lun=0, itt=itt, ttt=ttt, exp_stat_sn=self.exp_stat_sn,
                                 data_sn=data_sn, offset=offset, dsl=len(data), final=final),
                        data)

    async def result(self, itt: int) -> tuple[int, bytes, Pdu]:
        """Collect a command's Data-In and status: (status, data, the PDU with the status)."""
        data = bytearray()
        while True:
            pdu = await self.recv()
            assert pdu.itt == itt, f"PDU 0x{pdu.op:02x} for task 0x{pdu.itt:x}, want 0x{itt:x}"
            if pdu.op == Op.DATA_IN:
                offset = pdu.u32(40)
                data[offset : offset + len(pdu.data)] = pdu.data
                if pdu.hdr[1] & 0x01:
                    return pdu.hdr[3], bytes(data), pdu
            elif pdu.op == Op.SCSI_RESPONSE:
                return pdu.hdr[3], pdu.data[2:], pdu
            else:
                raise AssertionError(f"unexpected PDU 0x{pdu.op:02x}")


def sense_of(data: bytes) -> tuple[int, int, int]:
    return data[2] & 0x0F, data[12], data[13]


def residual(pdu: Pdu) -> tuple[str, int]:
    flags = pdu.hdr[1]
    kind = "over" if flags & 0x04 else "under" if flags & 0x02 else "none"
    return kind, pdu.u32(44)


def read10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x28, flags, lba, 0, blocks, 0)


def write10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, flags, lba, 0, blocks, 0)


def inquiry(page: int | None, alloc: int = 4096) -> bytes:
    return struct.pack(">BBBHB", 0x12, 0 if page is None else 1, page or 0, alloc, 0)


@asynccontextmanager
async def session(lun: MemoryLun, **keys: str) -> AsyncIterator[tuple[Raw, IscsiTarget]]:
    target = IscsiTarget(exports={IQN: Export(iqn=IQN, luns=[lun], read_only=False)})
    async with trio.open_nursery() as nursery:
        _host, port = await nursery.start(target.serve, "127.0.0.1", 0)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        raw = Raw(stream)
        await raw.login(**keys)
        yield raw, target
        await stream.aclose()
        nursery.cancel_scope.cancel()


# -- RFC 7143 4.2.2.1: the CmdSN window ----------------------------------------------------------

@pytest.mark.parametrize("where", ["above-MaxCmdSN", "below-ExpCmdSN"])
async def test_a_command_outside_the_cmd_sn_window_is_ignored_not_executed(where: str) -> None:
    lun = MemoryLun(64 * BS)
    async with session(lun) as (raw, _target):
        # a TEST UNIT READY to learn the window
        itt = await raw.command(bytes(6), edtl=0)
        status, _, _ = await raw.result(itt)
        assert status == 0
        exp = raw.cmd_sn
        outside = (raw.max_cmd_sn + 1 if where == "above-MaxCmdSN" else exp - 1) & 0xFFFFFFFF
        new = pattern(BS, seed=4)
        await raw.command(write10(3, 1), edtl=BS, write=True, data=new, cmd_sn=outside)
        assert await raw.quiet() is None, "the target answered a command outside the window"
        assert bytes(lun.data[3 * BS : 4 * BS]) == bytes(BS), "and executed it"
        # the window did not move: the next command in order works, with ExpCmdSN = exp + 1
        itt = await raw.command(bytes(6), edtl=0)
        status, _, pdu = await raw.result(itt)
        assert status == 0 and raw.cmd_sn == (exp + 1) & 0xFFFFFFFF
        assert pdu.u32(28) == raw.cmd_sn


async def test_commands_ahead_of_exp_cmd_sn_wait_for_the_gap_and_run_in_order() -> None:
    lun = MemoryLun(64 * BS)
    async with session(lun) as (raw, _target):
        first_sn = raw.cmd_sn
        # CmdSN n+1 (a write of 'b') arrives before n (a write of 'a')
        a, b = b"a" * BS, b"b" * BS
        later = await raw.command(write10(5, 1), edtl=BS, write=True, data=b,
                                  cmd_sn=first_sn + 1)
        assert await raw.quiet() is None, "delivered before the command before it arrived"
        earlier = await raw.command(write10(5, 1), edtl=BS, write=True, data=a,
                                    cmd_sn=first_sn)
        raw.cmd_sn = first_sn + 2
        got = {}
        for _ in range(2):
            pdu = await raw.recv()
            got[pdu.itt] = pdu
        assert set(got) == {earlier, later}
        assert all(p.hdr[3] == 0 for p in got.values())
        assert max(p.u32(28) for p in got.values()) == first_sn + 2  # ExpCmdSN past both
        # both ran (SIMPLE tasks: the device server may order them either way)
        assert bytes(lun.data[5 * BS : 6 * BS]) in (a, b)


async def test_a_held_write_takes_its_unsolicited_data_out_while_it_waits() -> None:
    lun = MemoryLun(64 * BS)
    async with session(lun, ImmediateData="No", InitialR2T="No") as (raw, _target):
        first_sn = raw.cmd_sn
        new = pattern(2 * BS, seed=12)
        later = await raw.command(write10(8, 2), edtl=2 * BS, write=True, final=False,
                                  cmd_sn=first_sn + 1)
        await raw.data_out(later, NO_TAG, 0, 0, new[:BS], final=False)
        await raw.data_out(later, NO_TAG, 1, BS, new[BS:], final=True)
        assert await raw.quiet() is None
        earlier = await raw.command(bytes(6), edtl=0, cmd_sn=first_sn)
        raw.cmd_sn = first_sn + 2
        got = {(pdu := await raw.recv()).itt: pdu.hdr[3] for _ in range(2)}
        assert got == {earlier: 0, later: 0}
        assert bytes(lun.data[8 * BS : 10 * BS]) == new


# -- RFC 7143 11.7.5: DataSN order on Data-Out --------------------------------------------------

@pytest.mark.parametrize("sns", [(1, 0), (0, 0), (27,), (0xFFFFFFFF,)],
                         ids=["reversed", "repeated", "27", "minus-one"])
async def test_data_out_with_a_wrong_data_sn_is_rejected_and_ends_the_connection(
        sns: tuple[int, ...]) -> None:
    lun = MemoryLun(256 * BS)
    async with session(lun, ImmediateData="No", InitialR2T="Yes") as (raw, _target):
        blocks = len(sns)
        itt = await raw.command(write10(100, blocks), edtl=blocks * BS, write=True)
        r2t = await raw.recv()
        assert r2t.op == Op.R2T and r2t.u32(44) == blocks * BS
        ttt = r2t.u32(20)
        for n, sn in enumerate(sns):
            await raw.data_out(itt, ttt, sn, n * BS, b"x" * BS, final=n == blocks - 1)
        answer = await raw.recv()
        assert answer.op == Op.REJECT and answer.hdr[2] == 0x04  # protocol error
        with pytest.raises(EOFError):
            await raw.recv()
        assert bytes(lun.data[100 * BS : (100 + blocks) * BS]) == bytes(blocks * BS)


async def test_data_out_in_order_across_two_r2t_sequences_is_accepted() -> None:
    lun = MemoryLun(1 << 20)
    async with session(lun, ImmediateData="No", InitialR2T="Yes",
                       MaxBurstLength="4096") as (raw, _target):
        new = pattern(8192, seed=2)
        itt = await raw.command(write10(0, 16), edtl=len(new), write=True)
        for burst in range(2):
            r2t = await raw.recv()
            assert r2t.op == Op.R2T and r2t.u32(40) == burst * 4096
            for n in range(2):  # DataSN starts again at 0 in each sequence
                offset = burst * 4096 + n * 2048
                await raw.data_out(itt, r2t.u32(20), n, offset, new[offset : offset + 2048],
                                   final=n == 1)
        status, _, _ = await raw.result(itt)
        assert status == 0 and bytes(lun.data[:8192]) == new


# -- SBC-3: RDPROTECT / WRPROTECT / VRPROTECT on a LUN without protection information ----------

@pytest.mark.parametrize("opcode", [0x28, 0xA8, 0x88, 0x2A, 0xAA, 0x8A, 0x2E, 0x2F, 0x8F],
                         ids=["READ10", "READ12", "READ16", "WRITE10", "WRITE12", "WRITE16",
                              "WRITE-VERIFY10", "VERIFY10", "VERIFY16"])
@pytest.mark.parametrize("protect", [1, 3, 7])
async def test_nonzero_protection_field_is_invalid_field_in_cdb(opcode: int,
                                                                protect: int) -> None:
    lun = MemoryLun(64 * BS)
    size = {0x28: 10, 0x2A: 10, 0x2E: 10, 0x2F: 10, 0xA8: 12, 0xAA: 12}.get(opcode, 16)
    cdb = bytearray(size)
    cdb[0], cdb[1] = opcode, protect << 5
    if size == 10:
        cdb[8] = 1
    elif size == 12:
        cdb[9] = 1
    else:
        cdb[13] = 1
    writes = opcode in (0x2A, 0xAA, 0x8A, 0x2E)
    async with session(lun) as (raw, _target):
        itt = await raw.command(bytes(cdb), edtl=BS, read=not writes, write=writes,
                                data=b"z" * BS if writes else b"")
        status, sense, _ = await raw.result(itt)
        assert status == 0x02
        assert sense_of(sense) == (0x05, 0x24, 0x00)
    assert lun.data == bytes(64 * BS)


# -- SPC-4 / SBC-3: the VPD pages initiators ask for ------------------------------------

async def test_standard_vpd_pages_are_served() -> None:
    async with session(MemoryLun(64 * BS)) as (raw, _target):
        pages = {}
        for page in (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2):
            itt = await raw.command(inquiry(page), edtl=4096, read=True)
            status, data, _ = await raw.result(itt)
            assert status == 0, f"VPD page 0x{page:02x} refused"
            assert data[1] == page and len(data) == 4 + int.from_bytes(data[2:4], "big")
            pages[page] = data[4:]
        assert set(pages[0x00]) >= {0x00, 0x80, 0x83, 0xB0, 0xB2}
        assert list(pages[0x00]) == sorted(pages[0x00])
        assert pages[0x80].strip()
        # device identification: an NAA designator for the LU, the target's iSCSI name
        kinds = []
        pos, body = 0, pages[0x83]
        while pos < len(body):
            kinds.append((body[pos + 1] & 0x0F, (body[pos + 1] >> 4) & 3))
            pos += 4 + body[pos + 3]
        assert (3, 0) in kinds and (8, 2) in kinds
        assert len(pages[0xB0]) == 0x3C
        max_transfer = struct.unpack_from(">I", pages[0xB0], 4)[0]
        assert max_transfer * BS >= 1 << 20
        assert struct.unpack_from(">II", pages[0xB0], 16) == (0, 0)  # no UNMAP
        assert pages[0xB2][1] & 0xE0 == 0  # LBPU/LBPWS/LBPWS10: none, fully provisioned
        # an unknown page is still refused
        itt = await raw.command(inquiry(0xC7), edtl=255, read=True)
        status, sense, _ = await raw.result(itt)
        assert status == 0x02 and sense_of(sense) == (0x05, 0x24, 0x00)


# -- RFC 7143 11.4.5 residuals -----------------------------------------------------------------

@pytest.mark.parametrize(("blocks", "edtl", "written", "kind", "count"), [
    (1, 0, 0, "over", BS),
    (1, 2 * BS, BS, "under", BS),
    (1, 10000, BS, "under", 10000 - BS),
    (2, BS, BS, "over", BS),
    (1, 200, 200, "over", BS - 200),
])
async def test_write_residuals_write_the_smaller_of_edtl_and_the_cdb(
        blocks: int, edtl: int, written: int, kind: str, count: int) -> None:
    lun = MemoryLun(b"a" * (64 * BS))
    async with session(lun) as (raw, _target):
        itt = await raw.command(write10(0, blocks), edtl=edtl, write=edtl > 0,
                                data=b"b" * edtl)
        status, _, pdu = await raw.result(itt)
        assert status == 0
        assert residual(pdu) == (kind, count)
    assert bytes(lun.data[:written]) == b"b" * written
    assert bytes(lun.data[written:]) == b"a" * (64 * BS - written)


@pytest.mark.parametrize(("blocks", "edtl", "kind", "count"), [
    (2, BS, "over", BS), (1, 2 * BS, "under", BS), (1, 0, "over", BS)])
async def test_read_residuals(blocks: int, edtl: int, kind: str, count: int) -> None:
    data = pattern(64 * BS, seed=6)
    async with session(MemoryLun(data)) as (raw, _target):
        itt = await raw.command(read10(0, blocks), edtl=edtl, read=True)
        status, got, pdu = await raw.result(itt)
        assert status == 0 and residual(pdu) == (kind, count)
        assert got == data[: min(edtl, blocks * BS)]


# -- RFC 7143 11.5/11.6: task management --------------------------------------------------------

class SlowLun(MemoryLun):
    def read_into(self, offset: int, buf: memoryview) -> None:
        time.sleep(0.3)
        super().read_into(offset, buf)


def tmf(function: int, *, itt: int, ref_itt: int, cmd_sn: int, exp_stat_sn: int,
        ref_cmd_sn: int = 0, lun: int = 0) -> bytearray:
    h = bytearray(BHS_LEN)
    h[0] = Op.TASK_MGMT | 0x40
    h[1] = 0x80 | function
    h[9] = lun
    struct.pack_into(">IIIII", h, 16, itt, ref_itt, cmd_sn, exp_stat_sn, ref_cmd_sn)
    return h


async def test_abort_task_stops_the_task_and_it_gets_no_response() -> None:
    async with session(SlowLun(64 * BS)) as (raw, _target):
        victim = await raw.command(read10(0, 8), edtl=8 * BS, read=True)
        await trio.sleep(0.05)
        await raw.send(tmf(1, itt=0x77, ref_itt=victim, cmd_sn=raw.cmd_sn,
                           exp_stat_sn=raw.exp_stat_sn, ref_cmd_sn=raw.cmd_sn - 1))
        answer = await raw.recv()
        assert answer.op == Op.TASK_MGMT_RESPONSE and answer.itt == 0x77
        assert answer.hdr[2] == 0  # function complete
        assert await raw.quiet(0.6) is None, "the aborted task still answered"
        # the session goes on
        itt = await raw.command(bytes(6), edtl=0)
        assert (await raw.result(itt))[0] == 0


async def test_task_management_answers_with_the_rfc_response_codes() -> None:
    async with session(MemoryLun(64 * BS)) as (raw, _target):
        cases = [
            (1, 0x9999, 0, raw.cmd_sn + 10, 1),  # ABORT TASK, unknown task: does not exist
            (5, NO_TAG, 7, 0, 2),  # LOGICAL UNIT RESET of LUN 7: LUN does not exist
            (5, NO_TAG, 0, 0, 0),  # of LUN 0: function complete
            (8, 0x1234, 0, 0, 4),  # TASK REASSIGN at ErrorRecoveryLevel 0: not supported
            (4, NO_TAG, 0, 0, 5),  # CLEAR ACA: function not supported
        ]
        for n, (function, ref, lun, ref_sn, want) in enumerate(cases):
            await raw.send(tmf(function, itt=0x50 + n, ref_itt=ref, cmd_sn=raw.cmd_sn,
                               exp_stat_sn=raw.exp_stat_sn, ref_cmd_sn=ref_sn, lun=lun))
            answer = await raw.recv()
            assert answer.op == Op.TASK_MGMT_RESPONSE
            assert answer.hdr[2] == want, f"function {function}: response {answer.hdr[2]}"


async def test_lun_reset_aborts_every_task_of_the_lun() -> None:
    async with session(SlowLun(64 * BS)) as (raw, _target):
        for n in range(3):
            await raw.command(read10(n, 1), edtl=BS, read=True)
        await trio.sleep(0.05)
        await raw.send(tmf(5, itt=0x88, ref_itt=NO_TAG, cmd_sn=raw.cmd_sn,
                           exp_stat_sn=raw.exp_stat_sn))
        answer = await raw.recv()
        assert answer.op == Op.TASK_MGMT_RESPONSE and answer.hdr[2] == 0
        assert await raw.quiet(0.6) is None


# -- SPC-4: MODE SENSE pages (libiscsi's suite crashed without a Control page) --------------

async def test_mode_sense_returns_the_control_and_caching_pages() -> None:
    async with session(MemoryLun(64 * BS)) as (raw, _target):
        itt = await raw.command(bytes([0x1A, 0, 0x3F, 0, 255, 0]), edtl=255, read=True)
        status, data, _ = await raw.result(itt)
        assert status == 0 and data[0] == len(data) - 1
        assert data[2] & 0x10  # DPOFUA
        pos = 4 + data[3]
        found = {}
        while pos < len(data):
            found[data[pos] & 0x3F] = data[pos + 1]
            pos += 2 + data[pos + 1]
        assert found == {0x01: 0x0A, 0x08: 0x12, 0x0A: 0x0A, 0x1C: 0x0A}
        # the allocation length cuts the answer without an overflow residual
        itt = await raw.command(bytes([0x1A, 0, 0x3F, 0, 4, 0]), edtl=4, read=True)
        status, data, pdu = await raw.result(itt)
        assert status == 0 and len(data) == 4 and residual(pdu) == ("none", 0)
        # saved values are not supported
        itt = await raw.command(bytes([0x1A, 0, 0xCA, 0, 255, 0]), edtl=255, read=True)
        status, sense, _ = await raw.result(itt)
        assert status == 0x02 and sense_of(sense) == (0x05, 0x39, 0x00)


async def test_report_supported_opcodes_names_read10_with_dpo_and_fua() -> None:
    async with session(MemoryLun(64 * BS)) as (raw, _target):
        cdb = struct.pack(">BBBBHIBB", 0xA3, 0x0C, 0x01, 0x28, 0, 512, 0, 0)
        itt = await raw.command(cdb, edtl=512, read=True)
        status, data, _ = await raw.result(itt)
        assert status == 0 and data[1] & 0x07 == 0x03  # supported
        assert int.from_bytes(data[2:4], "big") == 10 and data[4] == 0x28
        assert data[5] & 0x18 == 0x18


# -- SPC-2 RESERVE/RELEASE and SPC-4 persistent reservations ------------------------------------

@asynccontextmanager
async def two_nexuses(lun: MemoryLun) -> AsyncIterator[tuple[Raw, Raw, IscsiTarget, int]]:
    target = IscsiTarget(exports={IQN: Export(iqn=IQN, luns=[lun], read_only=False)})
    async with trio.open_nursery() as nursery:
        _host, port = await nursery.start(target.serve, "127.0.0.1", 0)
        one = Raw(await trio.open_tcp_stream("127.0.0.1", port))
        await one.login()
        two = Raw(await trio.open_tcp_stream("127.0.0.1", port))
        await two.login(initiator=INITIATOR_IQN + "-2", isid=b"\x80\0\0\0\0\2")
        yield one, two, target, port
        await one.stream.aclose()
        await two.stream.aclose()
        nursery.cancel_scope.cancel()


async def status_of(raw: Raw, cdb: bytes, *, edtl: int = 0, data: bytes = b"",
                    read: bool = False) -> int:
    itt = await raw.command(cdb, edtl=edtl, read=read, write=bool(data), data=data)
    return (await raw.result(itt))[0]


async def test_reserve6_keeps_others_out_until_release_or_nexus_loss() -> None:
    async with two_nexuses(MemoryLun(64 * BS)) as (one, two, _target, _port):
        assert await status_of(one, bytes([0x16, 0, 0, 0, 0, 0])) == 0  # RESERVE(6)
        assert await status_of(two, read10(0, 1), edtl=BS, read=True) == 0x18  # conflict
        assert await status_of(two, inquiry(None, 96), edtl=96, read=True) == 0  # allowed
        assert await status_of(one, read10(0, 1), edtl=BS, read=True) == 0
        assert await status_of(two, bytes([0x17, 0, 0, 0, 0, 0])) == 0  # not its: no effect
        assert await status_of(two, read10(0, 1), edtl=BS, read=True) == 0x18
        assert await status_of(one, bytes([0x17, 0, 0, 0, 0, 0])) == 0  # RELEASE(6)
        assert await status_of(two, read10(0, 1), edtl=BS, read=True) == 0
        # the holder's connection goes away: the reservation goes with it (I_T nexus loss)
        assert await status_of(two, bytes([0x16, 0, 0, 0, 0, 0])) == 0
        assert await status_of(one, read10(0, 1), edtl=BS, read=True) == 0x18
        await two.stream.aclose()
        await trio.sleep(0.1)
        assert await status_of(one, read10(0, 1), edtl=BS, read=True) == 0


def prout(action: int, kind: int = 0) -> bytes:
    return struct.pack(">BBBxxIB", 0x5F, action, kind, 24, 0)


def pr_params(key: int, sa_key: int = 0) -> bytes:
    return struct.pack(">QQ8x", key, sa_key)


async def test_persistent_write_exclusive_lets_others_read_but_not_write() -> None:
    lun = MemoryLun(64 * BS)
    async with two_nexuses(lun) as (one, two, _target, _port):
        assert await status_of(one, prout(0), edtl=24, data=pr_params(0, 0xA1)) == 0
        assert await status_of(one, prout(1, 1), edtl=24, data=pr_params(0xA1)) == 0
        # READ KEYS and READ RESERVATION, from the other nexus
        itt = await two.command(struct.pack(">BBxxxxxHx", 0x5E, 0, 512), edtl=512, read=True)
        status, keys, _ = await two.result(itt)
        assert status == 0 and keys[4:8] == b"\0\0\0\x08" and keys[8:16] == (0xA1).to_bytes(8,
                                                                                    "big")
        itt = await two.command(struct.pack(">BBxxxxxHx", 0x5E, 1, 512), edtl=512, read=True)
        status, held, _ = await two.result(itt)
        assert status == 0 and held[8:16] == (0xA1).to_bytes(8, "big") and held[21] & 0x0F == 1
        assert await status_of(two, read10(0, 1), edtl=BS, read=True) == 0
        assert await status_of(two, write10(0, 1), edtl=BS, data=b"x" * BS) == 0x18
        assert lun.data[:BS] == bytes(BS)
        assert await status_of(one, write10(0, 1), edtl=BS, data=b"y" * BS) == 0
        # a wrong key is a conflict; the right one releases
        assert await status_of(one, prout(2, 1), edtl=24, data=pr_params(0xBAD)) == 0x18
        assert await status_of(one, prout(2, 1), edtl=24, data=pr_params(0xA1)) == 0
        assert await status_of(two, write10(0, 1), edtl=BS, data=b"x" * BS) == 0
        assert lun.data[:BS] == b"x" * BS
