"""Options shared by every job command: where configuration comes from, and loading it."""

from __future__ import annotations

__all__ = ["ANY_MODE", "config_options", "load_job_config", "parse_sets",
           "refuse_hosted_sink", "run_trio"]

import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import click
import trio

from ..config import DEFAULT_CONFIG_FILE, Config, ConfigSources, ModeView, assemble_config
from ..config.fields import shorten
from ..drivers import Sink
from ..errors import ConfigError, Interrupted
from ..log import configure_logging, set_context
from ..plugins import Hooks, load_driver

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


#: the view of a command that runs no mode (list, verify, consolidate): any working mode
ANY_MODE = ModeView("this command")


def parse_sets(sets: Iterable[str]) -> dict[str, object]:
    """``-o KEY=VALUE`` arguments as overrides; an argument without ``=`` is named."""
    out: dict[str, object] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not key.strip():
            raise ConfigError(f"command line: -o {shorten(item)}: -o expects KEY=VALUE "
                              "(no key before '=')")
        if not sep:
            raise ConfigError(f"command line: {shorten(key.strip())}: -o expects KEY=VALUE "
                              "(no '=' after the key)")
        out[key.strip()] = value
    return out


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
    view: ModeView = ANY_MODE,
) -> Config:
    """Assemble the configuration from every source for a command of `view`, and set up
    logging from it. ``-o`` wins over `overrides` (what the command's own options set)."""
    files = list(configs)
    if not files and DEFAULT_CONFIG_FILE.exists():
        files = [DEFAULT_CONFIG_FILE]
    merged: dict[str, object] = {**(overrides or {}), **parse_sets(sets)}
    if verbose is not None:
        merged["verbose"] = str(verbose)
    cfg = assemble_config(
        ConfigSources(files=tuple(files), plugin_string=plugin_string, overrides=merged),
        hooks=hooks, view=view, require=require,
    )
    debug_log = cfg.debug_log
    if debug_log is not None and cfg.sources.get("debug_log") == "default" \
            and not debug_log.parent.is_dir():
        debug_log = None  # the Bacula default folder does not exist on this host
    configure_logging(verbose=cfg.verbose, debug_log=debug_log, stderr=stderr,
                      log_format=cfg.log_format)
    set_context(tenant=cfg.tenant or "")  # log records and the error line name the tenant
    return cfg


def refuse_hosted_sink(cfg: Config) -> None:
    """Refuse, before the cluster is contacted, a sink that works only inside a host program
    (sink=bacula): a command-line job cannot be its host."""
    inside = load_driver("sink", cfg.sink, base=Sink).works_only_inside
    if inside:
        raise ConfigError(f"{cfg.sources.get('sink', 'default')}: sink={cfg.sink} works only "
                          f"inside {inside}; on the command line use sink=directory")


def run_trio(fn: Callable[..., Any], *args: Any) -> Any:
    """Run an async job. SIGINT (Ctrl-C) and SIGTERM cancel it, so the ledger's shielded
    releases run, then `Interrupted` ends the command with 130 or 143 and one line."""
    caught: list[int] = []

    async def main() -> Any:
        token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as job:
            def on_signal(signum: int, frame: object) -> None:
                caught.append(signum)
                token.run_sync_soon(job.cancel)  # the one trio call safe in a signal handler

            previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                return await fn(*args)
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
        return None

    result = trio.run(main)
    if caught:
        name = signal.Signals(caught[0]).name
        raise Interrupted(caught[0], f"interrupted by {name}; what the job had created on "
                                     "the cluster was released")
    return result


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
