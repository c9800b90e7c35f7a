"""Where a job's metrics go when the place is wrong: one warning naming the key, the job
is not failed; and what the textfile holds after a job."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from tests.metrics.peers import free_port

from ahvbackup.core.config import load_config
from ahvbackup.metrics.plugin import MetricsPlugin


def finish(tmp: Path, **keys: str) -> MetricsPlugin:
    plugin = MetricsPlugin()
    cfg = load_config(overrides={"state_dir": str(tmp / "state"), **keys})
    plugin.ahvbackup_job_started(mode="backup", config=cfg)
    plugin.ahvbackup_metric(name="vm_seconds", value=3.0,
                            labels={"mode": "backup", "vm": "db-01", "outcome": "ok"})
    plugin.ahvbackup_metric(name="vm_last_success_timestamp", value=1e9, labels={"vm": "db-01"})
    plugin.ahvbackup_job_finished()
    return plugin


def test_an_unwritable_textfile_or_unreachable_gateway_is_one_warning_each(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    closed = f"127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="ahvbackup.metrics"):
        finish(tmp_path, metrics_textfile=str(tmp_path / "no" / "x.prom"),
               metrics_pushgateway=closed)
    assert [r.getMessage().split(": ")[0] for r in caplog.records] == [
        "metrics_textfile", "metrics_pushgateway"]
    assert f"{tmp_path / 'no' / 'x.prom'}: No such file or directory" in caplog.text
    assert f"cannot push to {closed}" in caplog.text


def test_the_textfile_holds_the_jobs_series_and_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "ahvbackup.prom"
    finish(tmp_path, metrics_textfile=str(out))
    text = out.read_text()
    assert 'ahvbackup_vm_duration_seconds{mode="backup",outcome="ok",tenant="",vm="db-01"} 3.0' \
        in text
    assert 'ahvbackup_vm_last_success_timestamp_seconds{tenant="",vm="db-01"} 1e+09' in text
    assert "python_" not in text and "process_" not in text and "_created" not in text
    assert out.stat().st_mode & 0o777 == 0o644  # node_exporter runs as another user
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ahvbackup.prom", "state"]
