"""The loaded configuration: one frozen dataclass, one attribute per key.

Built only by `ahvbackup.core.config.load_config`, which fills every attribute (defaults
included), so there are no defaults here to drift from the key table.
"""

from __future__ import annotations

__all__ = ["SECRET_HINTS", "Config", "HostPort", "looks_secret"]

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from ..secret import Secret

if TYPE_CHECKING:
    from .settings import PluginSettings

S = TypeVar("S", bound="PluginSettings")

#: words that mark a key as holding a secret even when its field is not a SecretField
SECRET_HINTS = ("password", "passwd", "secret", "token", "psk", "private_key")

MASK = "********"


def looks_secret(key: str) -> bool:
    """True when a key's name says it holds a secret (used for plugin-contributed keys)."""
    k = key.lower()
    return any(h in k for h in SECRET_HINTS)


class HostPort(NamedTuple):
    """A host name or address and an optional TCP port (`prism_central = pc.example.com:9440`)."""

    host: str
    port: int | None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.port is not None else host


@dataclass(frozen=True, kw_only=True, repr=False)
class Config:
    """Every configuration key, typed. Names and meanings follow the whitepaper's section 7.

    `sources` says where each value came from (``"ahvbackup.conf:12"``, ``"plugin string"``,
    ``"command line"``, ``"default"``); `warnings` are printed by every job that uses this
    configuration; `extra` holds keys contributed by plugins and drivers.
    """

    # connection
    prism_central: HostPort | None
    prism_port: int
    prism_api_version: str
    user: str | None
    password: Secret | None
    passfile: Path | None
    prism_insecure: bool
    cluster: str | None
    prism_ca_cert: Path | None
    # backup selection
    vm: tuple[str, ...]
    exclude: tuple[str, ...]
    project: tuple[str, ...]
    tenant: str | None
    application_consistent: str
    # data path
    data_path: str
    dsip: str | None
    iscsi_initiator: str
    concurrent_vms: int
    concurrent_disks: int
    chunk_size_mib: int
    prism_rate_rpm: int
    # restore
    mode: str
    where: Path | None
    restore_vm_name: str | None
    target_cluster: str | None
    target_container: str | None
    network_map: tuple[tuple[str, str], ...]
    power_on: bool
    restore_disks_only: tuple[str, ...]
    vcpu: int | None
    memory_mib: int | None
    cross_restore: bool
    # DR replication
    dr_host: str | None
    dr_port: int
    dr_auth_token: Secret | None
    dr_auth_cert: Path | None
    dr_auth_key: Path | None
    dr_ca_cert: Path | None
    dr_restore_points: int
    max_bandwidth_mbps: int
    push_interval: int
    push_apply_remote: bool
    # logging and scratch
    verbose: int
    debug_log: Path | None
    log_format: str
    working_dir: Path
    state_dir: Path
    job_cleanup_on_abort: bool
    # ours
    hypervisor: str
    sink: str
    repository: Path
    target: str
    level: str
    verify_unchanged_sample: float
    keep_fulls: int
    keep_days: int
    compression: str
    encryption_key: Path | None
    encryption_old_keys: tuple[str, ...]
    metrics_textfile: Path | None
    metrics_pushgateway: HostPort | None
    metrics_port: int | None
    # bookkeeping
    extra: Mapping[str, object]
    sources: Mapping[str, str]
    warnings: tuple[str, ...]

    @classmethod
    def key_names(cls) -> tuple[str, ...]:
        """The configuration keys (every attribute except extra, sources and warnings)."""
        return tuple(f.name for f in fields(cls) if f.name not in _BOOKKEEPING)

    def settings(self, keys: type[S]) -> S:
        """A plugin's own keys, typed (see `ahvbackup.core.config.settings`): the values
        loaded for them, defaults included."""
        names = [f.name for f in fields(keys)]
        missing = [n for n in names if n not in self.extra]
        if missing:
            raise KeyError(f"{keys.__name__}: {', '.join(missing)} not in this configuration "
                           "(is the plugin's config_schema or ahvbackup_config_fields set?)")
        values: dict[str, Any] = {n: self.extra[n] for n in names}
        return keys(**values)

    @property
    def network_map_dict(self) -> dict[str, str]:
        """`network_map` as a mapping from source subnet to destination subnet."""
        return dict(self.network_map)

    def redacted(self) -> dict[str, object]:
        """Every key with a display-safe, JSON-friendly value; secrets are masked."""
        out: dict[str, object] = {k: _display(k, getattr(self, k)) for k in self.key_names()}
        for k, v in self.extra.items():
            out[k] = _display(k, v)
        return out

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"Config({body})"


_BOOKKEEPING = frozenset({"extra", "sources", "warnings"})


def _display(key: str, value: object) -> object:
    if isinstance(value, Secret):
        return MASK if value else ""
    if value is not None and looks_secret(key):
        return MASK
    if isinstance(value, HostPort | Path):
        return str(value)
    if isinstance(value, tuple):
        return [_display(key, v) for v in value]
    return value
