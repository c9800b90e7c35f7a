"""The contract between the metaplugin session and the work it drives.

The session (`ahvbackup.bacula.session`) speaks the protocol; a `BackendHandlers` object does
the job: backup, estimate, listing, query and restore. Implement the methods you support and
hand the object to `ahvbackup.bacula.backend.main(handlers=...)`. What the handlers see:

- `BackendContext`: the plugin name from ``Hello``, the Bacula job (`JobInfo`), the raw
  parameters and the validated `Config` (Job ``Level`` and ``Where`` already applied), and
  `messages` to put lines in the Bacula job log;
- `FileEmitter` (backup, estimate, listing): announce files and stream their data;
- `RestoreFile` plus an async iterator of data blocks (restore).

An `AhvBackupError` escaping a handler fails the whole job (an ``A`` packet); errors of one
VM or disk that should not stop the others are reported with ``ctx.messages.error(...)`` or by
letting `FileEmitter.file` fail that file alone. Cancellation (SIGUSR1 from the file daemon)
arrives as trio cancellation: release what you hold in ``finally`` blocks (the cleanup
ledger's `ReleaseStack` does so, shielded).
"""

from __future__ import annotations

__all__ = [
    "LEVELS",
    "BackendContext",
    "BackendHandlers",
    "FileEmitter",
    "JobInfo",
    "JobMessages",
    "RestoreFile",
]

import posixpath
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ahvbackup.core.errors import ConfigError

if TYPE_CHECKING:
    from ahvbackup.core.config import Config

#: Bacula Job Level letter -> our `level` configuration value
LEVELS = {"F": "full", "I": "incremental", "D": "differential"}


@dataclass(frozen=True, kw_only=True)
class JobInfo:
    """What the plugin says about the Bacula job in the ``Job`` block."""

    name: str = ""
    job_id: int | None = None
    type: str = ""  # B backup, R restore, E estimate, ...
    level_code: str | None = None  # F, I, D, ...
    since: int | None = None  # unix time of the last backup this level is based on
    where: str | None = None
    regex_where: str | None = None
    replace: str | None = None  # a always, w if newer, o if older, n never
    namespace: str | None = None  # e.g. "@ahvbackup"
    prev_job_name: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def level(self) -> str | None:
        """full, incremental or differential; None for other Bacula levels."""
        return LEVELS.get(self.level_code or "")


class JobMessages(Protocol):
    """Lines in the Bacula job log (also written to debug_log)."""

    async def info(self, text: str) -> None: ...

    async def warning(self, text: str) -> None: ...

    async def error(self, text: str) -> None:
        """A job error that does not stop the job (JobErrors goes up)."""
        ...


@dataclass(kw_only=True)
class BackendContext:
    """Everything a handler knows about the job it runs."""

    plugin: str  # the name the Hello carried ("ahvbackup", or whatever the FD build uses)
    api: str
    job: JobInfo
    params: tuple[tuple[str, str], ...]  # as received, in order (secrets included!)
    config: Config
    messages: JobMessages
    listing: str | None = None  # listing=<path> of a listing request
    query: str | None = None  # query=<name> of a query request
    accurate: bool = False

    @property
    def namespace(self) -> str:
        """Root of our virtual files: ``/@ahvbackup`` (or the Job's Namespace)."""
        ns = self.job.namespace or f"@{self.plugin or 'ahvbackup'}"
        return "/" + ns.strip("/")

    def path(self, *parts: str) -> str:
        """A virtual file name under the namespace: ``path(cluster, vm, "vm.json")``.

        Parts may not be empty, ``.``/``..`` or contain a ``/`` or a newline.
        """
        for part in parts:
            if not part or part in {".", ".."} or "/" in part or "\n" in part:
                raise ConfigError(f"virtual file name part {part!r} is not usable in a path")
        return posixpath.join(self.namespace, *parts)

    def unwhere(self, fname: str) -> str:
        """A restore file name without the Job's ``Where`` prefix (the name at backup)."""
        where = (self.job.where or "").rstrip("/")
        if where and fname.startswith(where + "/"):
            return fname[len(where):]
        return fname


@dataclass(frozen=True, kw_only=True)
class RestoreFile:
    """One file the plugin asks the backend to restore (``where`` already applied)."""

    fname: str
    type: str  # F regular, D directory, S symlink, ...
    size: int
    mode: int
    uid: int = 0
    gid: int = 0
    atime: int = 0
    mtime: int = 0
    ctime: int = 0
    link: str | None = None  # LSTAT target of a symlink


class FileEmitter(Protocol):
    """Announces files to Bacula during backup, estimate and listing."""

    mode: str  # "backup", "estimate" or "listing"

    @property
    def wants_data(self) -> bool:
        """True in backup: `file` streams `chunks`; estimate and listing send attributes only."""
        ...

    async def file(
        self,
        fname: str,
        *,
        size: int,
        mtime: float,
        chunks: AsyncIterable[bytes | bytearray | memoryview] | None = None,
        mode: int = 0o640,
    ) -> int:
        """Send one regular file; returns the number of data bytes sent.

        `size` is the STAT size: the exact size, or -1 when it is not known before the data
        (Bacula reads the data to its end either way and stores the size in its catalog).

        `chunks` may be any size (they are split into packets of at most 999999 bytes) and
        is read only in backup. An `AhvBackupError` raised by `chunks` fails this file in
        the job log (the error names it) and is re-raised.
        """
        ...

    async def directory(self, fname: str, *, mtime: float, mode: int = 0o750) -> None:
        """Send one directory entry (listing)."""
        ...


class BackendHandlers:
    """Override what you support; the defaults refuse the request with a clear message."""

    async def backup(self, ctx: BackendContext, emitter: FileEmitter) -> None:
        raise ConfigError(f"{ctx.plugin}: backup is not available in this backend")

    async def estimate(self, ctx: BackendContext, emitter: FileEmitter) -> None:
        """Defaults to `backup` with an emitter that sends attributes only."""
        await self.backup(ctx, emitter)

    async def listing(self, ctx: BackendContext, emitter: FileEmitter) -> None:
        raise ConfigError(f"{ctx.plugin}: listing is not available in this backend")

    async def query(self, ctx: BackendContext) -> Iterable[tuple[str, str]]:
        raise ConfigError(f"{ctx.plugin}: query {ctx.query!r} is not available in this backend")

    async def restore_wanted(self, ctx: BackendContext, file: RestoreFile) -> bool:
        """False to SKIP a file (e.g. not in restore_disks_only); called before its data."""
        return True

    async def restore_file(
        self, ctx: BackendContext, file: RestoreFile, data: AsyncIterator[memoryview]
    ) -> None:
        """Take one file's data. Each block is valid until the next one is requested."""
        raise ConfigError(f"{ctx.plugin}: restore is not available in this backend")

    async def restore_finish(self, ctx: BackendContext) -> None:
        """Every file of the restore was received (FINISH)."""

    async def end(self, ctx: BackendContext) -> None:
        """The job ends (END); the last chance to report in the job log. Also called, once,
        when the session ends without END (a protocol error, the file daemon gone, a
        cancel), where messages may no longer reach the job log: release what the job
        holds here."""
