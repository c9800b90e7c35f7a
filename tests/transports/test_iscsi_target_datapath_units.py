"""The iscsi data path's initiator name: explicit, validated, or generated once and kept."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from ahvbackup.core.errors import DataPathError
from ahvbackup.transports.iscsi import datapath


def test_explicit_initiator_name_is_used_and_checked(tmp_path: Path) -> None:
    cfg = SimpleNamespace(iscsi_initiator="iqn.2024-01.com.example:fd1", state_dir=tmp_path)
    assert datapath.initiator_iqn(cfg) == "iqn.2024-01.com.example:fd1"
    cfg.iscsi_initiator = "backup-host"
    with pytest.raises(DataPathError, match=r"iscsi_initiator: .*\(got 'backup-host'\)"):
        datapath.initiator_iqn(cfg)


def test_auto_prefers_the_hosts_name_then_a_stable_generated_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "initiatorname.iscsi"
    monkeypatch.setattr(datapath, "_SYSTEM_IQN", system)
    cfg = SimpleNamespace(iscsi_initiator="auto", state_dir=tmp_path / "state")
    first = datapath.initiator_iqn(cfg)
    assert first.startswith("iqn.2024-01.org.ahvbackup:")
    assert datapath.initiator_iqn(cfg) == first  # kept in state_dir
    assert (tmp_path / "state" / "iscsi_initiator").read_text().strip() == first
    system.write_text("## comment\nInitiatorName=iqn.1993-08.org.debian:01:abc\n")
    assert datapath.initiator_iqn(cfg) == "iqn.1993-08.org.debian:01:abc"
