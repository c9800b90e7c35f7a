"""``ahvbackup-bacula-backend``: the program a Bacula metaplugin runs and talks to over pipes.

Start-up is ordered so the file daemon is answered at once and the pipes stay clean:

1. the protocol pipes are moved off descriptors 0 and 1 (which then point at /dev/null, so a
   stray ``print`` or a child process can never write into the protocol);
2. ``sys.stdout``/``sys.stderr`` become log writers, SIGUSR1/SIGTERM are noted, and
   `sys.excepthook` logs a crash and sends an ``A`` packet; nothing is written to stderr;
3. ``Hello`` is answered before trio and the configuration code are imported;
4. the session runs on trio; once the parameters give `debug_log`, logging goes there and
   descriptor 1 points at it too (output of child processes lands in the log).

Descriptor 2 is never closed, moved or written: it is the file daemon's error pipe, and the
file daemon reads its end-of-file as a backend failure (with empty text) for the rest of the
job. After ``T`` the backend reads its input to the end before it exits, as the file daemon
takes an early exit for an error too.

SIGUSR1 (the file daemon's cancel) and SIGTERM cancel the running job; cleanup (the ledger's
shielded releases) runs, then the backend exits 0.

Environment: ``AHVBACKUP_CONFIG`` lists configuration files (``:``-separated; default
/opt/bacula/etc/ahvbackup.conf when it exists); ``AHVBACKUP_BACULA_HANDLERS=module:factory``
selects other handlers (tests, extensions) than the built-in job handlers.
"""

from __future__ import annotations

__all__ = ["CONFIG_ENV", "HANDLERS_ENV", "load_handlers", "main"]

import contextlib
import fcntl
import io
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING

from .protocol import FdPacketIO, PeerClosedError, ProtocolError

if TYPE_CHECKING:
    from ahvbackup.core.config import Config

    from .handlers import BackendHandlers

HANDLERS_ENV = "AHVBACKUP_BACULA_HANDLERS"
CONFIG_ENV = "AHVBACKUP_CONFIG"

log = logging.getLogger("ahvbackup.bacula")
_early_signals: list[int] = []


def _note_signal(signum: int, frame: FrameType | None) -> None:
    _early_signals.append(signum)


class _LogWriter(io.TextIOBase):
    """Stands in for sys.stdout and sys.stderr: complete lines become log records."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name
        self._partial = ""
        self._busy = False

    @property
    def name(self) -> str:
        return f"<{self._name}>"

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self._busy:  # logging reporting its own trouble: drop it rather than loop
            return len(text)
        self._busy = True
        try:
            self._partial += text
            while "\n" in self._partial:
                line, self._partial = self._partial.split("\n", 1)
                if line.strip():
                    logging.getLogger("ahvbackup.bacula.stray").warning("%s: %s", self._name,
                                                                        line)
        finally:
            self._busy = False
        return len(text)


class _EarlyLog(logging.Handler):
    """Keeps records until the parameters say where the log goes."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 10_000:
            self.records.append(record)

    def replay(self) -> None:
        logging.getLogger().removeHandler(self)
        for record in self.records:
            logging.getLogger(record.name).handle(record)
        self.records.clear()


def _take_protocol_fds() -> tuple[int, int]:
    """Protocol pipes on fresh (non-inheritable) descriptors; 0 and 1 then read/write nothing."""
    read_fd, write_fd = os.dup(0), os.dup(1)
    with contextlib.suppress(OSError, AttributeError):  # a pipe of 1 MiB: a D packet at once
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 1 << 20)  # instead of 16 writes and wakeups
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    return read_fd, write_fd


def _install_crash_hooks(pio: FdPacketIO) -> None:
    def excepthook(etype: type[BaseException], value: BaseException,
                   tb: TracebackType | None) -> None:
        log.critical("the backend crashed", exc_info=(etype, value, tb))
        text = " ".join(f"internal error ({etype.__name__}: {value}); "
                        "the traceback is in debug_log".split())
        try:
            from ahvbackup.core.log import mask_secrets

            pio.send_command(mask_secrets(text)[:4000], kind="A")
        except (OSError, ValueError):
            pass

    def thread_hook(args: object) -> None:
        exc = getattr(args, "exc_value", None)
        log.error("a thread died: %r", exc, exc_info=exc if isinstance(exc, BaseException)
                  else None)

    def unraisable_hook(args: object) -> None:
        log.warning("unraisable exception: %r (%s)", getattr(args, "exc_value", None),
                    getattr(args, "err_msg", ""))

    import threading

    sys.excepthook = excepthook
    threading.excepthook = thread_hook
    sys.unraisablehook = unraisable_hook


def _hello(pio: FdPacketIO) -> tuple[str, str]:
    """Read ``Hello <plugin> <api>`` and answer it; returns (plugin, api)."""
    packet = pio.read_packet()
    words = packet.text.split() if packet.kind == "C" else []
    if len(words) < 2 or words[0] != "Hello":
        got = packet.text if packet.kind == "C" else f"a {packet.kind} packet"
        raise ProtocolError(f"expected 'Hello <plugin> <api>' first, got {got!r}")
    pio.send_command("Hello Bacula")
    return words[1], words[2] if len(words) > 2 else ""


def config_files() -> list[Path]:
    """Configuration files for the session: ``AHVBACKUP_CONFIG`` or the default file."""
    env = os.environ.get(CONFIG_ENV)
    if env is not None:
        return [Path(p) for p in env.split(os.pathsep) if p]
    from ahvbackup.core.config import DEFAULT_CONFIG_FILE

    return [DEFAULT_CONFIG_FILE] if DEFAULT_CONFIG_FILE.exists() else []


def load_handlers(spec: str | None) -> BackendHandlers:
    """The handlers named by ``module:attribute`` (a class, factory or instance), or the
    built-in ones. Failures come back as handlers that refuse every request, naming why."""
    import importlib

    from ahvbackup.core.errors import ConfigError

    from .handlers import BackendHandlers

    if not spec:
        from .job_handlers import JobHandlers

        return JobHandlers()
    module_name, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr or "handlers")
        made = obj if isinstance(obj, BackendHandlers) else obj()
        if not isinstance(made, BackendHandlers):
            raise TypeError(  # noqa: TRY301 - handled with the import errors below
                f"{type(made).__name__} is not a BackendHandlers")
    except (ImportError, AttributeError, TypeError) as err:
        problem = f"{HANDLERS_ENV}={spec}: cannot load the handlers ({err})"
        log.error("%s", problem)

        class _Refusing(BackendHandlers):
            async def backup(self, ctx: object, emitter: object) -> None:
                raise ConfigError(problem)

            estimate = listing = backup

            async def query(self, ctx: object) -> list[tuple[str, str]]:
                raise ConfigError(problem)

            async def restore_wanted(self, ctx: object, file: object) -> bool:
                raise ConfigError(problem)

        return _Refusing()
    return made


def _point_output_at(debug_log: Path | None) -> None:
    """Descriptor 1 (so child processes' output) to the debug log, else /dev/null.

    Descriptor 2 stays where the file daemon pointed it (see the module docstring)."""
    fd = -1
    if debug_log is not None:
        try:
            fd = os.open(debug_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError:
            fd = -1
    if fd < 0:
        fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.close(fd)


def _serve(read_fd: int, write_fd: int, *, plugin: str, api: str,
           handlers: BackendHandlers | None, early: _EarlyLog) -> int:
    import trio

    from ahvbackup.core.log import configure_logging

    from .channel import PacketChannel
    from .session import Session

    chosen = handlers if handlers is not None else load_handlers(os.environ.get(HANDLERS_ENV))
    files = config_files()

    def on_config(config: Config) -> None:
        configure_logging(verbose=config.verbose, debug_log=config.debug_log, stderr=False,
                          log_format=config.log_format)
        early.replay()
        _point_output_at(config.debug_log)

    async def watch_signals(session: Session, *,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                            ) -> None:
        with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGTERM) as signals:
            task_status.started()
            for signum in _early_signals:
                session.cancel(signal.Signals(signum).name)
            async for signum in signals:
                session.cancel(signal.Signals(signum).name)

    async def run() -> int:
        channel = PacketChannel(trio.lowlevel.FdStream(read_fd), trio.lowlevel.FdStream(write_fd))
        session = Session(channel, chosen, plugin=plugin, api=api, config_files=files,
                          on_config=on_config)
        async with trio.open_nursery() as nursery:
            await nursery.start(watch_signals, session)
            code = await session.run()
            nursery.cancel_scope.cancel()
        if session.terminated:
            await channel.drain_input()
        await channel.aclose()
        return code

    return trio.run(run)


def main(argv: Sequence[str] | None = None, *, handlers: BackendHandlers | None = None) -> int:
    """Run one metaplugin session on stdin/stdout; returns the exit status.

    ``--standalone health-check [--config FILE]... [--json]`` runs the pre-flight check
    instead, on an ordinary terminal, without Bacula (exit 0 ready, 2 configuration, 3
    unreachable); without ``--config`` it reads the files a session would."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--standalone"]:
        from ahvbackup.core.cli.health import standalone_main

        return standalone_main(args[1:], prog="ahvbackup-bacula-backend --standalone",
                               default_configs=config_files())
    read_fd, write_fd = _take_protocol_fds()
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, _note_signal)
    sys.stdout = _LogWriter("stdout")
    sys.stderr = _LogWriter("stderr")
    early = _EarlyLog()
    logging.getLogger().addHandler(early)
    logging.getLogger("ahvbackup").setLevel(logging.DEBUG)
    pio = FdPacketIO(read_fd=read_fd, write_fd=write_fd)
    _install_crash_hooks(pio)
    try:
        plugin, api = _hello(pio)
    except PeerClosedError as err:
        log.error("%s", err)
        return 1
    except ProtocolError as err:
        log.error("%s", err)
        with contextlib.suppress(OSError, ValueError):
            pio.send_command(str(err), kind="A")
        return 1
    log.info("Hello from the %s plugin (API %s)", plugin, api or "?")
    return _serve(read_fd, write_fd, plugin=plugin, api=api, handlers=handlers, early=early)
