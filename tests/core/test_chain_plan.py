"""The chain planner: each disk range comes from the newest record covering it, written once."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from ahvbackup.core.jobs.chain import plan
from ahvbackup.core.stream import IndexEntry

SIZE = 64


@st.composite
def link(draw: st.DrawFn) -> list[IndexEntry]:
    """Sorted, non-overlapping records over a 64-unit disk."""
    cuts = sorted(draw(st.sets(st.integers(0, SIZE), max_size=12)))
    records = []
    for seq, (a, b) in enumerate(itertools.pairwise(cuts)):
        if draw(st.booleans()):
            kind = draw(st.sampled_from(["data", "zero"]))
            records.append(IndexEntry(kind, seq, a, b - a, 0))  # type: ignore[arg-type]
    return records


@settings(max_examples=300)
@given(links=st.lists(link(), min_size=1, max_size=6))
def test_newest_record_wins_and_every_byte_is_written_once(links: list[list[IndexEntry]]) -> None:
    want: list[tuple[int, int] | None] = [None] * SIZE  # (link, record) per byte, applied in order
    for li, records in enumerate(links):
        for ri, r in enumerate(records):
            for b in range(r.offset, r.offset + r.length):
                want[b] = (li, ri)
    pieces = plan(links)
    got: list[tuple[int, int] | None] = [None] * SIZE
    for off, length, li, ri in pieces:
        rec = links[li][ri]
        assert rec.offset <= off and off + length <= rec.offset + rec.length
        for b in range(off, off + length):
            assert got[b] is None, f"byte {b} written twice"
            got[b] = (li, ri)
    assert got == want
    assert [p[0] for p in pieces] == sorted(p[0] for p in pieces)  # disk order


def test_a_long_chain_of_small_changes_reads_each_base_record_once() -> None:
    full = [IndexEntry("data", 0, 0, 64, 0)]
    deltas = [[IndexEntry("data", 0, i, 1, 0)] for i in range(0, 64, 8)]
    pieces = plan([full, *deltas])
    assert sum(n for _, n, li, _ in pieces if li == 0) == 64 - 8
    assert sum(1 for p in pieces if p[2] > 0) == 8
