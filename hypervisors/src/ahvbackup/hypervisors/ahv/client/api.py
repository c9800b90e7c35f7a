"""The one seam between the ahv driver and a Prism API version (docs/prism-client.md, "v3
and v4").

`AhvSession` talks only to a `PrismApi`. `V3Api` (ahv/api_v3.py) speaks v3 and the PE
v3/v2.0 backup calls; `V4Api` (ahv/api_v4.py) speaks vmm, clustermgmt, dataprotection,
volumes and prism v4. Both are built by composition over the same transports (`Prism`: PC and
lazily made PE clients); neither subclasses the other. Which one a job uses is decided at
connect (`prism_api_version`, ahv/api_pick.py).

Every resource an implementation creates goes on the ledger with `api=<version>` in its
scope (and v4 snapshot ids and handles start with ``v4:``), so a later run releases it through
the API that made it, whichever the later run speaks.
"""

from __future__ import annotations

__all__ = ["V4_PREFIX", "PrismApi", "api_of_record"]

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from ahvbackup.core.drivers import (
    ClusterPlace,
    DiskStage,
    HttpSource,
    HttpUpload,
    IscsiSource,
    Network,
    NewDisk,
    NewVm,
)
from ahvbackup.core.ledger import Record, ReleaseStack
from ahvbackup.core.model import DiskSnapshot, Region, VmInfo, VmSnapshot

from .models import Cluster

#: how v4 recovery-point ids and disk handles start (v3 ones are uuids and `/` paths)
V4_PREFIX = "v4:"


def api_of_record(record: Record) -> str:
    """The API that created a ledger record: its `api` scope, a ``v4:`` id, else v3 (records
    written before v4 existed)."""
    api = record.scope.get("api")
    if isinstance(api, str) and api:
        return api
    return "v4" if record.resource_id.startswith(V4_PREFIX) else "v3"


class PrismApi(Protocol):
    """What varies between Prism v3 and v4, in the engine's own types."""

    #: "v3" or "v4"
    version: str

    async def clusters(self) -> dict[str, Cluster]:
        """The AOS clusters (Prism Central's own entry left out), by uuid."""
        ...

    async def list_vms(self) -> list[VmInfo]:
        ...

    async def snapshot_vm(self, vm: VmInfo, *, application_consistent: bool, name: str,
                          stack: ReleaseStack) -> VmSnapshot:
        """v3: a PE vm_snapshot; v4: a recovery point (crash- or application-consistent)."""
        ...

    def regions(self, disk: DiskSnapshot, *, reference: str | None = None,
                ) -> AsyncIterator[Region]:
        """v3: PE changed_regions; v4: discover-cluster, then PE compute-changed-regions."""
        ...

    async def stage_iscsi(self, disks: Sequence[DiskSnapshot], *, initiator_iqn: str,
                          portal: tuple[str, int], stack: ReleaseStack,
                          ) -> tuple[IscsiSource, ...]:
        """One VG for disks of one snapshot, disk (and LUN) i from `disks[i]`; v3: a v2.0 VG
        cloned from the snapshot files; v4: a VG whose disks are the disk recovery points.
        Either way attached to `initiator_iqn`."""
        ...

    async def stage_http(self, disk: DiskSnapshot, *, stack: ReleaseStack) -> HttpSource:
        ...

    async def release(self, record: Record) -> None:
        ...

    async def restore_places(self) -> list[ClusterPlace]:
        ...

    async def list_networks(self) -> list[Network]:
        ...

    async def stage_empty_iscsi(
        self, *, cluster_uuid: str, container_uuid: str, size: int, name: str,
        initiator_iqn: str, portal: tuple[str, int], stack: ReleaseStack,
    ) -> tuple[IscsiSource, DiskStage]:
        ...

    async def stage_upload(self, *, cluster_uuid: str, size: int, name: str,
                           stack: ReleaseStack) -> tuple[HttpUpload, DiskStage]:
        ...

    async def create_vm(self, vm: NewVm, *, stack: ReleaseStack) -> str:
        ...

    async def attach_disks(self, vm_id: str, disks: Sequence[NewDisk]) -> None:
        ...

    async def power_on(self, vm_id: str) -> None:
        ...
