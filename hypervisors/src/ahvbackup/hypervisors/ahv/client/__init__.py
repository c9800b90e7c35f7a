"""The Prism client: `connect_prism` for PC plus lazily made PE clients, `PrismClient` (v3) and
`PrismV4` (v4) on one endpoint's transport, the models their methods return, and `PrismApi`,
the seam the ahv driver talks to. See docs/prism-client.md."""

from __future__ import annotations

from .api import PrismApi
from .connect import Prism, connect_prism
from .detect import V4Discovery, discover_v4
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
from .v4 import PrismV4

__all__ = [
    "ChangedRegions",
    "Cluster",
    "CreateResult",
    "IdempotenceIds",
    "Image",
    "NgtInfo",
    "Prism",
    "PrismApi",
    "PrismAuth",
    "PrismClient",
    "PrismConnectionError",
    "PrismHttp",
    "PrismTaskError",
    "PrismTimeoutError",
    "PrismTlsError",
    "PrismV4",
    "Region",
    "SnapshotFile",
    "Task",
    "TokenBucket",
    "User",
    "V4Discovery",
    "Vm",
    "VmDisk",
    "VmNic",
    "VmSnapshot",
    "connect_prism",
    "discover_v4",
]
