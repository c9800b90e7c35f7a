"""Simulator disk store: snapshot read throughput against plain preadv of the same file.

Prints JSON. Figures are best of ``--repeat``; the ratio (store MB/s over plain preadv MB/s of the
live file, measured in the same run, data in the page cache) is what to compare across machines.

    python bench/diskstore.py [--mib 512] [--repeat 3] [--dir DIR]

Phases:
- read_newest: a snapshot with no later writes, so every byte comes from the live file;
- read_older: a snapshot whose blocks were 10% overwritten since (those come from its
  preserved file, the rest from the live file);
- for each, chunk sizes of 1 and 8 MiB through ``read_snapshot_into`` (the REST download path);
- changed_regions: time of an incremental query and of a full allocation map;
- snapshots_100gib: wall time of 100 snapshots of a 100 GiB sparse disk, each followed by a
  one-block write, and the bytes allocated on disk afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ahvbackup.hypervisors.ahv.simulator.diskstore import DiskStore

MiB = 1 << 20


def best(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def read_all(store: DiskStore, snap: str, size: int, chunk: int) -> None:
    buf = memoryview(bytearray(chunk))
    offset = 0
    while offset < size:
        offset += store.read_snapshot_into("d", snap, offset, buf)


def preadv_all(path: Path, size: int, chunk: int) -> None:
    buf = memoryview(bytearray(chunk))
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < size:
            n = os.preadv(fd, [buf], offset)
            if not n:
                break
            offset += n
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(json.dumps(run(Path(tmp), args.mib, args.repeat), indent=2))


def run(root: Path, mib: int, repeat: int) -> dict[str, object]:
    size = mib * MiB
    store = DiskStore(root / "store", sync=False)
    bs = store.block_size
    store.create_disk("d", size)
    rnd = random.Random(7)
    pattern = rnd.randbytes(MiB)
    for offset in range(0, size, MiB):
        store.write("d", offset, pattern[offset // MiB % 251 :] + pattern[: offset // MiB % 251])
    older = store.snapshot("d")
    nblocks = size // bs
    for b in rnd.sample(range(nblocks), nblocks // 10):
        store.write("d", b * bs, rnd.randbytes(bs))
    newest = store.snapshot("d")
    live = root / "store" / "disks" / "d" / "live.img"
    mb = size / 1e6

    out: dict[str, object] = {"disk_mib": mib, "block_size": bs, "repeat": repeat}
    for chunk_mib in (1, 8):
        chunk = chunk_mib * MiB
        plain = mb / best(repeat, lambda c=chunk: preadv_all(live, size, c))
        for name, snap in (("read_newest", newest), ("read_older", older)):
            rate = mb / best(repeat, lambda s=snap, c=chunk: read_all(store, s, size, c))
            out[f"{name}_{chunk_mib}mib"] = {
                "store_mb_s": round(rate),
                "plain_preadv_mb_s": round(plain),
                "ratio": round(rate / plain, 3),
            }
    out["changed_regions"] = {
        "incremental_s": round(best(repeat, lambda: store.changed_regions("d", newest, older)), 4),
        "incremental_regions": len(store.changed_regions("d", newest, older).regions),
        "allocation_map_s": round(best(repeat, lambda: store.changed_regions("d", older)), 4),
    }
    store.close()

    big = DiskStore(root / "big")
    bs = big.block_size
    t = time.perf_counter()
    big.create_disk("d", 100 << 30)
    for i in range(100):
        big.snapshot("d")
        big.write("d", i * (1 << 30), b"\x01" * bs)
    elapsed = time.perf_counter() - t
    allocated = sum(p.stat().st_blocks * 512 for p in (root / "big").rglob("*") if p.is_file())
    out["snapshots_100gib"] = {
        "seconds_with_fsync": round(elapsed, 3),
        "allocated_bytes": allocated,
        "bytes_written": 100 * bs,
    }
    big.close()
    return out


if __name__ == "__main__":
    main()
