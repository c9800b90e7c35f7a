"""Data ranges regrouped into writes of whole granules, all-zero granules left out (sans-I/O).

A compressed image (streamOptimized vmdk, qcow2 through qemu's ``compress`` filter) takes each
grain or cluster exactly once, whole and aligned: a second write into it, or a partial one,
is refused. The restore job hands ranges of any size and alignment, in ascending order and
never overlapping, so a granule is complete as soon as a range starts past it. A granule
nobody wrote reads as zeros on a new image, and so does one that is all zeros: neither is
written (that is what keeps the output as small as ``qemu-img convert``'s). Neighbouring
granules are joined into writes of up to `max_write` bytes.
"""

from __future__ import annotations

__all__ = ["Granules"]

from ahvbackup.core.stream.encoder import is_zero


class Granules:
    """Feed `add` ranges in ascending order, then `end`; each returns the writes to make now
    as (offset, view), ascending; a view stays valid (the buffer it shows is not reused).
    Memory: one `max_write` buffer."""

    def __init__(self, *, size: int, granule: int, max_write: int = 4 << 20) -> None:
        if granule <= 0 or max_write % granule:
            raise ValueError("max_write must be a multiple of granule")
        self.size = size
        self.granule = granule
        self.max_write = max_write
        self._start = 0  # disk offset of _buf[0], granule-aligned
        self._buf = bytearray()
        self._last = 0  # where the last range ended: ranges must not go back

    def add(self, offset: int, data: bytes | memoryview) -> list[tuple[int, memoryview]]:
        n = len(data)
        if offset < self._last or offset + n > self.size:
            raise ValueError(f"range [{offset}, {offset + n}) is out of order or past the end")
        self._last = offset + n
        out: list[tuple[int, memoryview]] = []
        g = self.granule
        if self._buf and offset >= self._start + -(-len(self._buf) // g) * g:
            out += self._emit(everything=True)  # the range starts past the buffered granules
        if not self._buf:
            self._start = offset - offset % g
        view = memoryview(data).cast("B")
        pos = 0
        while pos < n:
            at = offset + pos - self._start  # where this piece goes in the buffer
            if at > len(self._buf):
                self._buf += bytes(at - len(self._buf))
            room = self.max_write - at
            piece = view[pos : pos + room]
            self._buf += piece
            pos += len(piece)
            if len(self._buf) >= self.max_write:
                out += self._emit(everything=False)
        return out

    def end(self) -> list[tuple[int, memoryview]]:
        """Everything still held (the disk's last granule may be short)."""
        return self._emit(everything=True)

    def _emit(self, *, everything: bool) -> list[tuple[int, memoryview]]:
        g = self.granule
        buf, start = self._buf, self._start
        if everything:  # pad the last granule (or stop at the disk's end)
            whole = -(-len(buf) // g) * g
            buf += bytes(min(whole, self.size - start) - len(buf))
            keep = len(buf)
        else:
            keep = len(buf) - len(buf) % g
        out: list[tuple[int, memoryview]] = []
        view = memoryview(buf)
        run = 0  # where the current run of granules with data starts
        for pos in self._zero_granules(view, keep):
            if pos > run:
                out.append((start + run, view[run:pos]))
            run = pos + g
        if keep > run:
            out.append((start + run, view[run:keep]))
        self._buf = bytearray(view[keep:])
        self._start = start + keep
        return out

    def _zero_granules(self, view: memoryview, keep: int) -> list[int]:
        """Offsets of the all-zero granules in view[:keep]. Only a granule whose first byte
        is zero can be one, so the others cost nothing but that byte."""
        g = self.granule
        firsts = bytes(view[0:keep:g])
        out = []
        k = firsts.find(0)
        while k >= 0:
            if is_zero(view[k * g : min(k * g + g, keep)]):
                out.append(k * g)
            k = firsts.find(0, k + 1)
        return out
