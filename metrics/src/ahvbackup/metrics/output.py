"""Where one job's metrics go: a node_exporter textfile, a Pushgateway, and the small
record of each VM's last success kept in state_dir between jobs."""

from __future__ import annotations

__all__ = ["load_last_success", "push", "save_last_success", "write_textfile"]

import json
import socket
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, push_to_gateway

from ahvbackup.core.config import HostPort
from ahvbackup.core.fsutil import atomic_write_bytes, atomic_write_json, ensure_dir

#: seconds a push may take; it runs once, at the job's end
PUSH_TIMEOUT = 10.0
PUSHGATEWAY_PORT = 9091


def write_textfile(registry: CollectorRegistry, path: Path) -> None:
    """The text exposition format, written atomically (temp file, fsync, rename) and
    readable by node_exporter's user (0644); the temp name does not end in ``.prom``."""
    atomic_write_bytes(path, generate_latest(registry), mode=0o644)


def push(registry: CollectorRegistry, gateway: HostPort, *, mode: str) -> None:
    """Replace this host's group for `mode` (job="ahvbackup", instance=<host>, mode=...)."""
    where = str(HostPort(gateway.host, gateway.port or PUSHGATEWAY_PORT))
    push_to_gateway(where, job="ahvbackup", registry=registry, timeout=PUSH_TIMEOUT,
                    grouping_key={"instance": socket.gethostname(), "mode": mode})


def _store(state_dir: Path) -> Path:
    return state_dir / "metrics" / "last_success.json"


def load_last_success(state_dir: Path) -> dict[tuple[str, str], float]:
    """{(tenant, vm): unix time} of each VM's last complete backup; empty when unreadable."""
    try:
        rows = json.loads(_store(state_dir).read_text())
        return {(str(r["tenant"]), str(r["vm"])): float(r["time"]) for r in rows}
    except (OSError, ValueError, TypeError, KeyError):
        return {}


def save_last_success(state_dir: Path, known: dict[tuple[str, str], float]) -> None:
    ensure_dir(state_dir / "metrics", key="state_dir", writable=True)
    atomic_write_json(_store(state_dir), [{"tenant": t, "vm": v, "time": when}
                                          for (t, v), when in sorted(known.items())])
