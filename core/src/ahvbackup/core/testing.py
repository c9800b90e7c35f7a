"""Conformance checks for drivers, shipped so third-party plugins run the same checks as ours.

Use in a plugin's tests::

    from ahvbackup.core.testing import check_driver_class, check_entry_points
    def test_contract():
        check_driver_class(MyTarget, kind="target", name="mytarget")

Each check raises `AssertionError` with a message naming the driver and the broken rule.
"""

from __future__ import annotations

__all__ = ["check_driver_class", "check_entry_points", "check_hook_plugin"]

import inspect
from importlib.metadata import entry_points
from typing import Any

import marshmallow
import pluggy

from . import hookspecs
from .drivers import Driver
from .plugins import DRIVER_KINDS, HOOKS_GROUP, load_driver


def check_driver_class(cls: Any, *, kind: str, name: str | None = None) -> None:
    """The class is a concrete subclass of its kind's base, with a name and a valid schema."""
    spec = DRIVER_KINDS.get(kind)
    assert spec is not None, f"unknown driver kind {kind!r} (kinds: {', '.join(DRIVER_KINDS)})"
    label = f"{kind} driver {getattr(cls, '__qualname__', cls)!r}"
    assert isinstance(cls, type) and issubclass(cls, spec.base), (
        f"{label} must subclass ahvbackup.core.drivers.{spec.base.__name__}"
    )
    abstract = sorted(getattr(cls, "__abstractmethods__", ()))
    assert not abstract, f"{label} leaves abstract methods unimplemented: {', '.join(abstract)}"
    assert isinstance(cls.name, str) and cls.name, f"{label} must set a non-empty `name`"
    if name is not None:
        assert cls.name == name, (
            f"{label} declares name {cls.name!r} but is registered as {name!r}"
        )
    schema = cls.config_schema
    if schema is not None:
        assert isinstance(schema, type) and issubclass(schema, marshmallow.Schema), (
            f"{label}: config_schema must be a marshmallow.Schema subclass"
        )
        schema()  # constructible without arguments
    assert issubclass(cls, Driver)


def check_hook_plugin(plugin: object) -> None:
    """Every `ahvbackup_*` function of the plugin matches a declared hook and its arguments."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(plugin)  # raises PluginValidationError on unknown arguments
    pm.check_pending()  # raises on an ahvbackup_* hookimpl with no spec
    names = [n for n, _ in inspect.getmembers(plugin) if n.startswith("ahvbackup_")]
    assert names, f"hook plugin {plugin!r} implements no ahvbackup_* hook"


def check_entry_points() -> list[str]:
    """Load every registered driver and hook entry point and check its contract.

    Returns the names checked, as ``group:name``, so a caller can assert on coverage.
    """
    checked: list[str] = []
    for kind, spec in DRIVER_KINDS.items():
        for ep in entry_points(group=spec.namespace):
            cls = load_driver(kind, ep.name)
            check_driver_class(cls, kind=kind, name=ep.name)
            checked.append(f"{spec.namespace}:{ep.name}")
    for ep in entry_points(group=HOOKS_GROUP):
        check_hook_plugin(ep.load())
        checked.append(f"{HOOKS_GROUP}:{ep.name}")
    return checked
