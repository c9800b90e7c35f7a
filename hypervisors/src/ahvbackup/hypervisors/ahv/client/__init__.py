"""The Prism v3 client: `connect_prism` for PC plus lazily made PE clients, `PrismClient` for
one endpoint, and the models its methods return. See docs/prism-client.md."""

from __future__ import annotations

from .connect import Prism, connect_prism
from .errors import PrismConnectionError, PrismTaskError, PrismTimeoutError, PrismTlsError
from .http import PrismAuth, PrismHttp
from .models import (
    ChangedRegions,
    Cluster,
    CreateResult,
    IdempotenceIds,
    Image,
    NgtInfo,
    Region,
    SnapshotFile,
    Task,
    User,
    Vm,
    VmDisk,
    VmNic,
    VmSnapshot,
)
from .ratelimit import TokenBucket
from .v3 import PrismClient

__all__ = [
    "ChangedRegions",
    "Cluster",
    "CreateResult",
    "IdempotenceIds",
    "Image",
    "NgtInfo",
    "Prism",
    "PrismAuth",
    "PrismClient",
    "PrismConnectionError",
    "PrismHttp",
    "PrismTaskError",
    "PrismTimeoutError",
    "PrismTlsError",
    "Region",
    "SnapshotFile",
    "Task",
    "TokenBucket",
    "User",
    "Vm",
    "VmDisk",
    "VmNic",
    "VmSnapshot",
    "connect_prism",
]
