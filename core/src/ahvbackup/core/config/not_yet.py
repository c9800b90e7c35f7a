"""Keys of the reference this version accepts by name but does not do yet.

An operator migrating a FileSet believes every key in it works. So a key whose feature is
not built is refused whenever a source sets it, with one line naming the key, what it is
for, and that this version does not do it yet; it never loads silently. Each entry names the
issue that will make it work; when that issue lands, its entries leave this table.
"""

from __future__ import annotations

__all__ = ["NOT_YET", "NOT_YET_DRIVERS", "NotYet", "refusals"]

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
    NotYet("prism_api_version", "Prism's v4 API (v3 is used today)", 11, values=("v4",)),
    NotYet("cross_restore", "restoring streams of other hypervisors", 10),
    _dr("dr_host", "the DR receiver's host"),
    _dr("dr_port", "the DR receiver's port"),
    _dr("dr_auth_token", "the DR channel's pre-shared key"),
    _dr("dr_auth_cert", "the DR channel's mTLS client certificate"),
    _dr("dr_auth_key", "the DR channel's mTLS client key"),
    _dr("dr_ca_cert", "the CA that verifies the DR receiver"),
    _dr("dr_restore_points", "point-in-time images kept on the DR receiver"),
    _dr("max_bandwidth_mbps", "the DR channel's bandwidth cap"),
    _dr("push_interval", "the time between DR delta pushes"),
    _dr("push_apply_remote", "the DR receiver applying deltas as they arrive"),
)

#: driver names the reference documents that are not installable yet, and their issue
NOT_YET_DRIVERS: dict[tuple[str, str], int] = {
    **{("target", name): 10 for name in ("qcow2", "vmdk", "vhdx", "vhd")},
}


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
