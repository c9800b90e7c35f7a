"""The packaging follows the code: the annotated example is the key table's, the
meta-distribution installs every area, and the Debian package has the same version.

Building the wheels and the .deb and installing them is packaging/ci-check.sh (CI runs it);
these checks are the fast part that catches drift in `make test`.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
META = PACKAGING / "meta" / "pyproject.toml"


def _areas() -> list[str]:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    m = re.search(r"^AREAS\s*:=\s*(.+)$", makefile, flags=re.MULTILINE)
    assert m, "no AREAS in the Makefile"
    return m.group(1).split()


def _project(path: Path) -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))["project"]
    return project


def _conf_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("conf_example", PACKAGING / "conf_example.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for req in requirements:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][^;\s]*)", req)
        assert m, f"{req!r}: the meta-distribution pins each area exactly (name==version)"
        pins[m.group(1)] = m.group(2)
    return pins


def test_the_shipped_example_is_the_key_tables() -> None:
    shipped = (PACKAGING / "ahvbackup.conf").read_text(encoding="utf-8")
    assert shipped == _conf_example().render(), (
        "packaging/ahvbackup.conf is stale: run .venv/bin/python packaging/conf_example.py --write")


def test_the_meta_distribution_installs_every_area_and_nothing_else() -> None:
    areas = {_project(REPO / a / "pyproject.toml")["name"]: _project(REPO / a / "pyproject.toml")
             for a in _areas()}
    meta = _project(META)
    extras: dict[str, list[str]] = meta["optional-dependencies"]
    base = _pins(meta["dependencies"])
    pinned = dict(base)
    for name, reqs in extras.items():
        own = [r for r in reqs if r.startswith("ahvbackup[")]
        for r in own:
            named = set(r[len("ahvbackup["):-1].split(","))
            assert named <= set(extras) - {name}, f"extra {name}: {r} names an unknown extra"
        extra_pins = _pins([r for r in reqs if r not in own])
        assert extra_pins or own, f"extra {name} installs nothing"
        pinned |= extra_pins
    assert set(pinned) == set(areas), (
        f"areas not in packaging/meta/pyproject.toml: {sorted(set(areas) - set(pinned))}; "
        f"not areas: {sorted(set(pinned) - set(areas))}")
    for name, version in pinned.items():
        assert version == areas[name]["version"] == meta["version"], name
    everything = {n for r in extras.get("all", []) for n in r[len("ahvbackup["):-1].split(",")}
    assert everything == set(extras) - {"all"}, "the all extra names every other extra"


def test_the_debian_package_has_the_distributions_version() -> None:
    changelog = (PACKAGING / "debian" / "changelog").read_text(encoding="utf-8")
    m = re.match(r"ahvbackup \(([^)]+)\) ", changelog)
    assert m and m.group(1) == _project(META)["version"]


@pytest.mark.parametrize("script", ["postinst", "postrm", "prerm"])
def test_the_maintainer_scripts_are_posix_sh(script: str) -> None:
    path = PACKAGING / "debian" / f"ahvbackup.{script}"
    result = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
