"""Logging: verbosity 0-3, the backend log file, secret masking, and the key job messages.

`verbose` (0 errors only, 1 normal, 2 debug, 3 trace) and `debug_log` follow the whitepaper.
Every logger is under ``ahvbackup.``; every handler we install carries `SecretFilter`, so a
live secret is masked even when it reaches a message by a side road (a URL, an exception).
With ``stderr=False`` nothing is ever written to stderr (the Bacula backend talks to the file
daemon over its standard streams): records go to the log file only, Python warnings and
other libraries' warnings included.

The key messages operators watch for (whitepaper section 13.2) are built here, once, by
`backend_up`, `prism_discovery`, `selected_vms`, `backup_complete` and `dr_cycle_complete`,
pure functions whose text job code logs at info; docs/logging.md lists them. Their tails are
``key=value`` so log scrapers can parse them.
"""

from __future__ import annotations

__all__ = [
    "BACKEND_UP",
    "BACKUP_COMPLETE",
    "DR_CYCLE_COMPLETE",
    "LOG_FORMATS",
    "PRISM_DISCOVERY",
    "SELECTED_VMS",
    "TRACE",
    "VERBOSITY",
    "LogContext",
    "SecretFilter",
    "backend_up",
    "backup_complete",
    "configure_logging",
    "dr_cycle_complete",
    "get_logger",
    "in_phase",
    "log_context",
    "mask_secrets",
    "prism_discovery",
    "reset_logging",
    "selected_vms",
    "set_context",
    "trace",
]

import contextlib
import dataclasses
import io
import json
import logging
import logging.handlers
import os
import sys
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .secret import known_secrets

#: below DEBUG: wire-level detail (verbose = 3)
TRACE = 5
logging.addLevelName(TRACE, "TRACE")

#: verbose key value -> logging level
VERBOSITY = {0: logging.ERROR, 1: logging.INFO, 2: logging.DEBUG, 3: TRACE}

ROOT = "ahvbackup"
MASK = "********"
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
LOG_FORMATS = ("text", "json")


@dataclasses.dataclass(frozen=True)
class LogContext:
    """Where a record comes from, for `log_format=json`: set by the lifecycle hooks
    (`Hooks.job_started`, `vm_started`, `disk_started`) in the task doing that work."""

    tenant: str = ""
    job: str = ""
    vm: str = ""
    disk: str = ""
    phase: str = ""


_NO_CONTEXT = LogContext()
_CONTEXT: ContextVar[LogContext | None] = ContextVar("ahvbackup_log_context", default=None)


def log_context() -> LogContext:
    """The context of the current task (and of the tasks and threads it started)."""
    return _CONTEXT.get() or _NO_CONTEXT


def set_context(**changes: str) -> None:
    """Change fields of the current task's context (its child tasks inherit it)."""
    _CONTEXT.set(dataclasses.replace(log_context(), **changes))


@contextlib.contextmanager
def in_phase(phase: str) -> Iterator[None]:
    """`phase` for the records of the block, then the task's phase as before."""
    token = _CONTEXT.set(dataclasses.replace(log_context(), phase=phase))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, tenant, job, vm, disk, phase, logger, message
    (and error, a traceback). `SecretFilter` has masked the message and traceback already."""

    def format(self, record: logging.LogRecord) -> str:
        ctx = log_context()
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, str] = {
            "time": f"{when}.{int(record.msecs):03d}Z", "level": record.levelname,
            **dataclasses.asdict(ctx), "logger": record.name, "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["error"] = record.exc_text
        return json.dumps(line, ensure_ascii=False)


def get_logger(name: str) -> logging.Logger:
    """The logger ``ahvbackup.<name>`` (a name already under ``ahvbackup`` is kept)."""
    if name == ROOT or name.startswith(ROOT + "."):
        return logging.getLogger(name)
    return logging.getLogger(f"{ROOT}.{name}")


def trace(logger: logging.Logger, msg: str, *args: object) -> None:
    """Log at TRACE (verbose = 3)."""
    logger.log(TRACE, msg, *args)


def mask_secrets(text: str, secrets: Iterable[str] | None = None) -> str:
    """Replace every live secret (and its URL-encoded form) in `text` with a mask."""
    for s in known_secrets() if secrets is None else secrets:
        text = text.replace(s, MASK)
        quoted = urllib.parse.quote(s, safe="")
        if quoted != s:
            text = text.replace(quoted, MASK)
    return text


class SecretFilter(logging.Filter):
    """Masks every live `Secret` in a record's message, arguments, traceback and stack.

    The message is formatted here, once, so the arguments cannot reintroduce a secret
    later; a message whose arguments do not fit its format is kept, not raised.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = known_secrets()
        try:
            msg = record.getMessage()
        except (TypeError, ValueError, KeyError):
            msg = f"{record.msg!s} (arguments did not fit the message: {record.args!r})"
        record.msg, record.args = mask_secrets(msg, secrets), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secrets(record.exc_text, secrets)
        if record.stack_info:
            record.stack_info = mask_secrets(record.stack_info, secrets)
        return True


class _StderrFormatter(logging.Formatter):
    """``ahvbackup: message`` for info, ``ahvbackup: warning: message`` otherwise."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno == logging.INFO:
            return f"ahvbackup: {text}"
        return f"ahvbackup: {record.levelname.lower()}: {text}"


class _PrivateFileHandler(logging.handlers.WatchedFileHandler):
    """Appends to a file created mode 0600 (tightened if it exists looser); logrotate-safe."""

    quiet = False

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
        except OSError:
            os.close(fd)
            raise
        stream = os.fdopen(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)
        assert isinstance(stream, io.TextIOWrapper)
        return stream

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.quiet:
            super().handleError(record)


class _QuietNullHandler(logging.NullHandler):
    """Stands in when no output is wanted, so Python's last-resort stderr handler stays idle."""


_installed: list[tuple[logging.Logger, logging.Handler]] = []
_saved: dict[str, Any] = {}


def reset_logging() -> None:
    """Remove and close every handler `configure_logging` installed, and undo its settings."""
    while _installed:
        logger, handler = _installed.pop()
        logger.removeHandler(handler)
        handler.close()
    if _saved:
        logging.getLogger(ROOT).propagate = _saved.pop("propagate")
        logging.getLogger().setLevel(_saved.pop("root_level"))
        logging.captureWarnings(_saved.pop("capture"))
        logging.raiseExceptions = _saved.pop("raise_exceptions")


def configure_logging(
    *, verbose: int, debug_log: Path | None, stderr: bool = True, log_format: str = "text"
) -> logging.Logger:
    """Send ``ahvbackup.*`` records at the `verbose` level to stderr and/or `debug_log`
    (as text lines, or JSON lines with `log_format="json"`).

    `verbose` outside 0-3 is clamped. `debug_log` is created mode 0600. With
    ``stderr=False`` nothing reaches stderr: other libraries' warnings and Python warnings
    go to the log file too, and logging's own error reports are suppressed. Calling it again
    replaces the previous setup. Raises `ConfigError` when the log file cannot be opened.
    """
    reset_logging()
    level = VERBOSITY[max(0, min(3, verbose))]
    handlers: list[logging.Handler] = []
    if stderr:
        h: logging.Handler = logging.StreamHandler(sys.stderr)
        h.setFormatter(_StderrFormatter("%(message)s"))
        handlers.append(h)
    if debug_log is not None:
        try:
            fh = _PrivateFileHandler(debug_log)
        except OSError as err:
            raise ConfigError(
                f"debug_log {debug_log}: cannot open it ({err.strerror or err})"
            ) from err
        fh.quiet = not stderr
        fh.setFormatter(_JsonFormatter() if log_format == "json"
                        else logging.Formatter(_FILE_FORMAT))
        handlers.append(fh)
    if not handlers:
        handlers.append(_QuietNullHandler())

    root = logging.getLogger(ROOT)
    std_root = logging.getLogger()
    _saved.update(
        propagate=root.propagate,
        root_level=std_root.level,
        capture=_capturing_warnings(),
        raise_exceptions=logging.raiseExceptions,
    )
    root.setLevel(level)
    root.propagate = False
    for handler in handlers:
        handler.setLevel(level)
        handler.addFilter(SecretFilter())
        root.addHandler(handler)
        _installed.append((root, handler))
    if not stderr:
        # other libraries and Python warnings: to our file at WARNING, never to stderr
        logging.captureWarnings(True)
        logging.raiseExceptions = False
        if std_root.level > logging.WARNING or std_root.level == logging.NOTSET:
            std_root.setLevel(logging.WARNING)
        for handler in handlers:
            other = _clone_for_root(handler)
            std_root.addHandler(other)
            _installed.append((std_root, other))
    return root


def _capturing_warnings() -> bool:
    return getattr(logging, "_warnings_showwarning", None) is not None


def _clone_for_root(handler: logging.Handler) -> logging.Handler:
    """A WARNING-level view of `handler` for the root logger (same stream, same filter)."""

    class _Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                handler.handle(record)

        def handleError(self, record: logging.LogRecord) -> None:
            pass

    fwd = _Forward(logging.WARNING)
    fwd.addFilter(SecretFilter())
    return fwd


# key messages (whitepaper 13.2, in our words) ----------------------------------------------
# Pure formatters: job code logs what they return (at info), so each text lives here once.

BACKEND_UP = "ahvbackup {version} started: mode={mode} level={level} vm={vm}"
PRISM_DISCOVERY = "Prism reached: central={central} cluster={cluster} api={api}"
SELECTED_VMS = "{count} {noun} selected for {mode}{names}"
BACKUP_COMPLETE = "VM backed up: vm={vm} disks={disks} bytes={bytes} bytes_read={bytes_read}"
DR_CYCLE_COMPLETE = ("DR cycle complete: vm={vm} point={point} bytes_pushed={bytes_pushed} "
                     "reconnects={reconnects} lag_seconds={lag_seconds}")

_NAMES_SHOWN = 20


def _v(value: object) -> str:
    """A value for a ``key=value`` tail: quoted as JSON when it has blanks, quotes or '='."""
    text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


def backend_up(version: str, *, mode: str, level: str, vm: str | Iterable[str]) -> str:
    """A job started: version, mode, level and the vm= selection."""
    vms = vm if isinstance(vm, str) else tuple(vm)
    return BACKEND_UP.format(version=_v(version), mode=_v(mode), level=_v(level), vm=_v(vms))


def prism_discovery(central: str, cluster: str, api: str) -> str:
    """Prism Central answered and the API version (v3 or v4) is known."""
    return PRISM_DISCOVERY.format(central=_v(central), cluster=_v(cluster), api=_v(api))


def selected_vms(count: int, names: Iterable[str] = (), *, mode: str = "backup") -> str:
    """The selection (vm=, exclude=, cluster=) matched `count` VMs; up to 20 names shown."""
    shown = list(names)
    listed = ""
    if shown:
        more = len(shown) - _NAMES_SHOWN
        listed = ": " + ", ".join(shown[:_NAMES_SHOWN]) + (f" and {more} more" if more > 0 else "")
    return SELECTED_VMS.format(count=count, noun="VM" if count == 1 else "VMs", mode=mode,
                               names=listed)


def backup_complete(vm: str, disks: int, bytes_read: int, bytes_stored: int) -> str:
    """Every disk of one VM was stored; ``bytes`` is what the backup holds."""
    return BACKUP_COMPLETE.format(vm=_v(vm), disks=disks, bytes=bytes_stored,
                                  bytes_read=bytes_read)


def dr_cycle_complete(vm: str, point: int, bytes_pushed: int, *, reconnects: int = 0,
                      lag: float = 0.0) -> str:
    """One DR point is complete on the receiver: the bytes put on the wire for it, the
    reconnects it took, and the lag (seconds from its snapshot to the commit: the RPO)."""
    return DR_CYCLE_COMPLETE.format(vm=_v(vm), point=point, bytes_pushed=bytes_pushed,
                                    reconnects=reconnects, lag_seconds=f"{lag:.1f}")
