"""One configuration assembly for every caller: the CLI, the Bacula backend, bpipe, tests.

It merges the core keys with the keys of every installed driver and hook plugin (so a
plugin's key works the same from a file, a plugin string, ``-o`` or a Bacula ``Params``
block), refuses keys and driver names this version does not do yet, and picks the mode the
caller runs. A plugin that fails to import is named in a warning and left out; only a job
that needs it fails (when it loads the driver, with its error).
"""

from __future__ import annotations

__all__ = [
    "VM_RESTORE_KEYS",
    "ConfigSources",
    "PluginKeys",
    "assemble_config",
    "plugin_keys",
    "vm_key_refusals",
]

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marshmallow import fields as mm_fields

from ..errors import ConfigError
from ..plugins import DRIVER_KINDS, Hooks, driver_classes, driver_names, load_driver
from ..tenancy import tenant_config
from .keys import BY_NAME
from .loader import load_config
from .model import Config
from .modes import MODE_TABLE, ModeView, pick_mode
from .not_yet import NOT_YET_DRIVERS, plugin_refusals, refusals

#: `data_path=auto` picks an installed data path at run time
_AUTO = {"data_path": "auto"}


@dataclass(frozen=True)
class ConfigSources:
    """Where one job's configuration comes from, lowest precedence first."""

    files: tuple[Path, ...] = ()
    plugin_string: str | None = None
    #: the command line (or the Bacula Job block): highest precedence
    overrides: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class PluginKeys:
    """The configuration keys installed plugins declare, and the plugins that failed."""

    fields: Mapping[str, mm_fields.Field[Any]]
    #: key -> the plugin that declares it ("ahvbackup.hypervisor:ahv")
    owners: Mapping[str, str]
    warnings: tuple[str, ...]


def plugin_keys(hooks: Hooks) -> PluginKeys:
    """Keys from every installed driver's `config_schema` and every hook plugin's
    `ahvbackup_config_fields`. A key that clashes with a core key or with another plugin's
    is left out with a warning, like a plugin that fails to load."""
    fields: dict[str, mm_fields.Field[Any]] = {}
    owners: dict[str, str] = {}
    warnings: list[str] = []

    def add(owner: str, declared: Mapping[str, mm_fields.Field[Any]]) -> None:
        for key, f in declared.items():
            if key in BY_NAME:
                warnings.append(f"plugin {owner} declares the key {key!r}, which ahvbackup "
                                "already has; its declaration is ignored")
            elif key in owners and owners[key] != owner:
                warnings.append(f"plugins {owners[key]} and {owner} both declare the key "
                                f"{key!r}; {owners[key]}'s is used")
            else:
                fields[key], owners[key] = f, owner

    classes, broken = driver_classes()
    for spec, cls in classes:
        if cls.config_schema is not None:
            add(f"{spec.namespace}:{cls.name}", cls.config_schema().fields)
    for name, declared in hooks.config_fields_by_plugin():
        add(f"ahvbackup.hooks:{name}", declared)
    warnings[:0] = [b.warning for b in (*broken, *hooks.broken)]
    return PluginKeys(fields, owners, tuple(warnings))


def assemble_config(
    sources: ConfigSources,
    *,
    hooks: Hooks,
    view: ModeView,
    require: Iterable[str] = (),
) -> Config:
    """Load and check every source into the `Config` a job of `view` runs with.

    Problems are one `ConfigError` (exit code 2), one line each naming the key and its
    source: a bad or unknown key, a key or driver this version does not do yet, a mode
    `view` does not run. Warnings (inline password, a plugin that failed to load, ...) are
    in `Config.warnings`.
    """
    keys = plugin_keys(hooks)
    config = load_config(
        files=list(sources.files), plugin_string=sources.plugin_string,
        overrides=sources.overrides, extra_fields=keys.fields, require=require,
    )
    problems = [*refusals(config), *_driver_problems(config), *encryption_refusal(config),
                *plugin_refusals(config, hooks.plugin_names()),
                *other_target_key_refusals(config, keys)]
    if problems:
        raise ConfigError("\n".join(problems))
    config = tenant_config(pick_mode(config, view))  # state and repository of its tenant
    if MODE_TABLE[config.mode].job == "restore":
        problems = vm_key_refusals(config, target_name=str(config.target),
                                   needs_cluster=_needs_cluster(str(config.target)))
        if problems:
            raise ConfigError("\n".join(problems))
    return dataclasses.replace(config, warnings=(*config.warnings, *keys.warnings))


#: keys that shape a VM a restore creates: only a cluster target (`needs_cluster`) uses them
VM_RESTORE_KEYS = ("restore_vm_name", "target_cluster", "target_container", "network_map",
                   "power_on", "vcpu", "memory_mib")


def vm_key_refusals(config: Config, *, target_name: str, needs_cluster: bool) -> list[str]:
    """Nothing is accepted and then ignored: one line per key that shapes a created VM,
    set for a target that writes disk images."""
    if needs_cluster:
        return []
    sources = getattr(config, "sources", None) or {}
    return [f"{sources[k]}: {k}: shapes the VM a restore creates on a cluster (target=ahv), "
            f"but target={target_name} writes disk images" for k in VM_RESTORE_KEYS
            if sources.get(k, "default") != "default"]


def other_target_key_refusals(config: Config, keys: PluginKeys) -> list[str]:
    """A restore target's own key (`qcow2_compression`) set while another target is chosen
    would do nothing: one line each. (Data-path keys are not checked: `data_path=auto`, and
    the ahv target's disk writes, use whichever path answers.)"""
    namespace = DRIVER_KINDS["target"].namespace
    chosen = f"{namespace}:{config.target}"
    out = []
    for key, owner in keys.owners.items():
        origin = config.sources.get(key, "default")
        if origin != "default" and owner.startswith(namespace + ":") and owner != chosen:
            out.append(f"{origin}: {key}: a key of the {owner.split(':', 1)[1]} target, but "
                       f"target={config.target}: it would do nothing (unset it or choose "
                       "that target)")
    return out


def encryption_refusal(config: Config) -> list[str]:
    """encryption_key works only where streams are encrypted: the directory repository."""
    if config.encryption_key is None or config.sink == "directory":
        return []
    origin = config.sources.get("encryption_key", "configuration")
    return [f"{origin}: encryption_key: streams are encrypted only in the directory "
            f"repository; sink={config.sink} does not encrypt (unset encryption_key, or "
            "encrypt the Bacula volumes)"]


def _needs_cluster(target: str) -> bool:
    """Whether the target driver of that name creates things on a cluster (a driver that
    does not load counts as one: the job that loads it says why)."""
    from ..drivers import RestoreTarget  # drivers imports config for its types

    try:
        return bool(load_driver("target", target, base=RestoreTarget).needs_cluster)
    except Exception:
        return True


def _driver_problems(config: Config) -> list[str]:
    """Driver names that no installed distribution registers (checked by entry-point name,
    so nothing is imported: a broken driver fails only the job that loads it)."""
    out = []
    for kind, spec in DRIVER_KINDS.items():
        if spec.config_key not in BY_NAME:
            continue
        name = str(getattr(config, spec.config_key))
        installed = driver_names(kind)
        if name in installed or _AUTO.get(spec.config_key) == name:
            continue
        origin = config.sources.get(spec.config_key, "default")
        if (spec.config_key, name) in NOT_YET_DRIVERS:
            out.append(f"{origin}: {spec.config_key}={name}: the {name} {kind} driver: this "
                       "version does not do that yet")
        else:
            choices = ", ".join(sorted({*filter(None, [_AUTO.get(spec.config_key)]), *installed}))
            out.append(f"{origin}: {spec.config_key}: no {kind} driver named {name!r} "
                       f"(installed: {choices or 'none'})")
    return out
