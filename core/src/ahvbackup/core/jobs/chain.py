"""Chains: a full and the deltas on top of it, resolved into one disk image.

A disk of a backup is a chain of streams: its own stream, the stream its manifest names as its
reference, and so on down to a full. Restoring a point must not cost more with every link, so
the chain is planned before anything is written: every stream is indexed (record headers only),
and walking from the newest link to the oldest each byte range is taken from the newest record
that covers it. Each output range is then written once, in disk order, and each record's payload
is read at most once (checked against its checksum as it is read).

When a link is a local file and its payloads are plain (not compressed, not encrypted), a
range is handed to the writer as a `SourceRange` of that file after its record was checked, so
a file target can copy it in the kernel instead of taking the bytes through this process.
"""

from __future__ import annotations

__all__ = ["ChainImage", "Link", "Written", "bind_stream", "resolve_chain"]

import bisect
import heapq
import io
import logging
import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from ..drivers import Sink, SourceRange, StoredBackup
from ..errors import SinkError, StreamFormatError
from ..manifest import DiskEntry
from ..stream import DATA, IndexEntry, Keyring, StreamHeader, StreamIndex, Trailer, index_stream

Progress = Callable[[int], None]
log = logging.getLogger("ahvbackup.restore")


class RangeWriter(Protocol):
    """Where a chain's image goes, range by range in disk order (blocking calls)."""

    def write_at(self, offset: int, data: memoryview) -> None: ...

    def zero(self, offset: int, length: int) -> None: ...

    def copy(self, offset: int, source: SourceRange) -> None: ...


@dataclass(frozen=True)
class Written:
    """What `ChainImage.write_to` gave: data bytes (`copied` of them as `SourceRange`s) and
    zero bytes."""

    data: int
    zero: int
    copied: int


def _local_fd(f: BinaryIO) -> int | None:
    """The descriptor of a local regular file, else None (a pipe, a socket, a Bacula stream)."""
    try:
        fd = f.fileno()
        return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except (OSError, io.UnsupportedOperation):
        return None


@dataclass(frozen=True)
class Link:
    """One stream of a chain: a backup and its manifest entry for the disk."""

    backup: StoredBackup
    entry: DiskEntry

    @property
    def label(self) -> str:
        return self.entry.label

    @property
    def name(self) -> str:
        return f"backup {self.backup.backup_id} ({self.backup.vm_name}/{self.label})"


def bind_stream(link: Link, header: StreamHeader, trailer: Trailer | None = None) -> None:
    """The stream must be the one its manifest entry names: every field that decides which
    bytes a restore writes is compared, and a disagreement fails verification naming it."""
    m, e, h = link.backup.manifest, link.entry, header
    wanted = [
        ("vm uuid", m.vm.uuid, h.vm_uuid),
        ("backup_id", m.backup_id, h.backup_id),
        ("disk uuid", e.uuid, h.disk_uuid),
        ("disk size", e.size, h.disk_size),
        ("kind", e.kind, h.kind),
        ("reference_backup", e.reference_backup, h.reference_backup_id),
    ]
    if h.disk_label:
        wanted.append(("label", e.label, h.disk_label))
    if e.stream_id:  # format 1 manifests of the first releases may lack it
        wanted.append(("stream_id", e.stream_id, h.stream_id))
    if e.digest and trailer is not None:
        wanted.append(("digest", e.digest, trailer.digest_hex))
    wrong = [f"{what}: manifest says {want!r}, stream says {got!r}"
             for what, want, got in wanted if want != got]
    if wrong:
        raise StreamFormatError(f"{link.name}: manifest and stream disagree: " + "; ".join(wrong))


def resolve_chain(
    backups: Mapping[str, StoredBackup], backup: StoredBackup, entry: DiskEntry
) -> list[Link]:
    """The links that rebuild `entry`'s disk at `backup`, oldest (the full) first.

    A missing link is named: which backup needs it and which one is gone."""
    links = [Link(backup, entry)]
    seen = {backup.backup_id}
    while True:
        top = links[-1]
        ref_id = top.entry.reference_backup
        if not ref_id:
            if top.entry.kind != "full":
                raise StreamFormatError(f"{top.name}: manifest says kind {top.entry.kind} but "
                                        "names no reference_backup")
            break
        if top.entry.kind == "full":
            raise StreamFormatError(f"{top.name}: manifest says kind full but names "
                                    f"reference_backup {ref_id}")
        if ref_id in seen:
            raise StreamFormatError(f"{top.name}: its chain loops back to backup {ref_id}")
        seen.add(ref_id)
        ref = backups.get(ref_id)
        if ref is None:
            raise SinkError(
                f"{top.name}: chain link missing: its reference backup {ref_id} is not in the "
                "repository; this point cannot be restored"
            )
        ref_entry = ref.manifest.disk(uuid=top.entry.uuid)
        if ref_entry is None:
            raise SinkError(
                f"{top.name}: chain link missing: reference backup {ref_id} has no stream of "
                f"disk {top.label} ({top.entry.uuid})"
            )
        links.append(Link(ref, ref_entry))
    links.reverse()
    return links


# a planned piece: (disk offset, length, link number, record number in that link)
Piece = tuple[int, int, int, int]


def plan(indexes: Sequence[Sequence[IndexEntry]]) -> list[Piece]:
    """Which link and record each output range comes from: newest record wins.

    `indexes` are the links' records oldest first. Ranges no record covers are left out (they
    read as zeros: the oldest link is a full)."""
    covered: list[tuple[int, int]] = []  # sorted, disjoint, merged
    pieces: list[Piece] = []
    for li in range(len(indexes) - 1, -1, -1):
        records = indexes[li]
        j = 0
        for ri, rec in enumerate(records):
            start, end = rec.offset, rec.offset + rec.length
            while j < len(covered) and covered[j][1] <= start:
                j += 1
            pos, k = start, j
            while pos < end:
                if k < len(covered) and covered[k][0] < end:
                    cs, ce = covered[k]
                    if cs > pos:
                        pieces.append((pos, cs - pos, li, ri))
                    pos = max(pos, ce)
                    k += 1
                else:
                    pieces.append((pos, end - pos, li, ri))
                    pos = end
        covered = _merge(covered, [(r.offset, r.offset + r.length) for r in records])
    pieces.sort()
    return pieces


def _merge(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in heapq.merge(a, b):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


class ChainImage:
    """A disk at one backup point, rebuilt from its chain (blocking I/O: run it in a thread).

    Opening indexes every link and checks that each delta names the stream below it; with
    `verify` every link is read completely and its digest checked (for `verify` runs)."""

    def __init__(self, sink: Sink, links: Sequence[Link], verify: bool = False,
                 keys: Keyring | None = None) -> None:
        self.links = list(links)
        self._stack = ExitStack()
        self.files: list[BinaryIO] = []
        self.indexes: list[StreamIndex] = []
        self.entries: list[list[IndexEntry]] = []
        try:
            for link in self.links:
                f = self._stack.enter_context(sink.open_stream(link.backup, link.label))
                try:
                    index = index_stream(f, name=link.name, verify=verify, keys=keys)
                except StreamFormatError as err:
                    raise StreamFormatError(f"chain link damaged: {err}") from err
                if verify:
                    f.seek(0)
                    if index.trailer is not None and index.trailer.unchecked:
                        log.warning("%s: verified without its key: %s", link.name,
                                    index.trailer.unchecked)
                self.files.append(f)
                self.indexes.append(index)
                self.entries.append(list(index))
            self._check_links()
            self.pieces = plan(self.entries)
        except BaseException:
            self._stack.close()
            raise
        self._starts = [p[0] for p in self.pieces]
        # (record number, its payload, where that payload starts in the link's file)
        self._cache: list[tuple[int, memoryview, int] | None] = [None] * len(self.links)
        self._fds = [_local_fd(f) if index.header.encryption == "none" else None
                     for f, index in zip(self.files, self.indexes, strict=True)]
        self._bufs: list[bytearray] = [bytearray() for _ in self.links]

    @property
    def size(self) -> int:
        return self.indexes[-1].header.disk_size

    @property
    def tip(self) -> StreamIndex:
        return self.indexes[-1]

    def _check_links(self) -> None:
        for i, (link, index) in enumerate(zip(self.links, self.indexes, strict=True)):
            bind_stream(link, index.header, index.trailer)
            h = index.header
            problems = []
            if i == 0 and h.kind != "full":
                problems.append(f"kind {h.kind} at the base of the chain (a full is needed)")
            if i > 0:
                below = self.indexes[i - 1].header
                if h.kind == "full":
                    problems.append("a full where the manifest names a reference")
                if h.reference_backup_id != below.backup_id:
                    problems.append(f"reference_backup_id {h.reference_backup_id!r} "
                                    f"(the link below is {below.backup_id!r})")
                if h.reference_stream_id != below.stream_id:
                    problems.append(f"reference_stream_id {h.reference_stream_id!r} does not "
                                    f"match stream {below.stream_id!r} below it")
                if h.disk_size != below.disk_size:
                    problems.append(f"disk_size {h.disk_size} on a reference of {below.disk_size}")
            if problems:
                raise StreamFormatError(
                    f"chain link damaged: {link.name}: the stream does not fit its chain: "
                    + "; ".join(problems)
                )

    def _payload(self, li: int, ri: int) -> memoryview:
        return self._checked(li, ri)[1]

    def _checked(self, li: int, ri: int) -> tuple[int, memoryview, int]:
        """The record read and checked (header and payload checksum), cached per link."""
        cached = self._cache[li]
        if cached is not None and cached[0] == ri:
            return cached
        entry = self.entries[li][ri]
        if len(self._bufs[li]) < entry.length:
            self._bufs[li] = bytearray(entry.length)
        f = self.files[li]
        view = self.indexes[li].read(f, entry, into=self._bufs[li])  # type: ignore[arg-type]
        start = f.tell() - (entry.stored or entry.length)  # read() ends at the payload's end
        self._cache[li] = cached = (ri, view, start)
        return cached

    def _source(self, li: int, ri: int, rel: int, length: int) -> SourceRange | None:
        """The checked bytes as a range of the link's file, when they sit there as they are."""
        fd, entry = self._fds[li], self.entries[li][ri]
        if fd is None or entry.flags or (entry.stored and entry.stored != entry.length):
            return None
        _, _, start = self._checked(li, ri)
        return SourceRange(fd=fd, offset=start + rel, length=length)

    def ranges(self) -> Iterator[tuple[int, int, memoryview | None]]:
        """(offset, length, data or None for zeros) in disk order; gaps read as zeros.
        A data view is valid until the next item."""
        for off, length, li, ri in self.pieces:
            entry = self.entries[li][ri]
            if entry.kind != DATA:
                yield off, length, None
                continue
            rel = off - entry.offset
            yield off, length, self._payload(li, ri)[rel : rel + length]

    def write_to(self, writer: RangeWriter, progress: Progress = lambda n: None,
                 *, kernel_copy: bool = True) -> Written:
        """Write the image into `writer` once per range, in disk order: plain payloads of local
        files as `SourceRange`s (unless not `kernel_copy`), the others as bytes."""
        data = zero = copied = 0
        for off, length, li, ri in self.pieces:
            entry = self.entries[li][ri]
            rel = off - entry.offset
            if entry.kind != DATA:
                writer.zero(off, length)
                zero += length
            elif kernel_copy and (source := self._source(li, ri, rel, length)) is not None:
                writer.copy(off, source)
                data += length
                copied += length
            else:
                writer.write_at(off, self._payload(li, ri)[rel : rel + length])
                data += length
            progress(length)
        return Written(data=data, zero=zero, copied=copied)

    def read(self, offset: int, length: int) -> bytes:
        """The image's bytes at [offset, offset+length)."""
        out = bytearray(length)
        end = offset + length
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        while i < len(self.pieces) and self.pieces[i][0] < end:
            off, n, li, ri = self.pieces[i]
            i += 1
            s, e = max(off, offset), min(off + n, end)
            entry = self.entries[li][ri]
            if s >= e or entry.kind != DATA:
                continue
            src = self._payload(li, ri)
            out[s - offset : e - offset] = src[s - entry.offset : e - entry.offset]
        return bytes(out)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> ChainImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
