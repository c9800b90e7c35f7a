"""The DR channel's errors."""

from __future__ import annotations

__all__ = ["ChannelBroken", "Refused"]

import trio

from ahvbackup.core.errors import CredentialsRefused, TransportError


class Refused(CredentialsRefused):
    """The peer did not prove its credentials, or refused ours; nothing was exchanged."""


class ChannelBroken(TransportError, trio.BrokenResourceError):
    """An authenticated stream failed a check (tampered, replayed, reordered, truncated,
    oversized): it ends here and none of the bad bytes are returned. It is also a
    `trio.BrokenResourceError`, what any trio stream raises when it cannot go on."""
