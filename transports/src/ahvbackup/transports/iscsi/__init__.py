"""A userspace iSCSI initiator on trio: no kernel modules, no root, no iscsiadm state.

    async with IscsiSession.connect(portal=("10.0.0.5", 3260), target_iqn=iqn,
                                    initiator_iqn=me, chap=ChapCredentials(user, Secret(pw))) as s:
        cap = await s.read_capacity()
        await s.read_into(0, memoryview(buf))

`discover(portal, initiator_iqn=...)` lists the targets a portal offers (SendTargets).
"""

from __future__ import annotations

__all__ = [
    "Capacity",
    "ChapCredentials",
    "DiscoveredTarget",
    "Inquiry",
    "IscsiAuthError",
    "IscsiCommandError",
    "IscsiConnectionError",
    "IscsiDigestError",
    "IscsiError",
    "IscsiLoginError",
    "IscsiProtocolError",
    "IscsiSession",
    "IscsiTargetNotOffered",
    "Sense",
    "SessionParams",
    "discover",
]

from .errors import (
    IscsiAuthError,
    IscsiCommandError,
    IscsiConnectionError,
    IscsiDigestError,
    IscsiError,
    IscsiLoginError,
    IscsiProtocolError,
    IscsiTargetNotOffered,
)
from .initiator import DiscoveredTarget, IscsiSession, discover
from .login import ChapCredentials, SessionParams
from .scsi import Capacity, Inquiry, Sense
