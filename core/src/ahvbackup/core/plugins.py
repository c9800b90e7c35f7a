"""Plugin loading: stevedore picks one driver by name, pluggy broadcasts lifecycle hooks.

Core talks to hook plugins only through `Hooks`, a typed facade; nothing else calls
`pm.hook.*`. Setting ``AHVBACKUP_DISABLE_PLUGIN_AUTOLOAD=1`` (or ``autoload=False``) stops
hook plugins from being loaded from entry points; explicitly registered ones still run.
"""

from __future__ import annotations

__all__ = [
    "AUTOLOAD_ENV",
    "DRIVER_KINDS",
    "HOOKS_GROUP",
    "BrokenPlugin",
    "DriverKind",
    "Hooks",
    "InstalledPlugin",
    "driver_classes",
    "driver_names",
    "installed_plugins",
    "load_driver",
]

import functools
import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, Literal, cast, overload

import pluggy
from stevedore import driver as sv_driver
from stevedore import exception as sv_exc

from . import hookspecs
from . import log as _log
from .drivers import DataPath, Driver, DrTransport, Hypervisor, RestoreTarget, Sink
from .errors import PluginError

if TYPE_CHECKING:
    from .config import Config

AUTOLOAD_ENV = "AHVBACKUP_DISABLE_PLUGIN_AUTOLOAD"
HOOKS_GROUP = "ahvbackup.hooks"


@dataclass(frozen=True)
class DriverKind:
    """One stevedore namespace: which entry-point group, which config key, which base class."""

    kind: str
    namespace: str
    config_key: str
    base: type[Driver]


DRIVER_KINDS: dict[str, DriverKind] = {
    k.kind: k
    for k in (
        DriverKind("hypervisor", "ahvbackup.hypervisor", "hypervisor", Hypervisor),
        DriverKind("datapath", "ahvbackup.datapath", "data_path", DataPath),
        DriverKind("sink", "ahvbackup.sink", "sink", Sink),
        DriverKind("target", "ahvbackup.target", "target", RestoreTarget),
        DriverKind("transport", "ahvbackup.transport", "dr_transport", DrTransport),
    )
}


def _names(namespace: str) -> list[str]:
    return sorted({ep.name for ep in entry_points(group=namespace)})


# typed by kind, so a caller gets e.g. type[RestoreTarget] for "target" (`base` narrows
# further; `object` there because mypy refuses an abstract class for a type[X] parameter)
@overload
def load_driver(kind: Literal["hypervisor"], name: str, *, base: object = ...
                ) -> type[Hypervisor]: ...
@overload
def load_driver(kind: Literal["datapath"], name: str, *, base: object = ...) -> type[DataPath]: ...
@overload
def load_driver(kind: Literal["sink"], name: str, *, base: object = ...) -> type[Sink]: ...
@overload
def load_driver(kind: Literal["target"], name: str, *, base: object = ...
                ) -> type[RestoreTarget]: ...
@overload
def load_driver(kind: Literal["transport"], name: str, *, base: object = ...
                ) -> type[DrTransport]: ...
@overload
def load_driver(kind: str, name: str, *, base: object = ...) -> type[Driver]: ...


def load_driver(kind: str, name: str, *, base: object = None) -> type[Driver]:
    """Return the driver class that `name` selects for `kind` (a subclass of `base`, by
    default the kind's base class).

    An unknown name is a `PluginError` naming the configuration key, the value and the
    installed choices; a driver that fails to import names the distribution's error.
    """
    spec = DRIVER_KINDS[kind]
    failures: list[str] = []

    def on_failure(_mgr: object, ep: EntryPoint, err: BaseException) -> None:
        failures.append(f"{ep.value}: {type(err).__name__}: {err}")

    try:
        mgr: sv_driver.DriverManager[Any] = sv_driver.DriverManager(
            namespace=spec.namespace,
            name=name,
            invoke_on_load=False,
            on_load_failure_callback=on_failure,
        )
    except sv_exc.NoMatches:
        if failures:
            raise PluginError(
                f"{spec.config_key}: driver {name!r} is installed but failed to load "
                f"({'; '.join(failures)})"
            ) from None
        choices = ", ".join(_names(spec.namespace)) or "none installed"
        raise PluginError(
            f"{spec.config_key}: no {kind} driver named {name!r} (installed: {choices})"
        ) from None
    except sv_exc.MultipleMatches:
        raise PluginError(
            f"{spec.config_key}: more than one installed distribution registers a {kind} "
            f"driver named {name!r}; uninstall one"
        ) from None
    cls = mgr.driver
    want = base if isinstance(base, type) and issubclass(base, spec.base) else spec.base
    if not (isinstance(cls, type) and issubclass(cls, want)):
        raise PluginError(
            f"{spec.config_key}: {name!r} ({mgr.extensions[0].entry_point.value}) is not a "
            f"{want.__name__} subclass"
        )
    return cls


@dataclass(frozen=True)
class InstalledPlugin:
    """One entry point of one of our groups, as `ahvbackup plugins` shows it."""

    group: str
    name: str
    target: str
    distribution: str
    version: str

    @classmethod
    def from_entry_point(cls, ep: EntryPoint) -> InstalledPlugin:
        dist = ep.dist
        return cls(
            group=ep.group,
            name=ep.name,
            target=ep.value,
            distribution=dist.name if dist else "?",
            version=dist.version if dist else "?",
        )


def installed_plugins() -> list[InstalledPlugin]:
    """Every driver and hook plugin registered by any installed distribution."""
    groups = [k.namespace for k in DRIVER_KINDS.values()] + [HOOKS_GROUP]
    found = {
        InstalledPlugin.from_entry_point(ep) for g in groups for ep in entry_points(group=g)
    }
    return sorted(found, key=lambda p: (p.group, p.name, p.distribution))


def driver_classes() -> tuple[list[tuple[DriverKind, type[Driver]]], list[BrokenPlugin]]:
    """Every installed driver class of every kind, and the drivers that failed to load.

    Used to collect the drivers' configuration keys; a driver that fails to import is
    returned in the second list (for a warning) instead of stopping the caller.
    """
    found: list[tuple[DriverKind, type[Driver]]] = []
    broken: list[BrokenPlugin] = []
    for spec in DRIVER_KINDS.values():
        for ep in sorted(entry_points(group=spec.namespace), key=lambda e: e.name):
            try:
                cls = ep.load()
            except Exception as err:  # any failure of third-party code: warn, go on
                broken.append(BrokenPlugin.from_failure(ep, err))
                continue
            if not (isinstance(cls, type) and issubclass(cls, spec.base)):
                broken.append(BrokenPlugin(ep.group, ep.name, ep.value,
                                           f"not a {spec.base.__name__} subclass"))
                continue
            found.append((spec, cls))
    return found, broken


def driver_names(kind: str) -> list[str]:
    """The names of the installed drivers of `kind` (entry points only; nothing is imported)."""
    return _names(DRIVER_KINDS[kind].namespace)


def autoload_enabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class BrokenPlugin:
    """An installed plugin that failed to import or to register; it is left out, with a warning."""

    group: str
    name: str
    target: str
    error: str

    @classmethod
    def from_failure(cls, ep: EntryPoint, err: BaseException) -> BrokenPlugin:
        return cls(ep.group, ep.name, ep.value, f"{type(err).__name__}: {err}")

    @property
    def warning(self) -> str:
        where = ", ".join(filter(None, [self.group, self.target]))
        return f"plugin {self.name!r} ({where}) failed to load and is unavailable: {self.error}"


class Hooks:
    """The typed facade over pluggy. Every hook call in ahvbackup goes through here.

    A hook plugin that fails to import or register is left out and listed in `broken`, so
    one bad third-party plugin cannot stop every command.
    """

    def __init__(self, *, autoload: bool | None = None, plugins: tuple[object, ...] = ()) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.broken: list[BrokenPlugin] = []
        for plugin in plugins:
            self.pm.register(plugin)
        if autoload_enabled() if autoload is None else autoload:
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        for ep in sorted(entry_points(group=HOOKS_GROUP), key=lambda e: e.name):
            if self.pm.has_plugin(ep.name) or self.pm.is_blocked(ep.name):
                continue
            try:
                self.pm.register(ep.load(), name=ep.name)
            except Exception as err:  # any failure of third-party code: warn, go on
                self.broken.append(BrokenPlugin.from_failure(ep, err))

    def register(self, plugin: object, name: str | None = None) -> None:
        self.pm.register(plugin, name=name)

    def plugin_names(self) -> set[str]:
        """The names the hook plugins are registered under (entry-point names)."""
        return {name for name, _ in self.pm.list_name_plugin()}

    @staticmethod
    def current() -> Hooks:
        """The hooks of the job running in this task (from its `job_started` on), else hooks
        with no plugins. Drivers, which are not handed the job's hooks, emit `metric` here."""
        return _RUNNING.get() or _idle_hooks()

    # Extension points (collected) ------------------------------------------------------------
    def cli_commands(self) -> list[Any]:
        return [cmd for cmds in self.pm.hook.ahvbackup_cli_commands() for cmd in cmds]

    def config_fields(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for fields in self.pm.hook.ahvbackup_config_fields():
            merged.update(fields)
        return merged

    def config_fields_by_plugin(self) -> list[tuple[str, dict[str, Any]]]:
        """(plugin name, its keys) for every hook plugin that declares configuration keys.

        A plugin whose hook raises is added to `broken` and left out.
        """
        out = []
        for impl in self.pm.hook.ahvbackup_config_fields.get_hookimpls():
            try:
                fields = dict(cast("Mapping[str, Any] | None", impl.function()) or {})
            except Exception as err:  # third-party code: warn, go on
                self.broken.append(BrokenPlugin(HOOKS_GROUP, impl.plugin_name, "",
                                                f"{type(err).__name__}: {err}"))
                continue
            if fields:
                out.append((impl.plugin_name, fields))
        return out

    # Lifecycle events (broadcast) --------------------------------------------------------------
    def job_started(self, *, job_id: str, mode: str, level: str, config: Config) -> None:
        _RUNNING.set(self)  # this task and the tasks it starts: drivers' metrics reach us
        _log.set_context(job=job_id, phase="job", tenant=config.tenant or "")
        self.pm.hook.ahvbackup_job_started(job_id=job_id, mode=mode, level=level, config=config)

    def job_finished(self, *, job_id: str, ok: bool, failed: list[str], seconds: float) -> None:
        self.pm.hook.ahvbackup_job_finished(job_id=job_id, ok=ok, failed=failed, seconds=seconds)

    def vm_started(self, *, job_id: str, vm_uuid: str, vm_name: str) -> None:
        _log.set_context(vm=vm_name, phase="vm")  # the VM's own task, in a backup
        self.pm.hook.ahvbackup_vm_started(job_id=job_id, vm_uuid=vm_uuid, vm_name=vm_name)

    def vm_finished(
        self, *, job_id: str, vm_uuid: str, vm_name: str, ok: bool, bytes_stored: int,
        error: str | None,
    ) -> None:
        self.pm.hook.ahvbackup_vm_finished(
            job_id=job_id, vm_uuid=vm_uuid, vm_name=vm_name, ok=ok,
            bytes_stored=bytes_stored, error=error,
        )

    def disk_started(self, *, job_id: str, vm_name: str, disk: str, size: int) -> None:
        _log.set_context(vm=vm_name, disk=disk, phase="disk")  # the disk's own task
        self.pm.hook.ahvbackup_disk_started(job_id=job_id, vm_name=vm_name, disk=disk, size=size)

    def disk_finished(
        self, *, job_id: str, vm_name: str, disk: str, ok: bool, bytes_read: int,
        bytes_stored: int,
    ) -> None:
        self.pm.hook.ahvbackup_disk_finished(
            job_id=job_id, vm_name=vm_name, disk=disk, ok=ok, bytes_read=bytes_read,
            bytes_stored=bytes_stored,
        )

    def snapshot_created(
        self, *, job_id: str, vm_uuid: str, snapshot_id: str, consistency: str
    ) -> None:
        self.pm.hook.ahvbackup_snapshot_created(
            job_id=job_id, vm_uuid=vm_uuid, snapshot_id=snapshot_id, consistency=consistency
        )

    def resource_created(self, *, kind: str, resource_id: str, owner: str) -> None:
        self.pm.hook.ahvbackup_resource_created(kind=kind, resource_id=resource_id, owner=owner)

    def resource_released(self, *, kind: str, resource_id: str, owner: str, ok: bool) -> None:
        self.pm.hook.ahvbackup_resource_released(
            kind=kind, resource_id=resource_id, owner=owner, ok=ok
        )

    def metric(self, *, name: str, value: float, labels: dict[str, str]) -> None:
        self.pm.hook.ahvbackup_metric(name=name, value=value, labels=labels)

    def measure(self, labels: dict[str, str], **values: float) -> None:
        """One `metric` per value, all with the same `labels` (docs/plugins.md names them)."""
        for name, value in values.items():
            self.metric(name=name, value=float(value), labels=labels)


#: the hooks of the job running in the current task (set by `Hooks.job_started`)
_RUNNING: ContextVar[Hooks | None] = ContextVar("ahvbackup_running_hooks", default=None)


@functools.cache
def _idle_hooks() -> Hooks:
    return Hooks(autoload=False)
