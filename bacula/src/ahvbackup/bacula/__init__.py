"""Bacula integration: the metaplugin backend (`ahvbackup-bacula-backend`) and its protocol.

Kept light on purpose: the backend answers the file daemon's ``Hello`` before it imports trio
or the configuration code, so names are loaded on first use.
"""

from __future__ import annotations

__all__ = [
    "BackendContext",
    "BackendHandlers",
    "FileEmitter",
    "JobInfo",
    "JobMessages",
    "PacketChannel",
    "ProtocolError",
    "RestoreFile",
    "Session",
]

import importlib
from typing import Any

_WHERE = {
    "BackendContext": "handlers",
    "BackendHandlers": "handlers",
    "FileEmitter": "handlers",
    "JobInfo": "handlers",
    "JobMessages": "handlers",
    "RestoreFile": "handlers",
    "PacketChannel": "channel",
    "ProtocolError": "protocol",
    "Session": "session",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
