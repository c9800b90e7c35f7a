"""The initiator's pure parts without a target: framing, login state machine, SCSI decoding."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ahvbackup.core.secret import Secret
from ahvbackup.transports.iscsi import scsi
from ahvbackup.transports.iscsi.errors import IscsiAuthError, IscsiLoginError
from ahvbackup.transports.iscsi.initiator import _parse_address
from ahvbackup.transports.iscsi.login import (
    CSG_FULL_FEATURE,
    CSG_OPERATIONAL,
    CSG_SECURITY,
    ChapCredentials,
    LoginExchange,
    Offer,
)
from ahvbackup.transports.iscsi.pdu import (
    decode_lun,
    decode_text,
    encode_lun,
    encode_text,
    parse_header,
    scsi_command,
    serial_lt,
)

SECRET = "initiator-secret-1"
TSECRET = "target-secret-22"


def exchange(*, chap: bool = True, mutual: bool = False, offer: Offer | None = None):
    return LoginExchange(
        initiator_iqn="iqn.2024-01.test:i", target_iqn="iqn.2024-01.test:t", portal="h:3260",
        chap=ChapCredentials("u", Secret(SECRET)) if chap else None,
        mutual=ChapCredentials("tu", Secret(TSECRET)) if mutual else None, offer=offer)


def through_chap(ex: LoginExchange, *, ident: int = 7, challenge: bytes = b"\x01" * 16):
    ex.first()
    ex.feed(csg=CSG_SECURITY, nsg=CSG_OPERATIONAL, transit=False, keys=[("AuthMethod", "CHAP")])
    return ex.feed(csg=CSG_SECURITY, nsg=CSG_OPERATIONAL, transit=False, keys=[
        ("CHAP_A", "5"), ("CHAP_I", str(ident)), ("CHAP_C", "0x" + challenge.hex())])


def test_chap_answer_is_md5_of_id_secret_challenge():
    step = through_chap(exchange(), ident=7, challenge=b"\x01" * 16)
    keys = dict(step.keys)
    want = hashlib.md5(bytes([7]) + SECRET.encode() + b"\x01" * 16).hexdigest()
    assert keys == {"CHAP_N": "u", "CHAP_R": "0x" + want}
    assert step.transit


def test_base64_challenges_are_accepted():
    step = through_chap(exchange(), challenge=b"\xff" * 8)
    ex2 = exchange()
    ex2.first()
    ex2.feed(csg=0, nsg=1, transit=False, keys=[("AuthMethod", "CHAP")])
    step2 = ex2.feed(csg=0, nsg=1, transit=False,
                     keys=[("CHAP_A", "5"), ("CHAP_I", "7"), ("CHAP_C", "0b//////////8=")])
    assert dict(step.keys)["CHAP_R"] == dict(step2.keys)["CHAP_R"]


def test_mutual_chap_verifies_the_target_answer():
    ex = exchange(mutual=True)
    step = through_chap(ex)
    mine = dict(step.keys)
    our_id, our_c = int(mine["CHAP_I"]), bytes.fromhex(mine["CHAP_C"][2:])
    assert our_c != b"\x01" * 16  # never reflect the target's own challenge
    right = hashlib.md5(bytes([our_id]) + TSECRET.encode() + our_c).hexdigest()
    nxt = ex.feed(csg=CSG_SECURITY, nsg=CSG_OPERATIONAL, transit=True,
                  keys=[("CHAP_N", "tu"), ("CHAP_R", "0x" + right)])
    assert nxt is not None
    assert nxt.csg == CSG_OPERATIONAL


@pytest.mark.parametrize(("keys", "why"), [
    ([("CHAP_N", "tu"), ("CHAP_R", "0x" + "00" * 16)], "CHAP response is wrong"),
    ([("CHAP_N", "someone"), ("CHAP_R", "0x" + "00" * 16)], "answered as 'someone'"),
    ([], "did not answer our challenge"),
])
def test_mutual_chap_refuses_a_target_that_does_not_know_the_secret(keys, why):
    ex = exchange(mutual=True)
    through_chap(ex)
    with pytest.raises(IscsiAuthError, match=why) as info:
        ex.feed(csg=CSG_SECURITY, nsg=CSG_OPERATIONAL, transit=True, keys=keys)
    assert TSECRET not in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(("keys", "why"), [
    ([("CHAP_A", "7"), ("CHAP_I", "1"), ("CHAP_C", "0x01")], "only do MD5"),
    ([("CHAP_A", "5"), ("CHAP_I", "1")], "no CHAP_C"),
    ([("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", "zz")], "malformed"),
    ([("CHAP_A", "5"), ("CHAP_I", "300"), ("CHAP_C", "0x01")], "out-of-range"),
])
def test_bad_chap_challenges_are_login_errors(keys, why):
    ex = exchange()
    ex.first()
    ex.feed(csg=0, nsg=1, transit=False, keys=[("AuthMethod", "CHAP")])
    with pytest.raises(IscsiAuthError, match=why):
        ex.feed(csg=0, nsg=1, transit=False, keys=keys)


def test_target_refusing_chap_offer():
    ex = exchange()
    ex.first()
    with pytest.raises(IscsiAuthError, match="AuthMethod=None to our CHAP offer"):
        ex.feed(csg=0, nsg=1, transit=False, keys=[("AuthMethod", "None")])


def test_refusal_status_is_named_and_carries_no_secret():
    ex = exchange()
    through_chap(ex)
    err = ex.refused(0x02, 0x01)
    assert isinstance(err, IscsiAuthError)
    assert "authentication failure (status 0x0201)" in str(err)
    assert "iqn.2024-01.test:t at h:3260" in str(err)
    assert err.step == "CHAP authentication"
    assert SECRET not in str(err)
    assert not isinstance(ex.refused(0x02, 0x03), IscsiAuthError)


def operational(ex: LoginExchange):
    ex.first()
    step = ex.feed(csg=0, nsg=1, transit=True, keys=[("AuthMethod", "None")])
    assert step is not None
    assert (step.csg, step.nsg) == (CSG_OPERATIONAL, CSG_FULL_FEATURE)
    return dict(step.keys)


def test_operational_offer_and_results():
    ex = exchange(chap=False, offer=Offer(max_recv_data_segment_length=262144))
    offered = operational(ex)
    assert offered["MaxRecvDataSegmentLength"] == "262144"
    assert offered["ErrorRecoveryLevel"] == "0"
    assert ex.feed(csg=1, nsg=3, transit=True, keys=[
        ("HeaderDigest", "None"), ("DataDigest", "None"), ("MaxRecvDataSegmentLength", "8192"),
        ("MaxBurstLength", "262144"), ("FirstBurstLength", "65536"), ("InitialR2T", "Yes"),
        ("ImmediateData", "Yes"), ("ErrorRecoveryLevel", "0"), ("TargetAlias", "x"),
    ]) is None
    p = ex.params
    assert (p.max_recv_data_segment_length, p.max_xmit_data_segment_length) == (262144, 8192)
    assert (p.max_burst_length, p.first_burst_length) == (262144, 65536)
    assert (p.initial_r2t, p.immediate_data) == (True, True)


def test_unknown_keys_are_answered_not_understood():
    ex = exchange(chap=False)
    operational(ex)
    step = ex.feed(csg=1, nsg=3, transit=False, keys=[("X-com.example.Fancy", "1")])
    assert step is not None
    assert step.keys == [("X-com.example.Fancy", "NotUnderstood")]


def test_a_target_going_above_our_offer_is_an_error():
    ex = exchange(chap=False)
    operational(ex)
    with pytest.raises(IscsiLoginError, match="MaxBurstLength=99999999, above our offer"):
        ex.feed(csg=1, nsg=3, transit=True, keys=[("MaxBurstLength", "99999999")])


def test_scsi_command_header_layout():
    h = scsi_command(lun=1, itt=0x11223344, edtl=1 << 20, cmd_sn=5, exp_stat_sn=9,
                     cdb=scsi.read16(0x0102030405, 2048), read=True)
    assert h[0] == 0x01
    assert h[1] == 0x80 | 0x40 | 0x01
    assert h[8:10] == b"\x00\x01"
    assert h[16:32] == bytes.fromhex("11223344" "00100000" "00000005" "00000009")
    assert h[32:48] == bytes.fromhex("8800" "0000000102030405" "00000800" "0000")
    parsed = parse_header(h)
    assert (parsed.itt, parsed.dsl) == (0x11223344, 0)


@given(st.lists(st.tuples(st.from_regex(r"[A-Za-z][A-Za-z0-9_.]{0,20}", fullmatch=True),
                          st.text(alphabet=st.characters(blacklist_characters="\0",
                                                         blacklist_categories=["Cs"]),
                                  max_size=40))))
def test_text_keys_round_trip(pairs):
    assert decode_text(encode_text(pairs)) == pairs


@given(st.integers(0, 0x3FFF))
def test_lun_round_trip(lun):
    assert decode_lun(encode_lun(lun)) == lun


@given(st.integers(0, 2**32 - 1), st.integers(1, 2**31 - 1))
def test_serial_arithmetic_wraps(a, d):
    b = (a + d) & 0xFFFFFFFF
    assert serial_lt(a, b)
    assert not serial_lt(b, a)


def test_sense_decoding():
    fixed = bytes([0x70, 0, 0x06]) + bytes(9) + bytes([0x2A, 0x09]) + bytes(4)
    s = scsi.parse_sense(fixed)
    assert s is not None
    assert s.unit_attention
    assert str(s) == "UNIT ATTENTION, capacity data has changed (ASC/ASCQ 0x2a/0x09)"
    desc = scsi.parse_sense(bytes([0x72, 0x05, 0x25, 0x00]))
    assert str(desc) == "ILLEGAL REQUEST, logical unit not supported (ASC/ASCQ 0x25/0x00)"
    assert scsi.parse_sense(b"") is None


def test_capacity_and_report_luns_decoding():
    cap = scsi.parse_capacity16((2047).to_bytes(8, "big") + (4096).to_bytes(4, "big")
                                + bytes([0, 0, 0x80, 0]) + bytes(16))
    assert (cap.blocks, cap.block_size, cap.size, cap.thin) == (2048, 4096, 2048 * 4096, True)
    luns = scsi.parse_report_luns((16).to_bytes(4, "big") + bytes(4) + bytes(8)
                                  + bytes([0, 1]) + bytes(6))
    assert luns == [0, 1]


@pytest.mark.parametrize(("text", "want"), [
    ("10.0.0.5:3261,1", ("10.0.0.5", 3261, 1)),
    ("10.0.0.5", ("10.0.0.5", 3260, None)),
    ("[fe80::1]:3262,2", ("fe80::1", 3262, 2)),
    ("host.example", ("host.example", 3260, None)),
])
def test_target_address_parsing(text, want):
    assert _parse_address(text) == want
