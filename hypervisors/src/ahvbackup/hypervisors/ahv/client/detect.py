"""Which Prism API a deployment speaks: v4 version discovery (docs/nutanix-api.md 1.2).

`GET /api/actuator/versionroutes` lists every namespace with its released versions; a Prism
without it may still answer `OPTIONS /api/{ns}/unversioned/info` (what the SDKs negotiate
with) for each namespace. Neither answering means a v3-only Prism. Parsing is pure
(`versions_from_routes`), so a recorded real answer can be checked without a server.
"""

from __future__ import annotations

__all__ = ["NEEDED", "V4Discovery", "discover_v4", "pick_version", "versions_from_routes"]

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ahvbackup.core.errors import ApiError

from .http import PrismHttp

#: the namespaces a v4 backup and restore use
NEEDED = ("vmm", "clustermgmt", "dataprotection", "volumes", "prism")
_RELEASED = re.compile(r"^v4\.(\d+)$")  # pre-releases (v4.0.a1, v4.0.b2) are not used


def pick_version(versions: list[str] | tuple[str, ...]) -> str | None:
    """The newest released `v4.N` of a namespace's versions (None: only pre-releases)."""
    released = [(int(m.group(1)), v) for v in versions if (m := _RELEASED.match(v))]
    return max(released)[1] if released else None


def versions_from_routes(data: Any) -> dict[str, str]:
    """`{namespace: newest released version}` from a versionroutes answer."""
    out: dict[str, str] = {}
    for item in data if isinstance(data, list) else []:
        if not isinstance(item, Mapping) or not isinstance(item.get("namespace"), str):
            continue
        routes = item.get("versionRoutes") or []
        found = [str(r.get("version")) for r in routes if isinstance(r, Mapping)]
        chosen = pick_version(found)
        if chosen:
            out[item["namespace"]] = chosen
    return out


@dataclass(frozen=True)
class V4Discovery:
    """`versions` per namespace when v4 is usable, else empty with `reason` saying why not."""

    versions: Mapping[str, str] = field(default_factory=dict)
    reason: str = ""
    source: str = ""  # the call that told us

    @property
    def usable(self) -> bool:
        return all(ns in self.versions for ns in NEEDED)


async def discover_v4(http: PrismHttp) -> V4Discovery:
    """Ask Prism Central which v4 namespaces and versions it serves."""
    try:
        data = await http.request_json("GET", "/api/actuator/versionroutes")
        versions = versions_from_routes(data)
        source = "GET /api/actuator/versionroutes"
    except ApiError as err:
        if err.status not in (404, 405, 501):
            raise
        versions, source = {}, "OPTIONS /api/{ns}/unversioned/info"
        for ns in NEEDED:
            try:
                info = await http.request_json("OPTIONS", f"/api/{ns}/unversioned/info")
            except ApiError as inner:
                if inner.status not in (404, 405, 501):
                    raise
                continue
            got = info.get("data") if isinstance(info, Mapping) else None
            if isinstance(got, str) and _RELEASED.match(got):
                versions[ns] = got
    missing = [ns for ns in NEEDED if ns not in versions]
    if not versions:
        return V4Discovery(reason=f"Prism at {http.host} serves no v4 API (neither "
                                  "/api/actuator/versionroutes nor /api/{ns}/unversioned/info "
                                  "answered)", source=source)
    if missing:
        return V4Discovery(versions=versions, source=source, reason=(
            f"Prism at {http.host} lacks the v4 namespace(s) {', '.join(missing)} "
            f"({source})"))
    return V4Discovery(versions=versions, source=source)
