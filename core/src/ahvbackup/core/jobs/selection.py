"""Which VMs a job touches: `project=` (Prism Central projects, names or UUIDs), then within
them `vm=` (UUIDs, exact names, globs, comma lists), `exclude=`, `cluster=`."""

from __future__ import annotations

__all__ = ["select_vms"]

import fnmatch
from collections.abc import Sequence

from ..errors import ConfigError
from ..model import VmInfo

_GLOB = set("*?[")


def _matches(vm: VmInfo, pattern: str) -> bool:
    if pattern == vm.uuid or pattern == vm.name:
        return True
    return bool(_GLOB & set(pattern)) and fnmatch.fnmatchcase(vm.name, pattern)


def select_vms(
    vms: Sequence[VmInfo],
    *,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    cluster: str | None = None,
    project: Sequence[str] = (),
) -> tuple[list[VmInfo], list[str]]:
    """Return (selected VMs sorted by name, warnings).

    A pattern that is neither a UUID nor a name nor a glob matching anything is named in a
    warning, so a typo in `vm=` is seen in the job log; an empty selection is an error.
    A project with no VM the account can see is an error naming it (and only the projects
    the account sees, never other tenants' VMs).
    """
    pool = list(vms)
    if project:
        pool = [v for v in pool if {v.project_uuid, v.project_name} & set(project) - {""}]
        missing = [p for p in project if not any(p in (v.project_uuid, v.project_name)
                                                 for v in pool)]
        if missing:
            seen = sorted({v.project_name or v.project_uuid for v in vms} - {""})
            raise ConfigError(
                f"project: no VM visible in project {', '.join(map(repr, missing))} "
                f"(projects with VMs this account sees: {', '.join(seen) or 'none'})"
            )
    if cluster:
        pool = [v for v in pool if cluster in (v.cluster_uuid, v.cluster_name)]
        if not pool:
            known = sorted({v.cluster_name for v in vms})
            raise ConfigError(
                f"cluster: no VMs on a cluster named {cluster!r} (clusters: {', '.join(known)})"
            )
    patterns = [p for p in include if p] or ["*"]
    warnings = [
        f"vm: {p!r} matched no VM" for p in patterns if not any(_matches(v, p) for v in pool)
    ]
    chosen = [v for v in pool if any(_matches(v, p) for p in patterns)]
    chosen = [v for v in chosen if not any(_matches(v, p) for p in exclude)]
    if not chosen:
        raise ConfigError(
            f"vm: {','.join(patterns)!r}"
            + (f" minus exclude {','.join(exclude)!r}" if exclude else "")
            + f" selects no VM ({len(pool)} VMs seen"
            + (f" on cluster {cluster!r}" if cluster else "")
            + (f" in project {','.join(project)!r}" if project else "")
            + ")"
        )
    return sorted(chosen, key=lambda v: (v.name, v.uuid)), warnings
