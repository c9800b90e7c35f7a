"""Options shared by every job command: where configuration comes from, and loading it."""

from __future__ import annotations

__all__ = ["config_options", "load_job_config", "run_trio"]

import functools
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import click
import trio

from ..config import DEFAULT_CONFIG_FILE, Config, load_config
from ..errors import ConfigError
from ..log import configure_logging
from ..plugins import DRIVER_KINDS, Hooks, installed_plugins, load_driver

F = TypeVar("F", bound=Callable[..., Any])


def config_options(f: F) -> F:
    """`-c FILE` (repeatable), `-o key=value` (repeatable) and `--plugin-string`."""
    f = click.option(
        "-o", "--set", "sets", multiple=True, metavar="KEY=VALUE",
        help="Set one configuration key (highest precedence; repeatable).",
    )(f)
    f = click.option(
        "--plugin-string", metavar="TEXT",
        help='A Bacula-style plugin string: "ahvbackup: key=value ...".',
    )(f)
    f = click.option(
        "-c", "--config", "configs", multiple=True, type=click.Path(path_type=Path),
        help=f"Configuration file (repeatable; default {DEFAULT_CONFIG_FILE} if it exists).",
    )(f)
    return f


def _driver_fields() -> dict[str, Any]:
    """Configuration keys declared by installed drivers (their config_schema)."""
    fields: dict[str, Any] = {}
    for kind, spec in DRIVER_KINDS.items():
        for plugin in installed_plugins():
            if plugin.group != spec.namespace:
                continue
            cls = load_driver(kind, plugin.name)
            if cls.config_schema is not None:
                fields.update(cls.config_schema().fields)
    return fields


def load_job_config(
    *,
    configs: Iterable[Path],
    sets: Iterable[str],
    plugin_string: str | None,
    hooks: Hooks,
    verbose: int | None = None,
    require: Iterable[str] = (),
    overrides: dict[str, object] | None = None,
    stderr: bool = True,
) -> Config:
    """Load the configuration from every source and set up logging from it."""
    files = list(configs)
    if not files and DEFAULT_CONFIG_FILE.exists():
        files = [DEFAULT_CONFIG_FILE]
    merged: dict[str, object] = dict(overrides or {})
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("command line: -o expects KEY=VALUE (an argument had no '=')")
        merged[key.strip()] = value
    if verbose is not None:
        merged["verbose"] = str(verbose)
    cfg = load_config(
        files=files, plugin_string=plugin_string, overrides=merged,
        extra_fields={**hooks.config_fields(), **_driver_fields()}, require=require,
    )
    debug_log = cfg.debug_log
    if debug_log is not None and cfg.sources.get("debug_log") == "default" \
            and not debug_log.parent.is_dir():
        debug_log = None  # the Bacula default folder does not exist on this host
    configure_logging(verbose=cfg.verbose, debug_log=debug_log, stderr=stderr)
    return cfg


def run_trio(fn: Callable[..., Any], *args: Any) -> Any:
    """Run an async job; Ctrl-C cancels it so cleanup runs before we exit."""
    return trio.run(functools.partial(fn, *args))


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
