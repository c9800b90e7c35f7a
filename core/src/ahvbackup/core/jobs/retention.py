"""Retention in the repository: keep N fulls and/or N days, never orphaning a delta.

A backup is let go when a configured rule lets it go (older than the `keep_fulls`-th newest full,
or older than `keep_days` days), but never while a kept backup still builds on it (directly or
down its chain), never while the VM's state names it as a reference, and never the newest backup
of a VM. Removal goes newest first, so an interrupted run never leaves a delta without its base.
"""

from __future__ import annotations

__all__ = ["apply_retention", "is_full", "needed", "references_of"]

import logging
import time
from collections.abc import Iterable, Mapping

from ..drivers import StoredBackup
from .runtime import Runtime

log = logging.getLogger("ahvbackup.retention")


def references_of(backup: StoredBackup) -> set[str]:
    """The backups `backup`'s delta streams build on directly."""
    return {d.reference_backup for d in backup.manifest.streams if d.reference_backup}


def is_full(backup: StoredBackup) -> bool:
    """Every stream of the backup stands alone (no reference)."""
    return not references_of(backup)


def needed(by_id: Mapping[str, StoredBackup], roots: Iterable[str]) -> set[str]:
    """`roots` and every backup they build on, down to the fulls."""
    out: set[str] = set()
    todo = [r for r in roots if r]
    while todo:
        bid = todo.pop()
        if bid in out:
            continue
        out.add(bid)
        b = by_id.get(bid)
        if b is not None:
            todo.extend(references_of(b))
    return out


def state_roots(rt: Runtime, vm_uuid: str) -> set[str]:
    """Backups the VM's state builds the next delta on."""
    state, _ = rt.states.load(vm_uuid)
    if state is None:
        return set()
    return {b for d in state.disks.values() for b in (d.backup_id, d.full_backup_id) if b}


async def apply_retention(
    rt: Runtime, *, vm_uuid: str, keep_fulls: int, keep_days: int, now: float | None = None
) -> list[str]:
    """Remove the VM's backups the rules let go; returns their ids (newest first)."""
    if not rt.sink.manages_backups or not (keep_fulls or keep_days):
        return []
    backups = await rt.sink.backups(vm_uuid)
    if not backups:
        return []
    by_id = {b.backup_id: b for b in backups}
    now = time.time() if now is None else now
    expired: set[str] = set()
    fulls = [b for b in backups if is_full(b)]
    if keep_fulls and len(fulls) > keep_fulls:
        oldest_kept = fulls[-keep_fulls]
        expired |= {b.backup_id for b in backups
                    if (b.created, b.backup_id) < (oldest_kept.created, oldest_kept.backup_id)}
    if keep_days:
        limit = now - keep_days * 86400
        expired |= {b.backup_id for b in backups if b.created < limit}
    expired.discard(backups[-1].backup_id)
    kept = [b.backup_id for b in backups if b.backup_id not in expired]
    protected = needed(by_id, [*kept, *state_roots(rt, vm_uuid)])
    doomed = [b for b in reversed(backups) if b.backup_id in expired - protected]
    for b in doomed:
        await rt.sink.remove(b)
        log.info("retention: removed backup %s of %s (created %s)", b.backup_id, b.vm_name,
                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b.created)))
    return [b.backup_id for b in doomed]
