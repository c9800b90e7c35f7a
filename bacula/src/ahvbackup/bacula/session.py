"""The backend's side of one metaplugin session, after ``Hello``: Job, Params, a start command
(backup, estimate, listing, query, restore), END and T, and cancellation.

The session owns the protocol; the work is done by a `BackendHandlers` object. Errors reach
the job log as packets, never on stderr:

- a bad parameter refuses ``Params`` with one ``E`` packet naming every bad key;
- an `AhvBackupError` escaping a handler fails the job with one ``A`` packet;
- a file whose data fails is failed alone with an ``E`` packet instead of its next data;
- ``ctx.messages`` sends ``I``/``W`` lines, and errors as ``E`` during backup (where the
  plugin reads them between files and carries on) or ``Q`` during restore (where an ``E``
  would be taken as the answer to the next file).
"""

from __future__ import annotations

__all__ = [
    "JOB_VIEWS",
    "SESSION_KEYS",
    "START_VIEWS",
    "Session",
    "parse_stat",
    "parse_tstamp",
    "plugin_string_for",
    "session_keys",
    "validate_params",
]

import contextlib
import logging
import re
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Sequence
from pathlib import Path

import trio

from ahvbackup.core.config import Config, ConfigSources, ModeView, assemble_config, pick_mode
from ahvbackup.core.config.assembly import VM_RESTORE_KEYS
from ahvbackup.core.errors import AhvBackupError, ConfigError, our_errors
from ahvbackup.core.plugins import Hooks

from .channel import PacketChannel
from .handlers import LEVELS, BackendContext, BackendHandlers, JobInfo, RestoreFile
from .protocol import PeerClosedError, ProtocolError, shown

log = logging.getLogger("ahvbackup.bacula")

#: parameters the file daemon adds for the session itself; never configuration keys
SESSION_KEYS = frozenset({"listing", "query", "accurate", "abort_on_error"})

_START = {
    "BackupStart": "backup",
    "EstimateStart": "estimate",
    "ListingStart": "listing",
    "QueryStart": "query",
    "RestoreStart": "restore",
}
_KEY = re.compile(r"(--)?[A-Za-z_][A-Za-z0-9_-]*")

# The mode registry's views for Bacula. A restore or estimate job replays the plugin string
# of the FileSet the backup used, so mode=backup there is the backup's, not a disagreement.
_BACKUP_MODES = ("backup", "estimate")
#: by the Job block's Type, checked at Params (before anything is touched)
JOB_VIEWS = {
    "B": ModeView("a Bacula Backup job", _BACKUP_MODES),
    "E": ModeView("a Bacula Estimate", ("estimate",), replayed=("backup",)),
    "R": ModeView("a Bacula Restore job", ("restore",), replayed=_BACKUP_MODES),
}
ANY_JOB = ModeView("this Bacula job")
#: by the start command, which picks the job that runs
START_VIEWS = {
    "backup": ModeView("BackupStart", ("backup",)),
    "estimate": ModeView("EstimateStart", ("estimate",), replayed=("backup",)),
    "restore": ModeView("RestoreStart", ("restore",), replayed=_BACKUP_MODES),
}
_S_IFREG = 0o100000
_S_IFDIR = 0o040000


# pure helpers ------------------------------------------------------------------------------

def _quote(value: str) -> str:
    """A plugin-string value that parses back to exactly `value` (single quotes are literal)."""
    if value and re.fullmatch(r"[A-Za-z0-9_@%+,./:=*?-]+", value):
        return value
    return "'" + value.replace("'", "'\"'\"'") + "'"


def plugin_string_for(plugin: str, params: Sequence[tuple[str, str]]) -> str:
    """Rebuild the FileSet's plugin string from the parameters the plugin sent one by one."""
    body = " ".join(f"{k}={_quote(v)}" for k, v in params)
    return f"{plugin or 'ahvbackup'}: {body}"


def validate_params(
    plugin: str,
    params: Sequence[tuple[str, str]],
    *,
    job: JobInfo,
    config_files: Sequence[Path] = (),
) -> Config:
    """Check the parameters with the configuration schema; one `ConfigError` lists all problems.

    Session parameters (`SESSION_KEYS`) are left out. The Job's ``Level`` (F/I/D) and
    ``Where`` win over the plugin string, as Bacula decides those per job. Driver and hook
    plugin keys are accepted like core keys, and `mode=` must be one the Job's type runs
    (`JOB_VIEWS`), all through the same assembly as the command line.
    """
    bad = [k for k, _ in params if not _KEY.fullmatch(k)]
    if bad:
        raise ConfigError("; ".join(f"plugin string: {shown(k)}: not a parameter name"
                                    for k in bad))
    config_params = [(k, v) for k, v in params if k.lower() not in SESSION_KEYS]
    if _restores_a_vm(config_params, config_files):
        config_params.append(("target", "ahv"))
    overrides: dict[str, object] = {}
    if job.level_code in LEVELS:
        overrides["level"] = LEVELS[job.level_code]
    if job.where:
        overrides["where"] = job.where
    sources = ConfigSources(files=tuple(config_files),
                            plugin_string=plugin_string_for(plugin, config_params),
                            overrides=overrides)
    return assemble_config(sources, hooks=Hooks(), view=JOB_VIEWS.get(job.type, ANY_JOB))


def _restores_a_vm(params: Sequence[tuple[str, str]], config_files: Sequence[Path]) -> bool:
    """A plugin string that shapes the restored VM (``target_cluster``, ``network_map``, ...:
    the whitepaper's FileSet 8.3, and the restore options) restores to AHV when no
    ``target`` is set anywhere: those keys mean nothing for disk images."""
    keys = {k.lower().lstrip("-").replace("-", "_") for k, _ in params}  # --memory-mib too
    if "target" in keys or not keys & set(VM_RESTORE_KEYS):
        return False
    files_only = assemble_config(ConfigSources(files=tuple(config_files)), hooks=Hooks(),
                                 view=ANY_JOB)
    return files_only.sources.get("target", "default") == "default"


def parse_stat(text: str) -> tuple[str, int, int, int, int, int]:
    """``F 1048576 0 0 100640 1 [fi]`` -> (type, size, uid, gid, mode, nlinks)."""
    fields = text.split()
    bad = ProtocolError(f"bad STAT from the file daemon: {shown(text)}")
    if len(fields) < 6 or len(fields[0]) != 1:
        raise bad
    try:
        return (fields[0], int(fields[1]), int(fields[2]), int(fields[3]),
                int(fields[4], 8), int(fields[5]))
    except ValueError:
        raise bad from None


def parse_tstamp(text: str) -> tuple[int, int, int]:
    """``<atime> <mtime> <ctime>`` -> three ints."""
    fields = text.split()
    bad = ProtocolError(f"bad TSTAMP from the file daemon: {shown(text)}")
    if len(fields) != 3:
        raise bad
    try:
        return int(fields[0]), int(fields[1]), int(fields[2])
    except ValueError:
        raise bad from None


def _describe(exc: BaseException) -> tuple[str, bool]:
    """(one-line message, is it ours) for an exception that escaped a handler."""
    errs = our_errors(exc)
    if errs:
        return "; ".join(str(e) for e in errs), True
    return f"internal error ({type(exc).__name__}: {exc}); the traceback is in debug_log", False


# messages and the emitter -------------------------------------------------------------------

class _Messages:
    def __init__(self, session: Session) -> None:
        self._s = session

    async def info(self, text: str) -> None:
        log.info("%s", text)
        await self._s.channel.send_message("I", text)

    async def warning(self, text: str) -> None:
        log.warning("%s", text)
        await self._s.channel.send_message("W", text)

    async def error(self, text: str) -> None:
        log.error("%s", text)
        lock = self._s.file_lock
        in_file = lock.statistics().owner is trio.lowlevel.current_task()
        if self._s.phase in {"backup", "estimate", "listing"} and not in_file:
            async with lock:  # between files: never inside another task's file
                await self._s.channel.send_message("E", text)
        else:  # during restore, or from inside this task's own file: Q never breaks a read
            await self._s.channel.send_message("Q", text)


class _Emitter:
    def __init__(self, session: Session, mode: str) -> None:
        self._s = session
        self.mode = mode
        self.files = 0
        self.bytes = 0

    @property
    def wants_data(self) -> bool:
        return self.mode == "backup"

    async def _attributes(self, fname: str, stat: str, mtime: float) -> None:
        if not fname or "\n" in fname:
            raise ProtocolError(f"file name {fname!r} cannot be sent to Bacula")
        t = int(mtime)
        ch = self._s.channel
        await ch.send_command(f"FNAME:{fname}")
        await ch.send_command(f"STAT:{stat}")
        await ch.send_command(f"TSTAMP:{t} {t} {t}")
        await ch.send_eod()

    async def file(
        self,
        fname: str,
        *,
        size: int,
        mtime: float,
        chunks: AsyncIterable[bytes | bytearray | memoryview] | None = None,
        mode: int = 0o640,
    ) -> int:
        if size < -1:  # -1: not known before the data (as Bacula's bpipe announces it)
            raise ValueError(f"{fname}: size must be >= 0, or -1 for unknown (got {size})")
        ch = self._s.channel
        async with self._s.file_lock:
            await self._attributes(fname, f"F {size} 0 0 {_S_IFREG | mode:o} 1", mtime)
            self.files += 1
            if not self.wants_data:
                return 0
            await ch.send_command("DATA")
            sent = 0
            if chunks is not None:
                try:
                    async for chunk in chunks:
                        sent += await ch.send_data(chunk)
                except PeerClosedError:
                    raise
                except AhvBackupError as err:
                    log.error("%s: failed after %d bytes: %s", fname, sent, err)
                    await ch.send_message("E", f"{fname}: {err}")
                    raise
            await ch.send_eod()
            self.bytes += sent
            if sent != size:
                log.debug("%s: announced %d bytes, sent %d", fname, size, sent)
            return sent

    async def directory(self, fname: str, *, mtime: float, mode: int = 0o750) -> None:
        name = fname if fname.endswith("/") else fname + "/"
        async with self._s.file_lock:
            await self._attributes(name, f"D 0 0 0 {_S_IFDIR | mode:o} 1", mtime)
            self.files += 1
            if self.wants_data:
                await self._s.channel.send_eod()  # no data for a directory


class _DataBlocks:
    """The D packets of one restored file, up to its end of data."""

    def __init__(self, channel: PacketChannel, *, present: bool) -> None:
        self._ch = channel
        self.done = not present
        self.bytes = 0

    def __aiter__(self) -> _DataBlocks:
        return self

    async def __anext__(self) -> memoryview:
        if self.done:
            raise StopAsyncIteration
        packet = await self._ch.receive()
        if packet.kind == "D":
            self.bytes += len(packet.payload)
            return memoryview(packet.payload)
        if packet.kind == "F":
            self.done = True
            raise StopAsyncIteration
        raise ProtocolError(f"expected restore data or its end, got a {packet.kind} packet")

    async def drain(self) -> None:
        async for _ in self:
            pass


# the session -----------------------------------------------------------------------------------

ConfigCallback = Callable[[Config], None]


class Session:
    """One metaplugin session after the Hello exchange. `run` returns the exit status."""

    def __init__(
        self,
        channel: PacketChannel,
        handlers: BackendHandlers,
        *,
        plugin: str,
        api: str,
        config_files: Sequence[Path] = (),
        on_config: ConfigCallback | None = None,
    ) -> None:
        self.channel = channel
        self.handlers = handlers
        self.plugin = plugin
        self.api = api
        self.config_files = tuple(config_files)
        self.on_config = on_config
        self.job = JobInfo()
        self.params: list[tuple[str, str]] = []
        self.ctx: BackendContext | None = None
        self.refused: str | None = None
        self.phase = "setup"
        self.file_lock = trio.Lock()
        self.cancelled_by: str | None = None
        #: no file is half sent or half received (a missing END is then harmless)
        self.data_complete = False
        #: the file daemon sent T (it closes the pipe next)
        self.terminated = False
        #: the handlers' `end` ran (at END, or when the session ended without it)
        self.ended = False
        self._scope = trio.CancelScope()

    # control ------------------------------------------------------------------------------
    def cancel(self, reason: str) -> None:
        """Cancel the running work (SIGUSR1 from the file daemon); cleanup code still runs."""
        if self.cancelled_by is None:
            self.cancelled_by = reason
            log.warning("cancel requested (%s): stopping the job and releasing its resources",
                        reason)
        self._scope.cancel()

    async def run(self) -> int:
        started = time.monotonic()
        code = 1
        with self._scope:
            try:
                code = await self._loop()
            except PeerClosedError as err:
                code = self._peer_closed(err)
            except ProtocolError as err:
                log.error("protocol error: %s", err)
                with trio.move_on_after(2):
                    await self._send_quietly("A", f"protocol error: {err}")
                code = 1
        await self._end_without_end()
        if self._scope.cancelled_caught:
            log.info("job cancelled (%s); cleanup done in %.1f s", self.cancelled_by,
                     time.monotonic() - started)
            code = 0
        return code

    async def _end_without_end(self) -> None:
        """A session that ends without END (a protocol error, the file daemon gone, a cancel,
        T alone) still ends its job: the handlers drop what it holds (a restore's spool)."""
        if self.ended or self.ctx is None:
            return
        self.ended = True
        ctx = self.ctx
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            try:
                await self.handlers.end(ctx)
            except Exception as exc:  # the session is over: nothing can be reported
                log.warning("end of job without END failed: %s", _describe(exc)[0])

    def _peer_closed(self, err: PeerClosedError) -> int:
        """The exit status when the file daemon went away: 0 when nothing was cut short."""
        if self.refused:
            log.info("%s", err)
            return 0
        if self.data_complete and self.phase == "restore":  # FINISH never came
            log.warning("%s, without END and before FINISH: every file received was whole; "
                        "what the handlers hold until FINISH (a restore's spooled streams) is "
                        "dropped", err)
            return 0
        if self.data_complete:
            # Bacula 13.x and 15.x skip END after a job with errors; every file was whole
            log.warning("%s, without END (the file daemon does this after job errors); "
                        "every file of the job was complete", err)
            return 0
        log.error("%s", err)
        return 1

    async def _send_quietly(self, kind: str, text: str) -> None:
        with contextlib.suppress(PeerClosedError):
            await self.channel.send_message(kind, text)

    # the command loop -------------------------------------------------------------------
    async def _loop(self) -> int:
        pending: str | None = None
        while True:
            if pending is None:
                packet = await self.channel.receive()
                if packet.kind == "T":
                    log.info("terminated by the file daemon (T)")
                    self.terminated = True
                    return 0
                if packet.kind != "C":
                    raise ProtocolError(f"expected a command, got a {packet.kind} packet")
                cmd = packet.text
            else:
                cmd, pending = pending, None
            log.debug("command %r", cmd)
            if cmd == "Job":
                await self._job_block()
            elif cmd == "Params":
                await self._params_block()
            elif cmd in _START:
                pending = await self._start(_START[cmd])
            elif cmd == "END":
                await self._end()
            else:
                raise ProtocolError(f"unknown command {shown(cmd)}")

    async def _key_values(self, block: str) -> list[tuple[str, str]]:
        out = []
        while (text := await self.channel.receive_command()) is not None:
            key, sep, value = text.partition("=")
            out.append((key, value if sep else "1"))
        log.debug("%s block: %s", block, ", ".join(k for k, _ in out))
        return out

    async def _job_block(self) -> None:
        values = dict(await self._key_values("Job"))
        known = {"Name", "JobID", "Type", "Level", "Since", "Where", "RegexWhere", "Replace",
                 "Namespace", "PrevJobName"}

        def number(key: str) -> int | None:
            raw = values.get(key)
            if raw is None or raw == "":
                return None
            try:
                return int(raw)
            except ValueError:
                raise ProtocolError(f"Job: {key}={shown(raw)} is not a number") from None

        self.job = JobInfo(
            name=values.get("Name", ""),
            job_id=number("JobID"),
            type=values.get("Type", ""),
            level_code=values.get("Level") or None,
            since=number("Since"),
            where=values.get("Where") or None,
            regex_where=values.get("RegexWhere") or None,
            replace=values.get("Replace") or None,
            namespace=values.get("Namespace") or None,
            prev_job_name=values.get("PrevJobName") or None,
            extra={k: v for k, v in values.items() if k not in known},
        )
        log.info("job %s (JobId %s) type=%s level=%s", self.job.name, self.job.job_id,
                 self.job.type, self.job.level or self.job.level_code)
        await self.channel.send_eod()

    async def _params_block(self) -> None:
        self.params = await self._key_values("Params")
        if await self._configure():
            await self.channel.send_eod()

    async def _configure(self) -> bool:
        """Validate the parameters and build the context; False (E sent) when refused."""
        try:
            config = validate_params(self.plugin, self.params, job=self.job,
                                     config_files=self.config_files)
            if self.on_config is not None:
                self.on_config(config)
        except ConfigError as err:
            self.refused = str(err)
            log.error("parameters refused: %s", err)
            await self.channel.send_message("E", str(err))
            return False
        session = session_keys(self.params)
        self.ctx = BackendContext(
            plugin=self.plugin,
            api=self.api,
            job=self.job,
            params=tuple(self.params),
            config=config,
            messages=_Messages(self),
            listing=session.get("listing"),
            query=session.get("query"),
            accurate=session.get("accurate", "0") not in {"0", ""},
        )
        for warning in config.warnings:
            await self.ctx.messages.warning(warning)
        return True

    async def _guard(self, what: str, work: Callable[[], Awaitable[None]]) -> bool:
        """Run handler work; report what escapes it with one A packet. True when it succeeded."""
        try:
            await work()
        except Exception as exc:  # the job boundary: reported as a packet
            if any(isinstance(e, PeerClosedError) for e in our_errors(exc) or ()):
                raise
            text, ours = _describe(exc)
            if ours:
                log.error("%s failed: %s", what, text)
            else:
                log.exception("%s failed with an internal error", what)
            await self.channel.send_message("A", f"{what} failed: {text}")
            return False
        return True

    async def _start(self, what: str) -> str | None:
        if self.ctx is None:
            if self.refused is not None:
                await self.channel.send_message("A", f"{what} refused: the parameters were "
                                                      "refused")
                return None
            if not await self._configure():  # no Params block: files and defaults only
                return None
        ctx = self.ctx
        assert ctx is not None
        if what in START_VIEWS:
            try:  # the mode this start command runs; a disagreeing mode= fails the job here
                ctx.config = pick_mode(ctx.config, START_VIEWS[what])
            except ConfigError as err:
                log.error("%s refused: %s", what, err)
                await self.channel.send_message("A", f"{what} refused: {err}")
                return None
        await self.channel.send_eod()
        self.phase = what
        log.info("%s started", what)
        if what == "restore":
            self.data_complete = True
            return await self._restore_loop(ctx)
        if what == "query":
            answers: list[tuple[str, str]] = []

            async def run_query() -> None:
                answers.extend(await self.handlers.query(ctx))

            if await self._guard("query", run_query):
                for key, value in answers:
                    await self.channel.send_command(f"{key}={value}")
                await self.channel.send_eod()
            return None
        emitter = _Emitter(self, what)
        method = {"backup": self.handlers.backup, "estimate": self.handlers.estimate,
                  "listing": self.handlers.listing}[what]
        if await self._guard(what, lambda: method(ctx, emitter)):
            async with self.file_lock:
                await self.channel.send_eod()  # no more files
            self.data_complete = True
            log.info("%s done: %d file(s), %d data bytes", what, emitter.files, emitter.bytes)
        return None

    async def _restore_loop(self, ctx: BackendContext) -> str | None:
        pending: str | None = None
        while True:
            if pending is None:
                cmd = await self.channel.receive_command()
                if cmd is None:
                    raise ProtocolError("end of data where a restore command was due")
            else:
                cmd, pending = pending, None
            if cmd.startswith("FNAME:"):
                pending = await self._restore_one(ctx, cmd[len("FNAME:"):])
            elif cmd == "FINISH":
                ok = await self._guard("restore", lambda: self.handlers.restore_finish(ctx))
                if ok:
                    await self.channel.send_eod()
                self.phase = "end"
                return None
            elif cmd in {"ACL", "XATTR"} or cmd.startswith(("RESTOREOBJ:", "RESTOREOBJ_LEN:")):
                if cmd.startswith("RESTOREOBJ:"):
                    nxt = await self.channel.receive_command()
                    if nxt is None or not nxt.startswith("RESTOREOBJ_LEN:"):
                        raise ProtocolError(f"expected RESTOREOBJ_LEN after {shown(cmd)}")
                log.debug("restore: %s ignored", cmd)
                await _DataBlocks(self.channel, present=True).drain()
                await self.channel.send_command("OK")
            elif cmd in {"END", "Job", "Params"} or cmd in _START:
                return cmd
            else:
                raise ProtocolError(f"unknown restore command {shown(cmd)}")

    async def _restore_one(self, ctx: BackendContext, fname: str) -> str | None:
        """One FNAME block; returns the next command when the file had no DATA."""
        self.data_complete = False
        attrs: dict[str, str] = {}
        while (text := await self.channel.receive_command()) is not None:
            key, sep, value = text.partition(":")
            if not sep:
                raise ProtocolError(f"unexpected restore attribute {shown(text)} for "
                                    f"{shown(fname)}")
            attrs[key] = value
        if "STAT" not in attrs:
            raise ProtocolError(f"no STAT for restore file {fname}")
        ftype, size, uid, gid, mode, _ = parse_stat(attrs["STAT"])
        atime, mtime, ctime = parse_tstamp(attrs["TSTAMP"]) if "TSTAMP" in attrs else (0, 0, 0)
        file = RestoreFile(fname=fname, type=ftype, size=size, mode=mode, uid=uid, gid=gid,
                           atime=atime, mtime=mtime, ctime=ctime, link=attrs.get("LSTAT"))
        wanted = [True]
        failure: str | None = None  # a file refused (a name climbing out of where) fails alone
        try:
            wanted[0] = await self.handlers.restore_wanted(ctx, file)
        except Exception as exc:  # reported as this file's error, the job goes on
            if any(isinstance(e, PeerClosedError) for e in our_errors(exc) or ()):
                raise
            failure, ours = _describe(exc)
            if not ours:
                log.exception("restore of %s failed with an internal error", fname)
            log.error("restore of %s refused: %s", fname, failure)
            wanted[0] = False
        await self.channel.send_command("OK" if wanted[0] else "SKIP")
        log.info("restore %s: %s (%d bytes)", "extract" if wanted[0] else "skip", fname, size)

        packet = await self.channel.receive()
        has_data = packet.kind == "C" and packet.text == "DATA"
        if not has_data and packet.kind != "C":
            raise ProtocolError(f"expected DATA or a command after {fname}, got a "
                                f"{packet.kind} packet")
        blocks = _DataBlocks(self.channel, present=has_data)
        if wanted[0]:
            try:
                await self.handlers.restore_file(ctx, file, blocks)
            except Exception as exc:  # reported as this file's error
                errs = our_errors(exc) or []
                if any(isinstance(e, PeerClosedError) for e in errs):
                    raise
                failure, ours = _describe(exc)
                if not ours:
                    log.exception("restore of %s failed with an internal error", fname)
                log.error("restore of %s failed: %s", fname, failure)
        await blocks.drain()
        self.data_complete = True
        if has_data:
            if failure is None:
                await self.channel.send_command("OK")
            else:
                await self.channel.send_message("E", f"{fname}: {failure}")
            return None
        if failure is not None:
            await self.channel.send_message("Q", f"{fname}: {failure}")
        return packet.text

    async def _end(self) -> None:
        self.phase = "end"
        ctx = self.ctx
        self.ended = True
        if ctx is not None:
            await self._guard("end of job", lambda: self.handlers.end(ctx))
        await self.channel.send_eod()


def session_keys(params: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The session parameters among `params` (lower-cased keys)."""
    return {k.lower(): v for k, v in params if k.lower() in SESSION_KEYS}
