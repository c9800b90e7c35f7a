"""docs/metrics.md lists every metric exactly as the catalog exports it, and every event
the core and drivers emit has a metric (or is knowingly left out)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from ahvbackup.core import hookspecs
from ahvbackup.core.config import ConfigSources, assemble_config, view_of_job
from ahvbackup.core.errors import ConfigError
from ahvbackup.core.plugins import Hooks
from ahvbackup.metrics.catalog import CATALOG
from ahvbackup.metrics.collect import JobMetrics

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
BACKUP = view_of_job("a test", "backup")


def test_the_docs_table_equals_the_catalog() -> None:
    rows = re.findall(r"^\| `(ahvbackup_\w+)` \| (\w+) \| ([^|]*) \| `(\w+)` \| ([^|]*) \|$",
                      DOC.read_text(), flags=re.MULTILINE)
    documented = [(name, kind, tuple(re.findall(r"`(\w+)`", labels)), event, text.strip())
                  for name, kind, labels, event, text in rows]
    assert documented == [(s.exposed, s.type, s.labels, s.event, s.help) for s in CATALOG]


def test_every_emitted_event_has_a_metric() -> None:
    """The hook's documentation lists every event core and drivers emit (a test in
    tests/e2e checks that against the code); each is exported."""
    emitted = set(re.findall(r"``([a-z_]+)``", hookspecs.ahvbackup_metric.__doc__ or ""))
    assert emitted == {s.event for s in CATALOG}


def test_the_registry_exposes_the_documented_names() -> None:
    job = JobMetrics(mode="backup")
    for spec in CATALOG:
        job.observe(spec.event, 1.0, dict.fromkeys(spec.labels, "x"))
    text = generate_latest(job.registry).decode()
    exposed = set(re.findall(r"^# TYPE (\w+) (\w+)$", text, flags=re.MULTILINE))
    assert exposed == {(s.exposed, s.type) for s in CATALOG}
    for spec in CATALOG:
        assert re.search(rf"^{spec.exposed}(\{{|\s)", text, flags=re.MULTILINE), spec.exposed


def test_a_metrics_key_without_the_exporter_is_refused_by_name() -> None:
    """Nothing is accepted and then ignored: with hook plugins not loaded, no exporter runs."""
    sources = ConfigSources(overrides={"metrics_textfile": "/tmp/x.prom"})
    with pytest.raises(ConfigError) as err:
        assemble_config(sources, hooks=Hooks(autoload=False), view=BACKUP)
    assert str(err.value) == ("command line: metrics_textfile: needs the ahvbackup-metrics "
                              "distribution (pip install ahvbackup-metrics), which is not "
                              "installed or not loaded")
    assemble_config(sources, hooks=Hooks(), view=BACKUP)  # installed: it loads


def test_the_plugin_passes_the_hook_conformance_check() -> None:
    from ahvbackup.core.testing import check_entry_points, check_hook_plugin
    from ahvbackup.metrics.plugin import plugin

    check_hook_plugin(plugin)
    assert "ahvbackup.hooks:metrics" in check_entry_points()
