"""What Prism v4 answers, as frozen dataclasses (the fields ahvbackup relies on).

Each `from_api` reads the `data` of a v4 envelope (docs/nutanix-api.md 1.4), ignores fields it
does not know and refuses an answer missing one it needs, naming the field and the endpoint.
"""

from __future__ import annotations

__all__ = ["ClusterAccess", "DiskRp", "RecoveryPoint", "V4Task", "VmRp", "cluster_from_v4",
           "ip_of"]

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ahvbackup.core.errors import ApiServerError
from ahvbackup.core.secret import Secret

from .models import Cluster


def _bad(endpoint: str, what: str) -> ApiServerError:
    return ApiServerError(f"Prism v4 answer to {endpoint} does not parse: {what}",
                          endpoint=endpoint)


def _str(data: Mapping[str, Any], key: str, endpoint: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(endpoint, f"required field {key} is missing")
    return value


def ip_of(value: Any) -> str | None:
    """The address of a v4 `IPAddress` (`{"ipv4": {"value": ...}}`, or ipv6)."""
    if not isinstance(value, Mapping):
        return None
    for family in ("ipv4", "ipv6"):
        got = value.get(family)
        if isinstance(got, Mapping) and isinstance(got.get("value"), str):
            return str(got["value"])
    return None


def cluster_from_v4(data: Any, *, endpoint: str) -> Cluster:
    """A clustermgmt `Cluster` as the client's `Cluster` model (DSIP: `externalDataServiceIp`)."""
    if not isinstance(data, Mapping):
        raise _bad(endpoint, "a cluster is not an object")
    config = data.get("config") or {}
    network = data.get("network") or {}
    functions = tuple(str(f) for f in config.get("clusterFunction") or [])
    return Cluster(
        uuid=_str(data, "extId", endpoint), name=str(data.get("name") or ""),
        external_ip=ip_of(network.get("externalAddress")),
        dsip=ip_of(network.get("externalDataServiceIp")),
        is_prism_central="PRISM_CENTRAL" in functions, services=functions,
        software_version=(config.get("buildInfo") or {}).get("version"),
    )


@dataclass(frozen=True)
class V4Task:
    """A prism v4 task: `status` QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED, ..."""

    ext_id: str
    status: str
    operation: str
    entities: tuple[tuple[str, str], ...]  # (rel, extId)
    error: str

    FINISHED = frozenset({"SUCCEEDED", "FAILED", "CANCELED"})

    @property
    def done(self) -> bool:
        return self.status in self.FINISHED

    def entity(self, rel: str) -> str | None:
        return next((e for r, e in self.entities if r == rel), None)

    @classmethod
    def from_api(cls, data: Any, *, endpoint: str) -> V4Task:
        if not isinstance(data, Mapping):
            raise _bad(endpoint, "a task is not an object")
        errors = "; ".join(str(m.get("message")) for m in data.get("errorMessages") or []
                           if isinstance(m, Mapping) and m.get("message"))
        return cls(
            ext_id=_str(data, "extId", endpoint), status=_str(data, "status", endpoint),
            operation=str(data.get("operation") or "task"),
            entities=tuple((str(e.get("rel")), str(e.get("extId")))
                           for e in data.get("entitiesAffected") or []
                           if isinstance(e, Mapping) and e.get("extId")),
            error=errors or str(data.get("legacyErrorMessage") or ""),
        )


@dataclass(frozen=True)
class DiskRp:
    ext_id: str  # diskRecoveryPointExtId
    disk_ext_id: str  # the VM disk (vmdisk) it captured


@dataclass(frozen=True)
class VmRp:
    ext_id: str
    vm_ext_id: str
    disks: tuple[DiskRp, ...]


@dataclass(frozen=True)
class RecoveryPoint:
    ext_id: str
    name: str
    recovery_point_type: str
    vms: tuple[VmRp, ...]

    @classmethod
    def from_api(cls, data: Any, *, endpoint: str) -> RecoveryPoint:
        if not isinstance(data, Mapping):
            raise _bad(endpoint, "a recovery point is not an object")
        vms = []
        for v in data.get("vmRecoveryPoints") or []:
            disks = tuple(DiskRp(_str(d, "diskRecoveryPointExtId", endpoint),
                                 _str(d, "diskExtId", endpoint))
                          for d in v.get("diskRecoveryPoints") or [])
            vms.append(VmRp(_str(v, "extId", endpoint), _str(v, "vmExtId", endpoint), disks))
        return cls(ext_id=_str(data, "extId", endpoint), name=str(data.get("name") or ""),
                   recovery_point_type=str(data.get("recoveryPointType") or ""),
                   vms=tuple(vms))


@dataclass(frozen=True)
class ClusterAccess:
    """What `$actions/discover-cluster` answers: the PE address and the JWT for it."""

    cluster_ip: str
    jwt: Secret = field(default_factory=lambda: Secret(""), repr=False)  # a credential

    @classmethod
    def from_api(cls, data: Any, *, endpoint: str) -> ClusterAccess:
        if not isinstance(data, Mapping):
            raise _bad(endpoint, "ClusterInfo is not an object")
        ip = ip_of(data.get("clusterIp"))
        if not ip:
            raise _bad(endpoint, "required field clusterIp is missing")
        return cls(cluster_ip=ip, jwt=Secret(_str(data, "jwtToken", endpoint)))
