from __future__ import annotations

import pytest

from ahvbackup.core.errors import ConfigError
from ahvbackup.core.jobs.selection import select_vms
from ahvbackup.core.model import VmInfo


def vm(name: str, uuid: str, cluster: str = "c1") -> VmInfo:
    return VmInfo(
        uuid=uuid, name=name, cluster_uuid=f"{cluster}-uuid", cluster_name=cluster, disks=()
    )


VMS = [vm("prod-web", "u1"), vm("prod-db", "u2"), vm("test-web", "u3", "c2"), vm("app", "u4")]


def names(sel: tuple[list[VmInfo], list[str]]) -> list[str]:
    return [v.name for v in sel[0]]


def test_default_selects_everything_sorted() -> None:
    assert names(select_vms(VMS)) == ["app", "prod-db", "prod-web", "test-web"]


def test_uuid_name_glob_and_comma_list() -> None:
    assert names(select_vms(VMS, include=["u4", "prod-*"])) == ["app", "prod-db", "prod-web"]
    assert names(select_vms(VMS, include=["test-web"])) == ["test-web"]


def test_exclude_applies_after_include() -> None:
    assert names(select_vms(VMS, include=["*-web"], exclude=["test-*"])) == ["prod-web"]


def test_cluster_by_name_or_uuid() -> None:
    assert names(select_vms(VMS, cluster="c2")) == ["test-web"]
    assert names(select_vms(VMS, cluster="c1-uuid", include=["prod-db"])) == ["prod-db"]
    with pytest.raises(ConfigError, match="cluster: no VMs on a cluster named 'nope'"):
        select_vms(VMS, cluster="nope")


def test_typo_is_warned_and_empty_selection_is_an_error() -> None:
    chosen, warnings = select_vms(VMS, include=["prod-web", "prod-wbe"])
    assert [v.name for v in chosen] == ["prod-web"]
    assert warnings == ["vm: 'prod-wbe' matched no VM"]
    with pytest.raises(ConfigError, match="selects no VM"):
        select_vms(VMS, include=["nothing-*"])


def test_globs_are_case_sensitive_like_prism_names() -> None:
    with pytest.raises(ConfigError):
        select_vms(VMS, include=["PROD-*"])
