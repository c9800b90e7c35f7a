"""Tenants: one backup host serving several customers (Prism Central projects) keeps each
one's state and backups apart.

A job runs for at most one tenant (`tenant=`, by default the project when `project=` names
exactly one). Its `state_dir` becomes ``<state_dir>/tenants/<tenant>`` and its repository
``<repository>/tenants/<tenant>``, so state, ledger, bookkeeping and backups of one tenant
are never read or written by another's jobs. A tenant's repository folder holds a
``.tenant`` marker naming it: a repository path inside another tenant's folder (given
directly, or as ``repository=`` of a job without `tenant=`) is refused by `check_repository`,
whatever path is given.
"""

from __future__ import annotations

__all__ = ["MARKER", "TENANTS", "TenantRefused", "check_repository", "mark_repository",
           "tenant_config"]

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config.model import Config

#: the folder of tenants' namespaces, in state_dir and in the repository
TENANTS = "tenants"
#: the file in a tenant's repository folder that names its tenant
MARKER = ".tenant"


class TenantRefused(ConfigError):
    """A job of one tenant was pointed at a place that belongs to another."""


def tenant_config(config: Config) -> Config:
    """`config` with its tenant resolved and state_dir and repository namespaced by it."""
    tenant = config.tenant
    if tenant is None and len(config.project) == 1:
        tenant = config.project[0]
        if not _plain(tenant):
            raise ConfigError(f"tenant: project {tenant!r} is not usable as a tenant name; "
                              "set tenant= (letters, digits, '.', '_' or '-')")
    if tenant is None:
        return config
    return dataclasses.replace(
        config, tenant=tenant,
        state_dir=Path(config.state_dir) / TENANTS / tenant,
        repository=Path(config.repository) / TENANTS / tenant,
        sources={**config.sources, **({} if config.tenant else {"tenant": "project"})},
    )


def _plain(name: str) -> bool:
    return bool(name) and name[0].isalnum() and len(name) <= 64 and all(
        c.isascii() and (c.isalnum() or c in "._-") for c in name)


def _marked(folder: Path) -> str | None:
    try:
        return (folder / MARKER).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        raise ConfigError(f"repository {folder}: cannot read its {MARKER} ({err.strerror})"
                          ) from None


def check_repository(root: Path, tenant: str | None) -> None:
    """Refuse `root` unless it is this tenant's own (or, without a tenant, no tenant's):
    neither it nor a folder above it may be marked for another tenant. The refusal names
    only this job's tenant, never the other one."""
    for folder in (root, *root.parents):
        owner = _marked(folder)
        if owner is None:
            continue
        if folder == root and owner == tenant:
            continue
        who = f"tenant {tenant!r}" if tenant else "a job without tenant="
        raise TenantRefused(f"repository {root}: inside another tenant's repository; refused "
                            f"for {who} (a tenant reads only <repository>/{TENANTS}/<tenant>)")


def mark_repository(root: Path, tenant: str) -> None:
    """Name the tenant in its repository folder (once, when the folder is new)."""
    marker = root / MARKER
    if not marker.exists():
        marker.write_text(tenant + "\n")
        marker.chmod(0o600)
