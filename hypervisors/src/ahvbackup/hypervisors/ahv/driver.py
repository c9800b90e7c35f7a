"""The `ahv` hypervisor driver: the job's view of a Nutanix cluster through Prism.

`AhvSession` is thin: every call goes to the `PrismApi` (client/api.py) chosen at connect by
`prism_api_version` (api_pick.py): `V3Api` (PE backup snapshots, changed regions, v2.0
volume groups, images) or `V4Api` (recovery points, compute-changed-regions, volumes VGs from
disk recovery points). Releases go to the API each ledger record names.
"""

from __future__ import annotations

__all__ = ["AhvHypervisor", "AhvSession"]

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import marshmallow

from ahvbackup.core import log as msgs
from ahvbackup.core.config.fields import Int
from ahvbackup.core.drivers import (
    ClusterPlace,
    DiskStage,
    HttpSource,
    HttpUpload,
    Hypervisor,
    HypervisorSession,
    IscsiSource,
    Network,
    NewDisk,
    NewVm,
    VmShape,
)
from ahvbackup.core.errors import ConfigError, HypervisorError
from ahvbackup.core.health import HealthCheck
from ahvbackup.core.ledger import Record, ReleaseStack
from ahvbackup.core.model import DiskSnapshot, Region, VmInfo, VmSnapshot

from .api_pick import ApiChoice, pick_api
from .api_v4 import V4Api
from .client import Prism, connect_prism
from .client.api import PrismApi, api_of_record
from .client.detect import discover_v4
from .client.v4 import PrismV4
from .shapes import vm_shape

log = logging.getLogger("ahvbackup.ahv")

#: the iSCSI port of a cluster's data services address
ISCSI_PORT = 3260


class AhvKeys(marshmallow.Schema):
    """Keys the ahv driver adds: `iscsi_port`, the port of the DSIP's iSCSI portal (3260 on a
    real cluster; a simulator under test may serve another)."""

    iscsi_port = Int(minimum=1, maximum=65535, load_default=ISCSI_PORT)


def iscsi_port_of(config: Any) -> int:
    extra = getattr(config, "extra", None) or {}
    return int(extra.get("iscsi_port", ISCSI_PORT))


class AhvSession(HypervisorSession):
    """The job's view of Prism, through the `PrismApi` chosen at connect (`api`). A ledger
    record is released through the API that made it (`api_for`), so a v4 resource left by an
    earlier run is released through v4 even by a v3 session, and the other way round."""

    def __init__(self, prism: Prism, config: Any, choice: ApiChoice) -> None:
        self.prism = prism
        self.config = config
        self.api: PrismApi = choice.api
        self.reason = choice.reason
        self._v3 = choice.v3
        self._v4: PrismApi | None = choice.api if choice.api.version == "v4" else None
        self._snapshot_clusters: dict[str, str] = {}

    async def discover(self) -> str:
        log.info("Prism API %s (%s)", self.api.version, self.reason)
        clusters = await self.api.clusters()
        names = ",".join(sorted(c.name for c in clusters.values())) or "none"
        return msgs.prism_discovery(self.prism.pc.host, names, self.api.version)

    async def api_for(self, record: Record) -> PrismApi:
        """The API that made `record` (v4 made on demand for a v3 session)."""
        if api_of_record(record) != "v4":
            return self._v3
        if self._v4 is None:
            found = await discover_v4(self.prism.pc)
            if not found.usable:
                raise HypervisorError(f"{record.describe()} was made through Prism v4, which "
                                      f"cannot be reached now: {found.reason}")
            self._v4 = V4Api(self.prism, PrismV4(self.prism.pc, found.versions), self._v3)
        return self._v4

    async def list_vms(self) -> list[VmInfo]:
        return await self.api.list_vms()

    async def snapshot_vm(
        self, vm: VmInfo, *, application_consistent: bool, name: str, stack: ReleaseStack
    ) -> VmSnapshot:
        snap = await self.api.snapshot_vm(vm, application_consistent=application_consistent,
                                          name=name, stack=stack)
        self._snapshot_clusters[snap.id] = vm.cluster_uuid
        return snap

    def regions(
        self, disk: DiskSnapshot, *, reference: str | None = None
    ) -> AsyncIterator[Region]:
        return self.api.regions(disk, reference=reference)

    async def stage_http(self, disk: DiskSnapshot, *, stack: ReleaseStack) -> HttpSource:
        return await self.api.stage_http(disk, stack=stack)

    async def iscsi_portal(self, cluster_uuid: str | None = None) -> tuple[str, int] | None:
        """The `dsip` setting, else the cluster's data services IP (the first cluster's when
        none is named), on `iscsi_port` (3260)."""
        port = iscsi_port_of(self.config)
        if self.config.dsip:
            return (str(self.config.dsip), port)
        clusters = await self.api.clusters()
        cluster = clusters.get(cluster_uuid or "") or next(iter(clusters.values()), None)
        if cluster is None or not cluster.dsip:
            return None
        return (cluster.dsip, port)

    async def _portal(self, cluster_uuid: str, what: str) -> tuple[str, int]:
        portal = await self.iscsi_portal(cluster_uuid)
        if portal is None:
            raise HypervisorError(f"disk {what}: its cluster has no data services IP; set "
                                  "dsip= or use data_path=rest")
        return portal

    async def stage_iscsi(
        self, disk: DiskSnapshot, *, initiator_iqn: str, stack: ReleaseStack
    ) -> IscsiSource:
        (source,) = await self.stage_iscsi_vm([disk], initiator_iqn=initiator_iqn, stack=stack)
        return source

    async def stage_iscsi_vm(
        self, disks: Sequence[DiskSnapshot], *, initiator_iqn: str, stack: ReleaseStack
    ) -> tuple[IscsiSource, ...]:
        """One volume group for all `disks` (of one snapshot), a LUN each."""
        if not disks:
            return ()
        vm_cluster = self._snapshot_cluster(disks[0])
        portal = await self._portal(vm_cluster, disks[0].disk.label)
        return await self.api.stage_iscsi(disks, initiator_iqn=initiator_iqn, portal=portal,
                                          stack=stack)

    def _snapshot_cluster(self, disk: DiskSnapshot) -> str:
        cluster = self._snapshot_clusters.get(disk.snapshot_id)
        if cluster is None:
            raise HypervisorError(f"snapshot {disk.snapshot_id} was not taken in this session")
        return cluster

    # -- restore side ----------------------------------------------------------------------

    async def restore_places(self) -> list[ClusterPlace]:
        return await self.api.restore_places()

    async def list_networks(self) -> list[Network]:
        return await self.api.list_networks()

    async def stage_empty_iscsi(
        self, *, cluster_uuid: str, container_uuid: str, size: int, name: str,
        initiator_iqn: str, stack: ReleaseStack,
    ) -> tuple[IscsiSource, DiskStage]:
        portal = await self._portal(cluster_uuid, name)
        return await self.api.stage_empty_iscsi(
            cluster_uuid=cluster_uuid, container_uuid=container_uuid, size=size, name=name,
            initiator_iqn=initiator_iqn, portal=portal, stack=stack)

    async def stage_upload(
        self, *, cluster_uuid: str, size: int, name: str, stack: ReleaseStack,
    ) -> tuple[HttpUpload, DiskStage]:
        return await self.api.stage_upload(cluster_uuid=cluster_uuid, size=size, name=name,
                                           stack=stack)

    async def create_vm(self, vm: NewVm, *, stack: ReleaseStack) -> str:
        return await self.api.create_vm(vm, stack=stack)

    async def attach_disks(self, vm_id: str, disks: Sequence[NewDisk]) -> None:
        await self.api.attach_disks(vm_id, disks)

    async def power_on(self, vm_id: str) -> None:
        await self.api.power_on(vm_id)

    async def release(self, record: Record) -> None:
        await (await self.api_for(record)).release(record)


class AhvHypervisor(Hypervisor):
    name = "ahv"
    summary = "Nutanix AHV through Prism Central and Prism Element (v3 or v4)"
    config_schema = AhvKeys

    def vm_shape(self, config: Mapping[str, Any]) -> VmShape | None:
        """From the VM as Prism gave it at backup time, v3 or v4 (`shapes`)."""
        return vm_shape(config) if config else None

    def _pc_url(self) -> str:
        cfg = self.config
        if cfg.prism_central is None:
            raise ConfigError("prism_central: required to reach Prism (host[:port])")
        hp = cfg.prism_central
        host = f"[{hp.host}]" if ":" in hp.host else hp.host
        return f"https://{host}:{hp.port or cfg.prism_port}"

    def _verify(self) -> bool | str:
        cfg = self.config
        if cfg.prism_insecure:
            return False
        return str(cfg.prism_ca_cert) if cfg.prism_ca_cert else True

    async def health_checks(self, *, timeout: float = 10.0) -> list[HealthCheck]:
        """TLS, authentication, clusters, RBAC, DSIP and iSCSI (`.health`)."""
        from .health import run_health_checks

        return await run_health_checks(self, timeout=timeout)

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[AhvSession]:
        cfg = self.config
        if not cfg.user or not cfg.password:
            raise ConfigError("user and password (or passfile): required to reach Prism")
        async with connect_prism(
            self._pc_url(), user=cfg.user, password=cfg.password, verify=self._verify(),
            rate_rpm=cfg.prism_rate_rpm,
        ) as prism:
            choice = await pick_api(prism, cfg)
            yield AhvSession(prism, cfg, choice)
