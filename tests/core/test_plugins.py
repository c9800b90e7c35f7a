"""The plugin model: driver selection errors, the hook facade, the autoload switch, and every
entry point's contract."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ahvbackup.core import hookimpl
from ahvbackup.core.drivers import RestoreTarget
from ahvbackup.core.errors import ConfigError, PluginError
from ahvbackup.core.plugins import AUTOLOAD_ENV, Hooks, installed_plugins, load_driver
from ahvbackup.core.testing import check_driver_class, check_entry_points, check_hook_plugin

REPO = Path(__file__).resolve().parents[2]


def test_every_registered_entry_point_honours_its_contract() -> None:
    checked = check_entry_points()
    # the AHV distribution's hook plugin is always installed in the workspace
    assert "ahvbackup.hooks:ahv" in checked


def test_unknown_driver_names_key_value_and_choices() -> None:
    with pytest.raises(PluginError) as exc:
        load_driver("datapath", "floppy")
    msg = str(exc.value)
    assert msg.startswith("data_path: ")
    assert "'floppy'" in msg
    assert "installed:" in msg
    assert isinstance(exc.value, ConfigError)  # exit code 2, like any bad configuration


def test_driver_contract_check_names_the_broken_rule() -> None:
    class Incomplete(RestoreTarget):
        name = "half"

    with pytest.raises(AssertionError, match="abstract methods unimplemented: begin_vm"):
        check_driver_class(Incomplete, kind="target")

    class Nameless(RestoreTarget):
        async def begin_vm(self, *a: object, **kw: object) -> Any:
            raise NotImplementedError

    with pytest.raises(AssertionError, match="non-empty `name`"):
        check_driver_class(Nameless, kind="target")

    class Misnamed(Nameless):
        name = "raw2"

    with pytest.raises(AssertionError, match="registered as 'raw'"):
        check_driver_class(Misnamed, kind="target", name="raw")


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    @hookimpl
    def ahvbackup_vm_finished(self, **kw: object) -> None:
        self.events.append(("vm_finished", kw))

    @hookimpl
    def ahvbackup_resource_released(
        self, kind: str, resource_id: str, owner: str, ok: bool
    ) -> None:
        self.events.append(("released", {"kind": kind, "id": resource_id, "ok": ok}))


def test_hooks_facade_broadcasts_to_registered_plugins() -> None:
    rec = Recorder()
    hooks = Hooks(autoload=False, plugins=(rec,))
    hooks.resource_released(kind="snapshot", resource_id="s1", owner="job-1", ok=True)
    assert rec.events == [("released", {"kind": "snapshot", "id": "s1", "ok": True})]


def test_hook_plugin_with_unknown_argument_is_rejected() -> None:
    class Bad:
        @hookimpl
        def ahvbackup_disk_finished(self, no_such_argument: int) -> None: ...

    with pytest.raises(Exception, match="no_such_argument"):
        check_hook_plugin(Bad())


def test_autoload_switch_keeps_entry_point_plugins_out(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Hooks(autoload=True).pm.get_plugin("ahv") is not None
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    assert Hooks().pm.get_plugin("ahv") is None


def test_plugins_command_lists_distribution_and_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ahvbackup.core.cli", "--json", "plugins"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    import json

    rows = json.loads(out)
    names = {(r["group"], r["name"]): r for r in rows}
    ahv = names[("ahvbackup.hooks", "ahv")]
    assert ahv["distribution"] == "ahvbackup-ahv"
    assert ahv["version"]
    assert {p.name for p in installed_plugins()} >= {"ahv"}


def test_core_never_imports_another_area() -> None:
    offenders = []
    for path in (REPO / "core" / "src").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods = [node.module]
            for m in mods:
                if m.startswith("ahvbackup.") and not m.startswith("ahvbackup.core"):
                    offenders.append(f"{path.relative_to(REPO)}: {m}")
    assert not offenders, "core imports a plugin area: " + ", ".join(offenders)
