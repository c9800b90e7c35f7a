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
    "DriverKind",
    "Hooks",
    "InstalledPlugin",
    "installed_plugins",
    "load_driver",
]

import os
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

import pluggy
from stevedore import driver as sv_driver
from stevedore import exception as sv_exc

from . import hookspecs
from .drivers import DataPath, Driver, DrTransport, Hypervisor, RestoreTarget, Sink
from .errors import PluginError

AUTOLOAD_ENV = "AHVBACKUP_DISABLE_PLUGIN_AUTOLOAD"
HOOKS_GROUP = "ahvbackup.hooks"

D = TypeVar("D", bound=Driver)


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


def load_driver(kind: str, name: str, *, base: type[D] | None = None) -> type[D]:
    """Return the driver class that `name` selects for `kind`.

    An unknown name is a `PluginError` naming the configuration key, the value and the
    installed choices; a driver that fails to import names the distribution's error.
    """
    spec = DRIVER_KINDS[kind]
    failures: list[str] = []

    def on_failure(_mgr: object, ep: EntryPoint, err: BaseException) -> None:
        failures.append(f"{ep.value}: {type(err).__name__}: {err}")

    try:
        mgr = sv_driver.DriverManager(
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
    want = base or spec.base
    if not (isinstance(cls, type) and issubclass(cls, want)):
        raise PluginError(
            f"{spec.config_key}: {name!r} ({mgr.extensions[0].entry_point.value}) is not a "
            f"{want.__name__} subclass"
        )
    return cls  # type: ignore[return-value]


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


def autoload_enabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in {"1", "true", "yes", "on"}


class Hooks:
    """The typed facade over pluggy. Every hook call in ahvbackup goes through here."""

    def __init__(self, *, autoload: bool | None = None, plugins: tuple[object, ...] = ()) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        for plugin in plugins:
            self.pm.register(plugin)
        if autoload_enabled() if autoload is None else autoload:
            try:
                self.pm.load_setuptools_entrypoints(HOOKS_GROUP)
            except (ImportError, pluggy.PluginValidationError) as err:
                raise PluginError(f"a hook plugin in {HOOKS_GROUP} failed to load: {err}") from err

    def register(self, plugin: object, name: str | None = None) -> None:
        self.pm.register(plugin, name=name)

    # Extension points (collected) ------------------------------------------------------------
    def cli_commands(self) -> list[Any]:
        return [cmd for cmds in self.pm.hook.ahvbackup_cli_commands() for cmd in cmds]

    def config_fields(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for fields in self.pm.hook.ahvbackup_config_fields():
            merged.update(fields)
        return merged

    # Lifecycle events (broadcast) --------------------------------------------------------------
    def job_started(self, *, job_id: str, mode: str, level: str) -> None:
        self.pm.hook.ahvbackup_job_started(job_id=job_id, mode=mode, level=level)

    def job_finished(self, *, job_id: str, ok: bool, failed: list[str], seconds: float) -> None:
        self.pm.hook.ahvbackup_job_finished(job_id=job_id, ok=ok, failed=failed, seconds=seconds)

    def vm_started(self, *, job_id: str, vm_uuid: str, vm_name: str) -> None:
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
