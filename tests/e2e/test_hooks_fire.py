"""Every documented lifecycle hook fires in a real backup and a real restore, with the
arguments its spec documents (a hook plugin sees what docs/plugins.md promises)."""

from __future__ import annotations

import ast
import inspect
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.e2e.e2e_world import MiB, World

from ahvbackup.core import hookimpl, hookspecs
from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.restore import RestoreJob, pick_backup
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.core.plugins import Hooks
from ahvbackup.hypervisors.ahv.client import http as prism_http
from ahvbackup.transports.iscsi import initiator as iscsi_initiator

CORE = Path(hookspecs.__file__).parent
SOURCES = [CORE / "jobs" / "backup.py", CORE / "jobs" / "restore.py", CORE / "ledger.py",
           CORE / "jobs" / "runtime.py",  # the sweep; below, drivers through Hooks.current()
           Path(prism_http.__file__), Path(iscsi_initiator.__file__)]
#: the extension points are collected, not broadcast: they are not lifecycle events
LIFECYCLE = sorted(n for n, f in vars(hookspecs).items()
                   if n.startswith("ahvbackup_") and callable(f)
                   and n not in {"ahvbackup_cli_commands", "ahvbackup_config_fields"})


def _recorder() -> tuple[object, dict[str, list[dict[str, Any]]]]:
    """A hook plugin implementing every lifecycle hook with the spec's own signature."""
    calls: dict[str, list[dict[str, Any]]] = defaultdict(list)
    ns: dict[str, Any] = {}
    for name in LIFECYCLE:
        params = list(inspect.signature(getattr(hookspecs, name)).parameters)
        src = (f"def {name}({', '.join(params)}):\n"
               f"    calls[{name!r}].append({{{', '.join(f'{p!r}: {p}' for p in params)}}})\n")
        exec(src, {"calls": calls}, ns)  # a function per spec, with exactly its parameters
        ns[name] = hookimpl(ns[name])
    return type("Recorder", (), {k: staticmethod(v) for k, v in ns.items()})(), calls


async def test_every_lifecycle_hook_fires_in_a_backup_and_a_restore(world: World) -> None:
    world.add_vm("hooked", [(4 * MiB, [(0, MiB)]), (2 * MiB, [])])
    plugin, calls = _recorder()
    hooks = Hooks(autoload=False, plugins=(plugin,))
    rt = Runtime.from_config(world.config(vm="hooked", data_path="rest"), hooks=hooks)
    assert (await BackupJob(rt).run()).ok
    backup_calls = {k: list(v) for k, v in calls.items()}
    calls.clear()
    backup = await pick_backup(rt, vm="hooked", backup_id=None)
    assert (await RestoreJob(rt, backup, dest=world.tmp / "r").run()).ok
    restore_calls = dict(calls)

    assert sorted(backup_calls) == LIFECYCLE, set(LIFECYCLE) - set(backup_calls)
    for name, seen in backup_calls.items():
        params = inspect.signature(getattr(hookspecs, name)).parameters
        for call in seen:
            assert set(call) == set(params), name
    # what a plugin relies on, by hook
    assert [c["mode"] for c in backup_calls["ahvbackup_job_started"]] == ["backup"]
    assert backup_calls["ahvbackup_job_finished"][0]["ok"] is True
    assert sorted(c["disk"] for c in backup_calls["ahvbackup_disk_finished"]) == ["scsi.0",
                                                                                   "scsi.1"]
    created = {(c["kind"], c["resource_id"]) for c in backup_calls["ahvbackup_resource_created"]}
    released = {(c["kind"], c["resource_id"]) for c in backup_calls["ahvbackup_resource_released"]
                if c["ok"]}
    assert {k for k, _ in created} >= {"snapshot", "image"}
    # every image was released; the snapshot stays as the next incremental's reference
    assert {r for r in created if r[0] == "image"} <= released
    snap = backup_calls["ahvbackup_snapshot_created"][0]["snapshot_id"]
    assert ("snapshot", snap) in created and ("snapshot", snap) not in released
    metrics = {c["name"]: c for c in backup_calls["ahvbackup_metric"]}
    assert {"disk_bytes_read", "disk_bytes_stored", "disk_read_seconds", "vm_seconds",
            "vm_last_success_timestamp", "job_seconds", "resources_released"} <= set(metrics)
    reads = [c for c in backup_calls["ahvbackup_metric"] if c["name"] == "disk_bytes_read"]
    assert sorted(c["value"] for c in reads) == [0, MiB]
    assert reads[0]["labels"]["vm"] == "hooked" and reads[0]["labels"]["outcome"] == "ok"

    assert {"ahvbackup_job_started", "ahvbackup_vm_started", "ahvbackup_disk_started",
            "ahvbackup_disk_finished", "ahvbackup_vm_finished", "ahvbackup_job_finished",
            "ahvbackup_metric"} <= set(restore_calls)
    assert [c["mode"] for c in restore_calls["ahvbackup_job_started"]] == ["restore"]
    restored = [c for c in restore_calls["ahvbackup_metric"] if c["name"] == "disk_bytes_restored"]
    assert sorted(c["value"] for c in restored) == [0, MiB]
    assert Path(world.tmp / "r" / "hooked" / "scsi.0.raw").exists()


def test_every_metric_a_job_emits_is_documented() -> None:
    documented = set(re.findall(r"``([a-z_]+)``", hookspecs.ahvbackup_metric.__doc__ or ""))
    emitted: set[str] = set()
    for source in SOURCES:
        for node in ast.walk(ast.parse(source.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            if node.func.attr == "measure":
                emitted |= {k.arg for k in node.keywords if k.arg}
            if node.func.attr == "metric":  # name=... given directly
                for k in node.keywords:
                    if k.arg == "name":
                        emitted |= {c.value for c in ast.walk(k.value)
                                    if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    assert emitted and emitted == documented, emitted ^ documented
