"""The example alert rules in packaging/prometheus/: valid for Prometheus, each alert fires
on synthetic series and stays quiet on healthy ones (promtool), and they name only metrics
we export."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from tests.conftest import require_peer

from ahvbackup.metrics.catalog import CATALOG

HERE = Path(__file__).parent
RULES = HERE.parents[1] / "packaging" / "prometheus" / "ahvbackup-rules.yml"
ALERTS = {"AhvbackupNoRecentBackup", "AhvbackupJobFailed", "AhvbackupCleanupDebris"}


def promtool(*args: str, cwd: Path = HERE) -> str:
    exe = require_peer("promtool")["promtool"]
    done = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.mark.peer
def test_the_example_rules_pass_promtool_check_rules() -> None:
    assert "SUCCESS: 3 rules found" in promtool("check", "rules", str(RULES))


@pytest.mark.peer
def test_each_example_alert_fires_on_synthetic_series() -> None:
    tests = (HERE / "ahvbackup-rules.test.yml").read_text()
    assert set(re.findall(r"alertname: (\w+)", tests)) == ALERTS  # every alert is tested
    assert "SUCCESS" in promtool("test", "rules", "ahvbackup-rules.test.yml")


def test_the_rules_name_only_exported_metrics() -> None:
    text = RULES.read_text()
    assert set(re.findall(r"- alert: (\w+)", text)) == ALERTS
    used = set(re.findall(r"\bahvbackup_[a-z_]+", text))
    assert used and used <= {s.exposed for s in CATALOG}, used - {s.exposed for s in CATALOG}
