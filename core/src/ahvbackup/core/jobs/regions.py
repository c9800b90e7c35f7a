"""Region maps as a hypervisor gives them, made fit to read: checked, then coalesced.

Backups and DR pushes both read a disk from its region map (the allocation map, or the
changed regions since a reference). This is the one place the map is checked and merged.
"""

from __future__ import annotations

__all__ = ["coalesce"]

from collections.abc import AsyncIterator

from ..errors import HypervisorError
from ..model import Region


async def coalesce(regions: AsyncIterator[Region], *, label: str, size: int
                   ) -> AsyncIterator[Region]:
    """Merge touching regions of the same type (the read-ahead splits at chunk boundaries).

    The hypervisor's map of disk `label` (`size` bytes) is checked first: a region that goes
    backwards, overlaps, has a negative extent or lies past the disk's end would store a disk
    with bytes missing or misplaced, so it fails the disk, naming the region."""
    pending: Region | None = None
    end = 0
    async for r in regions:
        problem = ("has a negative offset or length" if r.offset < 0 or r.length < 0
                   else f"starts before the previous region's end ({end})" if r.offset < end
                   else f"ends past the disk's end ({size})" if r.end > size
                   else "")
        if problem:
            raise HypervisorError(
                f"disk {label}: the hypervisor's region map is wrong: region at "
                f"{r.offset} (+{r.length}) {problem}; this disk cannot be read from it")
        if r.length == 0:
            continue
        end = r.end
        if pending is not None and pending.end == r.offset and pending.zero == r.zero:
            pending = Region(pending.offset, pending.length + r.length, r.zero)
            continue
        if pending is not None:
            yield pending
        pending = r
    if pending is not None:
        yield pending
