"""Our iSCSI initiator against a real tgtd: discovery, login (None, CHAP, mutual CHAP), reads and
writes byte-exact under several negotiated parameter sets, and clear refusals."""

from __future__ import annotations

import pytest
import trio
from tests.transports.conftest import INITIATOR_IQN, pattern

from ahvbackup.core.secret import Secret
from ahvbackup.transports.iscsi import (
    ChapCredentials,
    IscsiAuthError,
    IscsiCommandError,
    IscsiError,
    IscsiLoginError,
    IscsiSession,
    discover,
)

pytestmark = pytest.mark.peer

MiB = 1 << 20
USER, SECRET = "backupuser", "s3cret-chap-pw1"
TUSER, TSECRET = "targetuser", "t4rget-chap-pw2"


def creds(user: str, secret: str) -> ChapCredentials:
    return ChapCredentials(user, Secret(secret))


async def read_all(s: IscsiSession) -> bytes:
    buf = bytearray(s.size)
    await s.read_into(0, memoryview(buf))
    return bytes(buf)


@pytest.mark.parametrize("auth", ["none", "chap", "mutual"])
async def test_reads_and_writes_byte_exact(tgtd, auth):
    data = pattern(8 * MiB)
    target = tgtd(
        data=data,
        chap=(USER, SECRET) if auth != "none" else None,
        mutual=(TUSER, TSECRET) if auth == "mutual" else None,
    )
    async with IscsiSession.connect(
        portal=target.portal, target_iqn=target.iqn, initiator_iqn=INITIATOR_IQN,
        chap=creds(USER, SECRET) if auth != "none" else None,
        mutual=creds(TUSER, TSECRET) if auth == "mutual" else None,
    ) as s:
        assert s.capacity is not None
        assert (s.capacity.block_size, s.size) == (512, len(data))
        assert await read_all(s) == data
        new = pattern(3 * MiB + 512, seed=7)
        await s.write(MiB + 512, new)
        expect = data[: MiB + 512] + new + data[MiB + 512 + len(new) :]
        assert await read_all(s) == expect
    assert target.image.read_bytes() == expect  # it really reached the target's disk


async def test_inquiry_report_luns_and_capacity(tgtd):
    target = tgtd(size=4 * MiB, blocksize=4096)
    async with IscsiSession.connect(portal=target.portal, target_iqn=target.iqn,
                                    initiator_iqn=INITIATOR_IQN) as s:
        assert s.lun == 1  # LUN 0 is tgtd's controller; the disk was found by INQUIRY
        assert await s.report_luns() == [0, 1]
        inq = await s.inquiry()
        assert (inq.device_type, inq.vendor) == (0, "IET")
        cap = await s.read_capacity()
        assert (cap.block_size, cap.blocks) == (4096, 1024)
        await s.test_unit_ready()
        await s.ping()


async def test_discovery_lists_the_target_and_its_portal(tgtd):
    target = tgtd(size=MiB)
    found = await discover(target.portal, initiator_iqn=INITIATOR_IQN)
    assert [(t.iqn, [p[:2] for p in t.portals]) for t in found] == [
        (target.iqn, [target.portal])
    ]


async def test_wrong_chap_secret_is_refused_clearly(tgtd):
    target = tgtd(size=MiB, chap=(USER, SECRET))
    wrong = "not-the-secret-9"
    with pytest.raises(IscsiAuthError) as info:
        async with IscsiSession.connect(portal=target.portal, target_iqn=target.iqn,
                                        initiator_iqn=INITIATOR_IQN, chap=creds(USER, wrong)):
            pytest.fail("logged in with a wrong secret")
    err = info.value
    msg = str(err)
    assert (err.status_class, err.status_detail) == (0x02, 0x01)
    assert err.step == "CHAP authentication"
    assert target.iqn in msg
    assert f"127.0.0.1:{target.port}" in msg
    assert "authentication failure" in msg
    assert USER in msg
    assert wrong not in msg
    assert SECRET not in msg
    assert wrong not in repr(err.args)


async def test_chap_target_without_credentials_says_chap_is_required(tgtd):
    target = tgtd(size=MiB, chap=(USER, SECRET))
    with pytest.raises(IscsiAuthError, match="requires CHAP"):
        async with IscsiSession.connect(portal=target.portal, target_iqn=target.iqn,
                                        initiator_iqn=INITIATOR_IQN):
            pass


async def test_target_with_wrong_mutual_secret_is_refused(tgtd):
    target = tgtd(size=MiB, chap=(USER, SECRET), mutual=(TUSER, TSECRET))
    with pytest.raises(IscsiAuthError) as info:
        async with IscsiSession.connect(
            portal=target.portal, target_iqn=target.iqn, initiator_iqn=INITIATOR_IQN,
            chap=creds(USER, SECRET), mutual=creds(TUSER, "what-we-expect-1"),
        ):
            pytest.fail("accepted a target that does not know the mutual secret")
    assert info.value.step == "mutual CHAP"
    assert "CHAP response is wrong" in str(info.value)
    assert TSECRET not in str(info.value)
    assert "what-we-expect-1" not in str(info.value)


async def test_mutual_chap_against_a_target_without_outgoing_account(tgtd):
    target = tgtd(size=MiB, chap=(USER, SECRET))
    with pytest.raises(IscsiAuthError, match="outgoing account"):
        async with IscsiSession.connect(
            portal=target.portal, target_iqn=target.iqn, initiator_iqn=INITIATOR_IQN,
            chap=creds(USER, SECRET), mutual=creds(TUSER, TSECRET),
        ):
            pass


async def test_unknown_target_is_a_clear_login_error(tgtd):
    target = tgtd(size=MiB)
    with pytest.raises(IscsiLoginError, match="target not found") as info:
        async with IscsiSession.connect(portal=target.portal, target_iqn=target.iqn + "-nope",
                                        initiator_iqn=INITIATOR_IQN):
            pass
    assert (info.value.status_class, info.value.status_detail) == (0x02, 0x03)


async def test_missing_lun_reports_the_sense(tgtd):
    target = tgtd(size=MiB)
    with pytest.raises(IscsiCommandError, match=r"LUN 5.*ILLEGAL REQUEST") as info:
        async with IscsiSession.connect(portal=target.portal, target_iqn=target.iqn,
                                        initiator_iqn=INITIATOR_IQN, lun=5):
            pass
    assert info.value.status == 0x02


async def test_unaligned_or_out_of_range_requests_are_refused(tgtd):
    target = tgtd(size=MiB)
    async with IscsiSession.connect(portal=target.portal, target_iqn=target.iqn,
                                    initiator_iqn=INITIATOR_IQN) as s:
        with pytest.raises(IscsiError, match="not aligned to the 512-byte block size"):
            await s.read_into(100, memoryview(bytearray(512)))
        with pytest.raises(IscsiError, match="past the end"):
            await s.read_into(MiB - 512, memoryview(bytearray(1024)))


WRITE_PARAMS = {
    "tgtd-defaults": {},
    "unsolicited-data-out": {"InitialR2T": "No", "FirstBurstLength": "131072",
                             "MaxRecvDataSegmentLength": "32768"},
    "r2t-only": {"ImmediateData": "No", "MaxRecvDataSegmentLength": "65536"},
    "big-segments": {"MaxRecvDataSegmentLength": "262144", "MaxBurstLength": "1048576"},
}


@pytest.mark.parametrize("digests", [False, True], ids=["plain", "crc32c"])
@pytest.mark.parametrize("params", WRITE_PARAMS.values(), ids=WRITE_PARAMS.keys())
async def test_negotiated_parameters_are_honoured(tgtd, params, digests):
    data = pattern(4 * MiB, seed=3)
    if digests:
        params = {**params, "HeaderDigest": "CRC32C,None", "DataDigest": "CRC32C,None"}
    target = tgtd(data=data, params=params)
    async with IscsiSession.connect(portal=target.portal, target_iqn=target.iqn,
                                    initiator_iqn=INITIATOR_IQN, digests=digests) as s:
        p = s.params
        assert (p.header_digest, p.data_digest) == (digests, digests)
        if "MaxRecvDataSegmentLength" in params:
            assert p.max_xmit_data_segment_length == int(params["MaxRecvDataSegmentLength"])
        assert p.initial_r2t == (params.get("InitialR2T", "Yes") == "Yes")
        assert p.immediate_data == (params.get("ImmediateData", "Yes") == "Yes")
        new = pattern(3 * MiB, seed=4)
        await s.write(512 * 3, new)
        expect = data[:1536] + new + data[1536 + len(new) :]
        assert await read_all(s) == expect
    assert target.image.read_bytes() == expect


async def test_required_digests_refused_by_the_target_fail_the_login(tgtd):
    target = tgtd(size=MiB)  # tgtd's default: HeaderDigest=None
    with pytest.raises(IscsiLoginError, match=r"digests were required.*HeaderDigest=None"):
        async with IscsiSession.connect(portal=target.portal, target_iqn=target.iqn,
                                        initiator_iqn=INITIATOR_IQN, digests=True):
            pass


async def test_many_reads_in_flight_within_a_small_cmdsn_window(tgtd):
    """tgtd's MaxQueueCmd bounds its CmdSN window below our queue depth: commands must wait for
    the window, and concurrent reads of scattered regions land in the right buffers."""
    data = pattern(8 * MiB, seed=5)
    target = tgtd(data=data, params={"MaxQueueCmd": "2"})
    async with IscsiSession.connect(portal=target.portal, target_iqn=target.iqn,
                                    initiator_iqn=INITIATOR_IQN, queue_depth=16,
                                    max_transfer=64 * 1024) as s:
        assert await read_all(s) == data
        bufs = {off: bytearray(96 * 1024) for off in range(0, 8 * MiB - 96 * 1024, 777 * 512)}
        async with trio.open_nursery() as n:
            for off, b in reversed(bufs.items()):
                n.start_soon(s.read_into, off, memoryview(b))
        for off, b in bufs.items():
            assert bytes(b) == data[off : off + len(b)], off


async def test_target_nop_in_pings_are_answered(tgtd):
    """tgtd pings idle initiators and drops those that do not answer; we stay connected."""
    data = pattern(MiB)
    target = tgtd(data=data, params={"nop_interval": "1", "nop_count": "2"})
    async with IscsiSession.connect(portal=target.portal, target_iqn=target.iqn,
                                    initiator_iqn=INITIATOR_IQN) as s:
        await trio.sleep(4.5)
        assert await read_all(s) == data
        assert s.reconnects == 0, s.connection_errors
