"""Every lifecycle hook, declared and documented in one place.

Hooks are synchronous and cheap: they observe, they do not do the work (async work lives in
driver methods; pluggy cannot await on trio). They are always called with keyword arguments,
through `ahvbackup.core.plugins.Hooks`, never through `pm.hook` directly (pluggy matches
arguments by name, and cannot see keyword-only parameters, so specs use plain ones). A plugin
implements any subset with `@ahvbackup.core.hookimpl` and registers under the
`ahvbackup.hooks` entry-point group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .config import Config

PROJECT = "ahvbackup"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def ahvbackup_cli_commands() -> list[Any]:
    """Return extra `click` commands or groups to add to the `ahvbackup` command."""
    raise NotImplementedError


@hookspec
def ahvbackup_config_fields() -> dict[str, Any]:
    """Return extra configuration keys as ``{key: marshmallow.fields.Field}``.

    They are loaded and validated with the core keys, from files and plugin strings alike,
    and reach drivers through ``Config.extra``.
    """
    raise NotImplementedError


@hookspec
def ahvbackup_job_started(job_id: str, mode: str, level: str, config: Config) -> None:
    """A job began. `mode` is the configuration's mode; `level` full/incremental/differential;
    `config` the job's configuration (an exporter reads its own keys there)."""


@hookspec
def ahvbackup_job_finished(job_id: str, ok: bool, failed: list[str], seconds: float) -> None:
    """A job ended. `failed` names each failed VM (and disk, as ``vm/disk-N``)."""


@hookspec
def ahvbackup_vm_started(job_id: str, vm_uuid: str, vm_name: str) -> None:
    """Work on one VM began."""


@hookspec
def ahvbackup_vm_finished(
    job_id: str, vm_uuid: str, vm_name: str, ok: bool, bytes_stored: int, error: str | None
) -> None:
    """Work on one VM ended; `error` is the one-line reason when `ok` is false."""


@hookspec
def ahvbackup_disk_started(job_id: str, vm_name: str, disk: str, size: int) -> None:
    """Reading (or restoring) one disk began."""


@hookspec
def ahvbackup_disk_finished(
    job_id: str, vm_name: str, disk: str, ok: bool, bytes_read: int, bytes_stored: int
) -> None:
    """Reading (or restoring) one disk ended."""


@hookspec
def ahvbackup_snapshot_created(
    job_id: str, vm_uuid: str, snapshot_id: str, consistency: str
) -> None:
    """A snapshot or recovery point exists on the cluster; `consistency` crash or application."""


@hookspec
def ahvbackup_resource_created(kind: str, resource_id: str, owner: str) -> None:
    """A remote resource (snapshot, image, volume group, session) was recorded in the ledger."""


@hookspec
def ahvbackup_resource_released(kind: str, resource_id: str, owner: str, ok: bool) -> None:
    """A recorded remote resource was released (`ok` false: the release failed and stays owed)."""


@hookspec
def ahvbackup_metric(name: str, value: float, labels: dict[str, str]) -> None:
    """A measurement (bytes, seconds, counts) for exporters such as Prometheus.

    Emitted today (labels in brackets; exporters add `tenant`, the job's tenant from
    `Config.tenant`, to the job, VM and disk ones):
    ``disk_bytes_read``, ``disk_bytes_stored``, ``disk_zero_bytes``, ``disk_read_seconds``
    [mode, vm, disk, kind, outcome] per disk backed up;
    ``disk_chain_depth`` (backups a restore of the disk reads, 1 for a full) and
    ``disk_incremental_ratio`` (bytes stored over the bytes stored by its chain's full)
    [mode, vm, disk, kind] per disk backed up;
    ``vm_bytes_read``, ``vm_bytes_stored``, ``vm_seconds`` [mode, vm, outcome] per VM;
    ``vm_last_success_timestamp`` [vm] after each complete backup of a VM;
    ``disk_bytes_restored``, ``disk_bytes_verified``, ``disk_seconds``
    [mode, vm, disk, outcome] per disk restored or verified;
    ``job_seconds`` [mode, outcome] per job, before `job_finished`;
    ``resources_released``, ``resources_left`` [kind] per snapshot, image, volume group or
    session released or left for the next sweep;
    ``sweep_found`` [] per start-of-job sweep (records a killed job left), then
    ``sweep_released``, ``sweep_left`` [kind] per record it released or left.
    Drivers emit theirs through `Hooks.current()`:
    ``prism_requests`` [endpoint, method, status] per Prism answer (each attempt);
    ``prism_retries`` [endpoint, method, reason] per retried attempt;
    ``prism_errors`` [endpoint, method, status] per request that failed for good
    (`status` is the HTTP status, `connection` or `tls`);
    ``iscsi_logins`` [outcome] per iSCSI login (first or reconnect);
    ``iscsi_reconnects`` [] per session reconnected; ``iscsi_attach_failures`` [] per
    session that could not be set up (login, LUN or capacity).
    """
