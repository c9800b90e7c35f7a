"""A backup's metrics reach a real Prometheus with the right labels: through the textfile
(served as node_exporter's textfile collector would) and through a real Pushgateway; the
textfile passes `promtool check metrics`; and the example rules, loaded in that Prometheus,
fire on a failed job."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import require_peer
from tests.e2e.e2e_world import MiB, iscsi_world
from tests.metrics.peers import prometheus, pushgateway, serve_file

from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.runtime import Runtime

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-")
RULES = Path(__file__).parents[2] / "packaging" / "prometheus" / "ahvbackup-rules.yml"


def one(found: list[dict[str, Any]]) -> tuple[dict[str, str], float]:
    """The labels and value of the one series a query found."""
    assert len(found) == 1, found
    return dict(found[0]["metric"]), float(found[0]["value"][1])


@pytest.mark.peer
async def test_a_backups_metrics_reach_prometheus_with_their_labels(tmp_path: Path) -> None:
    require_peer("prometheus", "prometheus-pushgateway", "promtool")
    textfile = tmp_path / "ahvbackup.prom"
    started = time.time()
    with pushgateway(tmp_path) as pg:
        async with iscsi_world(tmp_path, iscsi=True) as w:
            vm = w.add_vm("metered", [(4 * MiB, [(0, 2 * MiB)]), (MiB, [(0, MiB)])])
            w.add_vm("a-broken", [(MiB, [(0, MiB)])])
            keys = {"vm": "metered,a-broken", "data_path": "iscsi", "concurrent_vms": 1,
                    "metrics_textfile": textfile}
            full = await BackupJob(Runtime.from_config(w.config(**keys))).run()
            assert full.ok and textfile.exists()
            first_success = time.time()
            w.sim.write_disk(vm.uuid, 0, 0, os.urandom(MiB))  # a change for the incremental
            # a-broken is snapshotted first (by name), and Prism refuses it
            w.sim.faults.add(method="POST", path=r"/vm_snapshots$", status=403, count=1)
            inc = await BackupJob(Runtime.from_config(w.config(
                **keys, level="incremental", metrics_pushgateway=pg))).run()
            assert inc.failed == ["a-broken"], inc.to_json()

        checked = subprocess.run([require_peer("promtool")["promtool"], "check", "metrics"],
                                 input=textfile.read_bytes(), capture_output=True, timeout=30,
                                 check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert not list(tmp_path.glob(".ahvbackup.prom.tmp*"))  # renamed into place

        with serve_file(textfile) as node, \
                prometheus(tmp_path, {"node": node, "pushgateway": pg}, rules=RULES) as prom:
            labels, when = one(prom.wait_for(
                'ahvbackup_vm_last_success_timestamp_seconds{job="node",vm="metered"}'))
            assert "tenant" not in labels  # empty today: Prometheus drops it
            assert first_success <= when <= time.time()
            # the failed VM keeps its last success (from the full), so "26 h" can fire
            _, kept = one(prom.query(
                'ahvbackup_vm_last_success_timestamp_seconds{job="node",vm="a-broken"}'))
            assert started <= kept <= first_success
            labels, _ = one(prom.query('ahvbackup_vm_duration_seconds{job="node",'
                                       'outcome="failed"}'))
            assert labels["vm"] == "a-broken" and labels["mode"] == "backup"
            labels, errors = one(prom.query('ahvbackup_prism_errors_total{job="node",'
                                            'endpoint="/vm_snapshots"}'))
            assert (labels["method"], labels["status"], errors) == ("POST", "403", 1)
            labels, depth = one(prom.query('ahvbackup_disk_chain_depth{job="node",disk="scsi.0"}'))
            assert depth == 2 and labels["kind"] == "incremental" and labels["mode"] == "backup"
            _, ratio = one(prom.query('ahvbackup_disk_incremental_ratio{job="node",disk="scsi.0"}'))
            assert 0.3 < ratio < 0.7  # 1 MiB changed of the full's 2 MiB
            _, read = one(prom.query(
                'ahvbackup_disk_read_bytes{job="node",vm="metered",disk="scsi.0",outcome="ok"}'))
            assert read == MiB
            _, logins = one(prom.query('ahvbackup_iscsi_logins_total{job="node",outcome="ok"}'))
            assert logins >= 2  # one session per disk
            calls = prom.query('ahvbackup_prism_requests_total{job="node",status="200"}')
            endpoints = {c["metric"]["endpoint"] for c in calls}
            assert "/vms/list" in endpoints, endpoints
            assert not [e for e in endpoints if UUID.search(e)]  # ids folded: few series
            # the same job, pushed: the Pushgateway's group labels arrive too
            labels, seconds = one(prom.wait_for('ahvbackup_job_duration_seconds{job="ahvbackup"}'))
            assert labels == {"__name__": "ahvbackup_job_duration_seconds", "job": "ahvbackup",
                              "instance": socket.gethostname(), "mode": "backup",
                              "outcome": "failed"}
            assert 0 < seconds < 60
            # the example rule sees it: the job-failed alert fires for both paths
            firing = prom.wait_for('ALERTS{alertname="AhvbackupJobFailed",alertstate="firing"}',
                                   series=2)
            assert {a["metric"]["job"] for a in firing} == {"node", "ahvbackup"}, firing
