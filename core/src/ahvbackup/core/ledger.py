"""The cleanup ledger: every remote resource is written down before it is relied on.

A job records a snapshot, image, volume group or session here *before* creating it (with an id it
chose itself, or the name it will carry), releases everything in reverse order when it ends, on
success, error or cancellation alike, and deletes each record once the release succeeded. What a
killed process left behind is still on disk, and the next start sweeps it
(`job_cleanup_on_abort=yes`). One file per record keeps concurrent jobs out of each other's way.
"""

from __future__ import annotations

__all__ = ["Ledger", "Record", "ReleaseStack", "release_record", "sweep_orphans"]

import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .fsutil import atomic_write_json, ensure_dir, fsync_dir
from .log import in_phase

if TYPE_CHECKING:
    from .plugins import Hooks

log = logging.getLogger("ahvbackup.ledger")

#: how long a release may take once the job is being cancelled (shielded from the cancellation)
RELEASE_TIMEOUT = 120.0
RELEASE_ATTEMPTS = 4
RELEASE_BACKOFF = 0.5  # seconds before the second attempt, doubled for each next one


@dataclass(frozen=True)
class Record:
    kind: str  # "snapshot" | "image" | "volume_group" | "iscsi_attachment" | ...
    resource_id: str
    owner: str  # the job id
    pid: int
    scope: dict[str, Any] = field(default_factory=dict)  # e.g. cluster uuid, VM name
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)

    def describe(self) -> str:
        where = ", ".join(f"{k}={v}" for k, v in sorted(self.scope.items()))
        return f"{self.kind} {self.resource_id}" + (f" ({where})" if where else "")


def owner_alive(pid: int) -> bool:
    """Whether process `pid` (which wrote a record or a partial file) is an ahvbackup process
    still running; a reused pid of another program does not count."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a reused pid that is not one of ours does not own the record
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"ahvbackup" in cmdline or b"pytest" in cmdline


class Ledger:
    """The records of remote resources in flight. `hooks` hear of each one recorded and
    released (``resource_created``, ``resource_released``, and a ``metric`` per release)."""

    def __init__(self, state_dir: Path, *, hooks: Hooks | None = None) -> None:
        ensure_dir(state_dir, key="state_dir", writable=True)
        self.dir = ensure_dir(state_dir / "ledger", key="state_dir", writable=True)
        self.hooks = hooks

    def record(self, kind: str, resource_id: str, *, owner: str, **scope: Any) -> Record:
        rec = Record(kind=kind, resource_id=resource_id, owner=owner, pid=os.getpid(), scope=scope)
        atomic_write_json(self.dir / f"{rec.id}.json", asdict(rec))
        log.debug("ledger: recorded %s", rec.describe())
        if self.hooks is not None:
            self.hooks.resource_created(kind=kind, resource_id=resource_id, owner=owner)
        return rec

    def released(self, rec: Record, *, ok: bool) -> None:
        """`rec` was released (`ok`), or could not be and stays owed to the next sweep."""
        if ok:
            self.forget(rec)
        if self.hooks is None:
            return
        self.hooks.resource_released(kind=rec.kind, resource_id=rec.resource_id,
                                     owner=rec.owner, ok=ok)
        self.hooks.metric(name="resources_released" if ok else "resources_left", value=1,
                          labels={"kind": rec.kind})

    def forget(self, rec: Record) -> None:
        (self.dir / f"{rec.id}.json").unlink(missing_ok=True)
        fsync_dir(self.dir)

    def records(self) -> list[Record]:
        out = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                out.append(Record(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError) as err:
                log.warning("ledger: unreadable record %s skipped (%s)", path.name, err)
        return sorted(out, key=lambda r: r.created)

    def orphans(self) -> list[Record]:
        """Records whose owning process is gone: what a killed job left behind."""
        return [r for r in self.records() if not owner_alive(r.pid)]


Releaser = Callable[[Record], Awaitable[None]]


class ReleaseStack:
    """Holds what one job (or VM) recorded; `aclose` releases it all in reverse order.

    Releases run shielded from cancellation, with a timeout each, so a cancelled job still cleans
    up. A failed release is logged and its record kept, so the next sweep retries it.
    """

    def __init__(self, ledger: Ledger, *, owner: str, releaser: Releaser) -> None:
        self.ledger = ledger
        self.owner = owner
        self.releaser = releaser
        self._held: list[Record] = []
        #: what `aclose` could not release, even after retries (the next sweep retries it)
        self.left: list[Record] = []

    def left_behind(self) -> list[str]:
        """One warning per resource `aclose` had to leave, for the job summary."""
        return [f"{rec.describe()} could not be released and is left on the cluster; the "
                "next run's sweep releases it" for rec in self.left]

    def record(self, kind: str, resource_id: str, **scope: Any) -> Record:
        rec = self.ledger.record(kind, resource_id, owner=self.owner, **scope)
        self._held.append(rec)
        return rec

    def keep(self, rec: Record) -> None:
        """Let go of `rec` without releasing it: the resource outlives the job (a snapshot that
        becomes the next incremental's reference), so it leaves the ledger too, or a sweep
        would delete it."""
        if rec in self._held:
            self._held.remove(rec)
        self.ledger.forget(rec)

    def held(self, kind: str, resource_id: str) -> Record | None:
        return next(
            (r for r in self._held if r.kind == kind and r.resource_id == resource_id), None
        )

    async def release(self, rec: Record) -> bool:
        """Release one record now (for resources whose life ends before the job's)."""
        self._held.remove(rec)
        return await release_record(self.ledger, rec, self.releaser)

    async def aclose(self) -> list[Record]:
        """Release everything held, newest first; returns the records that could not be released."""
        failed = []
        while self._held:
            rec = self._held.pop()
            if not await release_record(self.ledger, rec, self.releaser):
                failed.append(rec)
        self.left += failed
        return failed

    async def __aenter__(self) -> ReleaseStack:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def release_record(ledger: Ledger, rec: Record, releaser: Releaser) -> bool:
    """Release `rec`, retried with backoff (a delete that meets a 500 or a busy cluster
    usually works a moment later); kept in the ledger for the next sweep if it never does."""
    with in_phase("cleanup"), trio.CancelScope(shield=True), \
            trio.move_on_after(RELEASE_TIMEOUT) as scope:
        delay = RELEASE_BACKOFF
        for attempt in range(1, RELEASE_ATTEMPTS + 1):
            try:
                await releaser(rec)
            except Exception as err:
                if attempt == RELEASE_ATTEMPTS:
                    log.warning("could not release %s after %d attempts: %s (kept for the "
                                "next sweep)", rec.describe(), attempt, err)
                    ledger.released(rec, ok=False)
                    return False
                log.info("releasing %s failed (%s); retrying in %.1f s", rec.describe(), err,
                         delay)
                await trio.sleep(delay)
                delay *= 2
                continue
            ledger.released(rec, ok=True)
            log.debug("released %s", rec.describe())
            return True
    if scope.cancelled_caught:
        log.warning("releasing %s timed out (kept for the next sweep)", rec.describe())
    ledger.released(rec, ok=False)
    return False


async def sweep_orphans(ledger: Ledger, releaser: Releaser) -> list[Record]:
    """Release, newest first, what killed jobs left on the ledger (every job that makes
    things on the cluster starts with it); returns what could not be released."""
    orphans = ledger.orphans()
    if ledger.hooks is not None:
        ledger.hooks.metric(name="sweep_found", value=len(orphans), labels={})
    if orphans:
        log.warning("cleaning up %d resource(s) left by an interrupted job", len(orphans))
    left = []
    for rec in reversed(orphans):
        log.info("releasing leftover %s", rec.describe())
        ok = await release_record(ledger, rec, releaser)
        if ledger.hooks is not None:
            ledger.hooks.metric(name="sweep_released" if ok else "sweep_left", value=1,
                                labels={"kind": rec.kind})
        if not ok:
            left.append(rec)
    return left
