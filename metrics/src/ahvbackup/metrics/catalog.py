"""Every metric we export: the core's event name, the Prometheus name, type, labels, help.

The one table of metrics: the registry, docs/metrics.md (a test keeps them equal) and the
example alert rules follow it. Job, VM and disk metrics carry `tenant` (the job's tenant,
empty without one); a label an event does not carry is exported empty.
"""

from __future__ import annotations

__all__ = ["BY_EVENT", "CATALOG", "Spec"]

from dataclasses import dataclass
from typing import Literal

_DISK = ("tenant", "mode", "vm", "disk", "kind", "outcome")
_CHAIN = ("tenant", "mode", "vm", "disk", "kind")
_RESTORED = ("tenant", "mode", "vm", "disk", "outcome")
_VM = ("tenant", "mode", "vm", "outcome")
_PRISM = ("endpoint", "method", "status")


@dataclass(frozen=True)
class Spec:
    """One exported metric. A gauge is set to the event's value (the last job's, per series);
    a counter adds it up."""

    event: str
    name: str
    type: Literal["gauge", "counter"]
    labels: tuple[str, ...]
    help: str

    @property
    def exposed(self) -> str:
        """The name in the text format (prometheus_client adds ``_total`` to counters)."""
        return f"{self.name}_total" if self.type == "counter" else self.name


def _g(event: str, name: str, labels: tuple[str, ...], help: str) -> Spec:
    return Spec(event, f"ahvbackup_{name}", "gauge", labels, help)


def _c(event: str, name: str, labels: tuple[str, ...], help: str) -> Spec:
    return Spec(event, f"ahvbackup_{name}", "counter", labels, help)


CATALOG: tuple[Spec, ...] = (
    # per disk backed up
    _g("disk_bytes_read", "disk_read_bytes", _DISK, "Data bytes read from the disk."),
    _g("disk_bytes_stored", "disk_stored_bytes", _DISK, "Bytes the disk's stream stored."),
    _g("disk_zero_bytes", "disk_zero_bytes", _DISK, "Bytes of the disk skipped as zero."),
    _g("disk_read_seconds", "disk_read_seconds", _DISK, "Seconds spent reading the disk."),
    _g("disk_chain_depth", "disk_chain_depth", _CHAIN,
       "Backups a restore of this disk reads (1 for a full)."),
    _g("disk_incremental_ratio", "disk_incremental_ratio", _CHAIN,
       "Bytes stored by this backup over the bytes stored by its chain's full."),
    # per VM
    _g("vm_bytes_read", "vm_read_bytes", _VM, "Data bytes read from the VM's disks."),
    _g("vm_bytes_stored", "vm_stored_bytes", _VM, "Bytes stored for the VM."),
    _g("vm_seconds", "vm_duration_seconds", _VM, "Seconds the VM's backup took."),
    _g("vm_last_success_timestamp", "vm_last_success_timestamp_seconds", ("tenant", "vm"),
       "Unix time of the VM's last complete backup."),
    # per disk restored or verified
    _g("disk_bytes_restored", "disk_restored_bytes", _RESTORED, "Data bytes restored."),
    _g("disk_bytes_verified", "disk_verified_bytes", _RESTORED, "Data bytes verified."),
    _g("disk_seconds", "disk_duration_seconds", _RESTORED,
       "Seconds the disk's restore or verify took."),
    # per job
    _g("job_seconds", "job_duration_seconds", ("tenant", "mode", "outcome"),
       "Seconds the job took."),
    # the cleanup ledger
    _c("resources_released", "resources_released", ("kind",),
       "Remote resources (snapshots, images, volume groups, sessions) released."),
    _c("resources_left", "resources_left", ("kind",),
       "Remote resources that could not be released, left for the next sweep."),
    _g("sweep_found", "sweep_found_resources", (),
       "Resources a killed job left behind, found by the start-of-job sweep."),
    _c("sweep_released", "sweep_released", ("kind",), "Leftover resources the sweep released."),
    _c("sweep_left", "sweep_left", ("kind",), "Leftover resources the sweep could not release."),
    # Prism
    _c("prism_requests", "prism_requests", _PRISM, "Prism API answers, by endpoint and status."),
    _c("prism_retries", "prism_retries", ("endpoint", "method", "reason"),
       "Prism API attempts retried, by what went wrong."),
    _c("prism_errors", "prism_errors", _PRISM,
       "Prism API requests that failed for good (status: HTTP status, connection or tls)."),
    # iSCSI
    _c("iscsi_logins", "iscsi_logins", ("outcome",), "iSCSI logins, first or reconnect."),
    _c("iscsi_reconnects", "iscsi_reconnects", (), "iSCSI sessions reconnected after a loss."),
    _c("iscsi_attach_failures", "iscsi_attach_failures", (),
       "iSCSI sessions that could not be set up (login, LUN or capacity)."),
)

BY_EVENT: dict[str, Spec] = {s.event: s for s in CATALOG}
