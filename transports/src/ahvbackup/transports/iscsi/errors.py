"""Errors of the iSCSI initiator, all `DataPathError`s.

Each names the target and portal, and where it helps the step or the SCSI command; none ever
carries a CHAP secret (only user names, which are not secret).
"""

from __future__ import annotations

__all__ = [
    "IscsiAuthError",
    "IscsiCommandError",
    "IscsiConnectionError",
    "IscsiDigestError",
    "IscsiError",
    "IscsiLoginError",
    "IscsiProtocolError",
    "IscsiTargetNotOffered",
]

from ahvbackup.core.errors import DataPathError


class IscsiError(DataPathError):
    """Something on the iSCSI data path failed."""


class IscsiLoginError(IscsiError):
    """The target refused the login, or the login exchange went wrong.

    `status_class`/`status_detail` are the target's Login Response status (RFC 7143 §11.13.5)
    when the target gave one, else None.
    """

    def __init__(
        self,
        message: str,
        *,
        target: str,
        portal: str,
        step: str,
        status_class: int | None = None,
        status_detail: int | None = None,
    ) -> None:
        super().__init__(message)
        self.target = target
        self.portal = portal
        self.step = step
        self.status_class = status_class
        self.status_detail = status_detail


class IscsiAuthError(IscsiLoginError):
    """CHAP failed: the target refused our credentials, or the target's own (mutual) answer was
    wrong or missing."""


class IscsiConnectionError(IscsiError):
    """The TCP connection failed or was lost, and reconnecting did not help (or was disabled)."""


class IscsiProtocolError(IscsiError):
    """The target sent something RFC 7143 does not allow here; the connection is dropped."""


class IscsiDigestError(IscsiProtocolError):
    """A header or data CRC32C digest did not match: the PDU was corrupted in transit."""


class IscsiTargetNotOffered(IscsiError):
    """The portal does not offer the disk's target to us: discovery lists other targets (another
    iSCSI service on that address), or nothing answers there. Nothing of the disk was read, so
    `data_path=auto` reads it over REST instead."""


class IscsiCommandError(IscsiError):
    """A SCSI command ended with a status other than GOOD; carries the status and decoded sense."""

    def __init__(self, message: str, *, status: int, sense: object | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.sense = sense
