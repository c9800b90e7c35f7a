"""Keys of the reference this version accepts by name but does not do yet.

An operator migrating a FileSet believes every key in it works. So a key whose feature is
not built is refused whenever a source sets it, with one line naming the key, what it is
for, and that this version does not do it yet; it never loads silently. Each entry names the
issue that will make it work; when that issue lands, its entries leave this table.
"""

from __future__ import annotations

__all__ = ["NEEDS_PLUGIN", "NOT_YET", "NOT_YET_DRIVERS", "NotYet", "plugin_refusals",
           "refusals"]

from collections.abc import Collection
from dataclasses import dataclass

from .model import Config


@dataclass(frozen=True)
class NotYet:
    """A key refused when set; with `values`, only those values are refused."""

    key: str
    purpose: str
    issue: int
    values: tuple[str, ...] = ()

    def refuses(self, value: object) -> bool:
        return not self.values or str(value) in self.values


def _dr(key: str, purpose: str) -> NotYet:
    return NotYet(key, f"{purpose} (DR replication)", 12)


NOT_YET: tuple[NotYet, ...] = (
    NotYet("cross_restore", "restoring other hypervisors' images through Bacula (restore the "
           "file, then `ahvbackup import` it)", 10),
    NotYet("push_apply_remote", "keeping DR deltas unapplied until a failover "
           "(push_apply_remote=no; DR replication)", 12, values=("False",)),
    _dr("metrics_port", "the DR receiver's /metrics port"),
)

#: driver names the reference documents that are not installable yet, and their issue
NOT_YET_DRIVERS: dict[tuple[str, str], int] = {}


def refusals(config: Config) -> list[str]:
    """One line per key set in `config` that this version does not do yet."""
    out = []
    for entry in NOT_YET:
        origin = config.sources.get(entry.key, "default")
        value = getattr(config, entry.key)
        if origin != "default" and entry.refuses(value):
            shown = f"={value}" if entry.values else ""
            out.append(f"{origin}: {entry.key}{shown}: {entry.purpose}: this version does "
                       "not do that yet")
    return out


#: keys a hook plugin carries out: (its entry-point name, the distribution that ships it)
NEEDS_PLUGIN: dict[str, tuple[str, str]] = {
    "metrics_textfile": ("metrics", "ahvbackup-metrics"),
    "metrics_pushgateway": ("metrics", "ahvbackup-metrics"),
}


def plugin_refusals(config: Config, registered: Collection[str]) -> list[str]:
    """One line per key set in `config` whose hook plugin is not among `registered`."""
    out = []
    for key, (plugin, dist) in NEEDS_PLUGIN.items():
        origin = config.sources.get(key, "default")
        if origin != "default" and getattr(config, key) is not None \
                and plugin not in registered:
            out.append(f"{origin}: {key}: needs the {dist} distribution (pip install {dist}), "
                       "which is not installed or not loaded")
    return out
