"""Login (RFC 7143 §6, §12, §13): security negotiation with CHAP, operational key negotiation.

`LoginExchange` is the login state machine without any IO: the session feeds it each Login
Response's stage bits and keys and sends what it returns, so every branch (refusals, a wrong
mutual answer, odd target offers) is testable without a target.
"""

from __future__ import annotations

__all__ = [
    "CSG_FULL_FEATURE",
    "CSG_OPERATIONAL",
    "CSG_SECURITY",
    "ChapCredentials",
    "LoginExchange",
    "LoginStep",
    "Offer",
    "SessionParams",
    "chap_response",
    "login_status_text",
]

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field, replace
from typing import Any

from ahvbackup.core.secret import Secret

from .errors import IscsiAuthError, IscsiLoginError

CSG_SECURITY = 0
CSG_OPERATIONAL = 1
CSG_FULL_FEATURE = 3
CHAP_MD5 = 5
_MAX_ROUNDS = 16

_STATUS = {
    (0x01, 0x01): "target moved temporarily",
    (0x01, 0x02): "target moved permanently",
    (0x02, 0x00): "initiator error",
    (0x02, 0x01): "authentication failure",
    (0x02, 0x02): "authorization failure (initiator not allowed to log in to this target)",
    (0x02, 0x03): "target not found",
    (0x02, 0x04): "target removed",
    (0x02, 0x05): "unsupported version",
    (0x02, 0x06): "too many connections",
    (0x02, 0x07): "missing parameter",
    (0x02, 0x08): "cannot include connection in session",
    (0x02, 0x09): "session type not supported",
    (0x02, 0x0A): "session does not exist",
    (0x02, 0x0B): "invalid request during login",
    (0x03, 0x00): "target error",
    (0x03, 0x01): "service unavailable",
    (0x03, 0x02): "out of resources",
}


def login_status_text(status_class: int, status_detail: int) -> str:
    what = _STATUS.get((status_class, status_detail), "unknown status")
    return f"{what} (status 0x{status_class:02x}{status_detail:02x})"


@dataclass(frozen=True, slots=True)
class ChapCredentials:
    """A CHAP user name and secret. For mutual CHAP, a second one names the target's account."""

    user: str
    secret: Secret

    def __post_init__(self) -> None:
        if not self.user:
            raise ValueError("CHAP user name is empty")
        if not isinstance(self.secret, Secret):
            raise TypeError("CHAP secret must be an ahvbackup.core.secret.Secret")


def chap_response(ident: int, secret: bytes, challenge: bytes) -> bytes:
    """CHAP with MD5 (RFC 1994 §4.1): MD5(identifier || secret || challenge)."""
    return hashlib.md5(bytes([ident & 0xFF]) + secret + challenge).digest()


def _chap_binary(value: str) -> bytes:
    if value[:2] in ("0x", "0X"):
        return bytes.fromhex(value[2:])
    if value[:2] in ("0b", "0B"):
        return base64.b64decode(value[2:], validate=True)
    raise ValueError("neither 0x (hex) nor 0b (base64) encoded")


@dataclass(frozen=True, slots=True)
class Offer:
    """What we propose in operational negotiation; defaults suit bulk sequential reads."""

    digests: bool = False
    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 1048576
    first_burst_length: int = 262144
    immediate_data: bool = True
    initial_r2t: bool = False


@dataclass(frozen=True, slots=True)
class SessionParams:
    """The negotiated values the session obeys (RFC defaults until the target says otherwise)."""

    header_digest: bool = False
    data_digest: bool = False
    max_recv_data_segment_length: int = 8192  # ours: bounds what the target sends us
    max_xmit_data_segment_length: int = 8192  # the target's: bounds what we send
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    immediate_data: bool = True
    initial_r2t: bool = True
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    default_time2wait: int = 2
    default_time2retain: int = 20
    target_portal_group_tag: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LoginStep:
    """One Login Request to send: stage bits and text keys."""

    csg: int
    nsg: int
    transit: bool
    keys: list[tuple[str, str]]


_BOOL_OR = {"InitialR2T", "DataPDUInOrder", "DataSequenceInOrder"}
_BOOL_AND = {"ImmediateData"}
_PREFER = {"InitialR2T": False, "ImmediateData": True, "DataPDUInOrder": True,
           "DataSequenceInOrder": True}
_NUM_MIN = {"MaxBurstLength", "FirstBurstLength", "MaxOutstandingR2T", "ErrorRecoveryLevel",
            "MaxConnections", "DefaultTime2Retain"}
_NUM_MAX = {"DefaultTime2Wait"}
_FIELDS = {
    "InitialR2T": "initial_r2t", "ImmediateData": "immediate_data",
    "MaxBurstLength": "max_burst_length", "FirstBurstLength": "first_burst_length",
    "MaxOutstandingR2T": "max_outstanding_r2t", "ErrorRecoveryLevel": "error_recovery_level",
    "DataPDUInOrder": "data_pdu_in_order", "DataSequenceInOrder": "data_sequence_in_order",
    "DefaultTime2Wait": "default_time2wait", "DefaultTime2Retain": "default_time2retain",
}
_INFORMATIONAL = {"TargetAlias", "TargetPortalGroupTag", "TargetAddress", "InitiatorAlias"}


class LoginExchange:
    """Drives one login from the first request to Full Feature Phase.

    Usage: `step = ex.first()`; send it; for every Login Response call `ex.feed(...)`, which
    returns the next step or None once the target moved us to Full Feature Phase; then `ex.params`
    holds the negotiated values. Failures raise `IscsiLoginError` / `IscsiAuthError` naming the
    target, portal and step, never a secret.
    """

    def __init__(
        self,
        *,
        initiator_iqn: str,
        target_iqn: str | None,
        portal: str,
        chap: ChapCredentials | None = None,
        mutual: ChapCredentials | None = None,
        offer: Offer | None = None,
    ) -> None:
        if mutual is not None and chap is None:
            raise ValueError("mutual CHAP needs one-way CHAP credentials too")
        self.initiator_iqn = initiator_iqn
        self.target_iqn = target_iqn
        self.portal = portal
        self.chap = chap
        self.mutual = mutual
        self.offer = offer or Offer()
        self.params = SessionParams()
        self._state = "start"
        self._rounds = 0
        self._our_ident = 0
        self._our_challenge = b""
        self._offered: dict[str, str] = {}

    @property
    def label(self) -> str:
        return self.target_iqn or "discovery session"

    def _fail(self, step: str, why: str, *, auth: bool = False, status: tuple[int, int] | None
              = None) -> IscsiLoginError:
        cls = IscsiAuthError if auth else IscsiLoginError
        return cls(
            f"iSCSI login to {self.label} at {self.portal} failed during {step}: {why}",
            target=self.label, portal=self.portal, step=step,
            status_class=status[0] if status else None,
            status_detail=status[1] if status else None,
        )

    def first(self) -> LoginStep:
        keys = [("InitiatorName", self.initiator_iqn)]
        if self.target_iqn is None:
            keys.append(("SessionType", "Discovery"))
        else:
            keys += [("SessionType", "Normal"), ("TargetName", self.target_iqn)]
        if self.chap is None:
            keys.append(("AuthMethod", "None"))
            self._state = "auth-none"
            return LoginStep(CSG_SECURITY, CSG_OPERATIONAL, True, keys)
        keys.append(("AuthMethod", "CHAP"))
        self._state = "auth-offer"
        return LoginStep(CSG_SECURITY, CSG_OPERATIONAL, False, keys)

    def step_name(self) -> str:
        return {
            "start": "connecting",
            "auth-none": "security negotiation (AuthMethod=None)",
            "auth-offer": "security negotiation (offering AuthMethod=CHAP)",
            "chap-a": "CHAP algorithm negotiation",
            "chap-r": "CHAP authentication",
            "operational": "operational parameter negotiation",
        }.get(self._state, self._state)

    def refused(self, status_class: int, status_detail: int) -> IscsiLoginError:
        """The error for a Login Response with a non-zero status class (not redirects)."""
        step = self.step_name()
        why = login_status_text(status_class, status_detail)
        auth = status_class == 0x02 and status_detail in (0x01, 0x02)
        if auth and self.chap is None and status_detail == 0x01:
            why += "; the target requires CHAP and no CHAP credentials were given"
        elif auth and self.chap is not None and status_detail == 0x01:
            why += f"; check CHAP user {self.chap.user!r} and its secret"
            if self.mutual is not None:
                why += (" (with mutual CHAP, also whether the target has an outgoing account "
                        "to answer our challenge)")
        return self._fail(step, why, auth=auth, status=(status_class, status_detail))

    def feed(self, *, csg: int, nsg: int, transit: bool,
             keys: list[tuple[str, str]]) -> LoginStep | None:
        self._rounds += 1
        if self._rounds > _MAX_ROUNDS:
            raise self._fail(self.step_name(), f"no agreement after {_MAX_ROUNDS} exchanges")
        got = dict(keys)
        self._note_informational(got)
        if self._state in ("auth-none", "auth-offer", "chap-a", "chap-r"):
            if csg != CSG_SECURITY:
                raise self._fail(self.step_name(),
                                 f"target answered in stage {csg}, expected security (0)")
            return self._security(got, transit=transit, nsg=nsg)
        if self._state == "operational":
            if csg != CSG_OPERATIONAL:
                raise self._fail(self.step_name(),
                                 f"target answered in stage {csg}, expected operational (1)")
            return self._operational(keys, transit=transit, nsg=nsg)
        raise self._fail(self.step_name(), "Login Response after the login finished")

    def _note_informational(self, got: dict[str, str]) -> None:
        tpgt = got.get("TargetPortalGroupTag")
        if tpgt is not None and tpgt.isdigit():
            self.params = replace(self.params, target_portal_group_tag=int(tpgt))

    def _security(self, got: dict[str, str], *, transit: bool, nsg: int) -> LoginStep | None:
        step = self.step_name()
        if self._state == "auth-none":
            method = got.get("AuthMethod", "None")
            if method != "None":
                raise self._fail(step, f"target wants AuthMethod={method}; give CHAP credentials",
                                 auth=True)
            if not transit:
                return LoginStep(CSG_SECURITY, CSG_OPERATIONAL, True, [])
            return self._enter_operational(nsg)
        if self._state == "auth-offer":
            offered = got.get("AuthMethod")
            if offered != "CHAP":
                raise self._fail(step, f"target answered AuthMethod={offered} to our CHAP offer "
                                 "(CHAP is not enabled for this target?)", auth=True)
            self._state = "chap-a"
            return LoginStep(CSG_SECURITY, CSG_OPERATIONAL, False, [("CHAP_A", str(CHAP_MD5))])
        if self._state == "chap-a":
            assert self.chap is not None
            if got.get("CHAP_A") != str(CHAP_MD5):
                raise self._fail(step, f"target chose CHAP_A={got.get('CHAP_A')}, we only do MD5 "
                                 "(5)", auth=True)
            try:
                ident = int(got["CHAP_I"], 0)
                challenge = _chap_binary(got["CHAP_C"])
            except KeyError as err:
                raise self._fail(step, f"target sent no {err.args[0]}", auth=True) from err
            except ValueError as err:
                raise self._fail(step, f"target sent a malformed CHAP_I/CHAP_C: {err}",
                                 auth=True) from err
            if not 0 <= ident <= 255 or not challenge:
                raise self._fail(step, "target sent an out-of-range CHAP_I or empty CHAP_C",
                                 auth=True)
            answer = chap_response(ident, self.chap.secret.reveal().encode(), challenge)
            keys = [("CHAP_N", self.chap.user), ("CHAP_R", "0x" + answer.hex())]
            if self.mutual is not None:
                self._our_ident = secrets.randbelow(256)
                self._our_challenge = secrets.token_bytes(16)
                while self._our_challenge == challenge:
                    self._our_challenge = secrets.token_bytes(16)
                keys += [("CHAP_I", str(self._our_ident)),
                         ("CHAP_C", "0x" + self._our_challenge.hex())]
            self._state = "chap-r"
            return LoginStep(CSG_SECURITY, CSG_OPERATIONAL, True, keys)
        # chap-r: the target accepted our response (a refusal arrives as a status instead)
        if self.mutual is not None:
            name, resp = got.get("CHAP_N"), got.get("CHAP_R")
            if name is None or resp is None:
                raise self._fail("mutual CHAP", "target did not answer our challenge (no "
                                 "CHAP_N/CHAP_R); is an outgoing account set on the target?",
                                 auth=True)
            if name != self.mutual.user:
                raise self._fail("mutual CHAP", f"target answered as {name!r}, expected "
                                 f"{self.mutual.user!r}", auth=True)
            try:
                their = _chap_binary(resp)
            except ValueError as err:
                raise self._fail("mutual CHAP", f"malformed CHAP_R: {err}", auth=True) from err
            want = chap_response(self._our_ident, self.mutual.secret.reveal().encode(),
                                 self._our_challenge)
            if not hmac.compare_digest(their, want):
                raise self._fail("mutual CHAP", "the target's CHAP response is wrong (it does "
                                 f"not know the secret of {self.mutual.user!r})", auth=True)
        if not transit:
            return LoginStep(CSG_SECURITY, CSG_OPERATIONAL, True, [])
        return self._enter_operational(nsg)

    def _enter_operational(self, nsg: int) -> LoginStep | None:
        if nsg == CSG_FULL_FEATURE:
            self._state = "done"
            return None
        self._state = "operational"
        o = self.offer
        digest = "CRC32C" if o.digests else "None"
        keys = [("HeaderDigest", digest), ("DataDigest", digest),
                ("MaxRecvDataSegmentLength", str(o.max_recv_data_segment_length))]
        if self.target_iqn is not None:
            keys += [
                ("InitialR2T", "Yes" if o.initial_r2t else "No"),
                ("ImmediateData", "Yes" if o.immediate_data else "No"),
                ("MaxBurstLength", str(o.max_burst_length)),
                ("FirstBurstLength", str(o.first_burst_length)),
                ("MaxOutstandingR2T", "1"),
                ("MaxConnections", "1"),
                ("DataPDUInOrder", "Yes"),
                ("DataSequenceInOrder", "Yes"),
                ("ErrorRecoveryLevel", "0"),
                ("DefaultTime2Wait", "0"),
                ("DefaultTime2Retain", "0"),
            ]
        self._offered = dict(keys)
        self.params = replace(self.params,
                              max_recv_data_segment_length=o.max_recv_data_segment_length)
        return LoginStep(CSG_OPERATIONAL, CSG_FULL_FEATURE, True, keys)

    def _operational(self, keys: list[tuple[str, str]], *, transit: bool,
                     nsg: int) -> LoginStep | None:
        replies: list[tuple[str, str]] = []
        changes: dict[str, Any] = {}
        for key, value in keys:
            if key in _INFORMATIONAL:
                continue
            if key == "MaxRecvDataSegmentLength":
                changes["max_xmit_data_segment_length"] = self._number(key, value)
                continue
            if key in ("HeaderDigest", "DataDigest"):
                if key not in self._offered:
                    replies.append((key, "None" if "None" in value.split(",") else "Reject"))
                    continue
                on = value == "CRC32C"
                if self.offer.digests and not on:
                    raise self._fail(self.step_name(), f"digests were required but the target "
                                     f"answered {key}={value}")
                changes["header_digest" if key == "HeaderDigest" else "data_digest"] = on
                continue
            if value in ("Irrelevant", "NotUnderstood", "Reject"):
                continue
            attr = _FIELDS.get(key)
            if attr is None:
                if key not in self._offered and key != "MaxConnections":
                    replies.append((key, "NotUnderstood"))
                continue
            if key in _BOOL_OR or key in _BOOL_AND:
                if value not in ("Yes", "No"):
                    raise self._fail(self.step_name(), f"target sent {key}={value!r}")
                result = value == "Yes"
                if key not in self._offered:
                    mine = _PREFER[key]
                    result = (result or mine) if key in _BOOL_OR else (result and mine)
                    replies.append((key, "Yes" if result else "No"))
                changes[attr] = result
                continue
            num = self._number(key, value)
            if key not in self._offered:
                replies.append((key, value))
            elif key in _NUM_MIN and num > int(self._offered[key]):
                raise self._fail(self.step_name(), f"target answered {key}={num}, above our "
                                 f"offer {self._offered[key]}")
            changes[attr] = num
        p = replace(self.params, **changes)
        if p.error_recovery_level != 0:
            raise self._fail(self.step_name(), f"target insists on ErrorRecoveryLevel="
                             f"{p.error_recovery_level}; we implement 0")
        self.params = p
        if transit and nsg == CSG_FULL_FEATURE:
            if replies:
                raise self._fail(self.step_name(), "target moved to Full Feature Phase while "
                                 f"still expecting answers to {[k for k, _ in replies]}")
            self._state = "done"
            return None
        self._offered.update(replies)
        return LoginStep(CSG_OPERATIONAL, CSG_FULL_FEATURE, True, replies)

    def _number(self, key: str, value: str) -> int:
        try:
            return int(value, 0)
        except ValueError:
            raise self._fail(self.step_name(), f"target sent {key}={value!r}, not a number") \
                from None
