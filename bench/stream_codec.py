"""Disk stream codec throughput against a plain copy of the same bytes, in the same run.

Prints JSON. Every figure is best of `--repeat`; ratios (codec MB/s over plain MB/s) are what to
compare across machines, absolute numbers on a shared machine are noise.

    python bench/stream_codec.py [--gib 1] [--repeat 3]

Phases (payload: 1 MiB records, one in eight all-zero and sent as a zero record):
- encode_devnull: StreamWriter to /dev/null vs plain writes of the same buffers;
- encode_pipe: StreamWriter into a pipe drained by `cat > /dev/null` vs plain writes to the same;
- decode_file: StreamReader.verify() of the stream in the page cache vs plain readinto;
- decode_pipe: the same fed by `cat stream |` (a real pipe, no seeks);
- hashes: single-thread MB/s of the checksum candidates (docs/stream-format.md section 6).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import xxhash

from ahvbackup.core.stream import StreamHeader, StreamReader, StreamWriter, is_zero

MIB = 1 << 20
RECORD = MIB
POOL = 8


def payloads(total: int) -> Iterator[tuple[int, bytearray]]:
    pool = [bytearray(os.urandom(RECORD)) for _ in range(POOL - 1)] + [bytearray(RECORD)]
    for i in range(total // RECORD):
        yield i * RECORD, pool[i % POOL]


def header(total: int) -> StreamHeader:
    return StreamHeader(
        kind="full", vm_uuid="bench", disk_uuid="bench", disk_size=total, snapshot_id="bench",
        block_size=RECORD,
    )


def encode(out: BinaryIO, total: int) -> int:
    with StreamWriter(out, header(total)) as w:
        for offset, buf in payloads(total):
            w.write_chunk(offset, buf)
        return w.bytes_written


def plain_write(out: BinaryIO, total: int) -> int:
    n = 0
    for _, buf in payloads(total):
        n += out.write(buf) or 0
    return n


def plain_read(src: io.RawIOBase) -> int:
    buf = memoryview(bytearray(RECORD))
    n = 0
    while k := src.readinto(buf):
        n += k
    return n


def decode(src: io.RawIOBase) -> int:
    trailer = StreamReader(src).verify()
    return trailer.data_bytes + trailer.zero_bytes


def best(fn: Callable[[], int], total: int, repeat: int) -> float:
    """Best MB/s of `repeat` runs, counted on `total` payload bytes."""
    rates = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        rates.append(total / (time.perf_counter() - t) / 1e6)
    return round(max(rates), 1)


def to_devnull(fn: Callable[[BinaryIO, int], int], total: int) -> Callable[[], int]:
    def run() -> int:
        with open(os.devnull, "wb", buffering=0) as out:
            return fn(out, total)

    return run


def to_pipe(fn: Callable[[BinaryIO, int], int], total: int) -> Callable[[], int]:
    def run() -> int:
        with subprocess.Popen(
            ["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, bufsize=0
        ) as cat:
            assert cat.stdin is not None
            n = fn(cat.stdin, total)  # type: ignore[arg-type]
            cat.stdin.close()
        return n

    return run


def from_file(fn: Callable[[io.RawIOBase], int], path: Path) -> Callable[[], int]:
    def run() -> int:
        with path.open("rb", buffering=0) as src:
            return fn(src)

    return run


def from_pipe(fn: Callable[[io.RawIOBase], int], path: Path) -> Callable[[], int]:
    def run() -> int:
        with subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE, bufsize=0) as cat:
            assert cat.stdout is not None
            return fn(cat.stdout)  # type: ignore[arg-type]

    return run


def phase(codec: float, plain: float) -> dict[str, float]:
    return {"codec_mb_s": codec, "plain_mb_s": plain, "ratio": round(codec / plain, 3)}


def hash_rates() -> dict[str, float]:
    buf = memoryview(bytearray(os.urandom(4 * MIB)))
    zeros = memoryview(bytearray(4 * MIB))
    cands: dict[str, Callable[[memoryview], object]] = {
        "xxh3_64": xxhash.xxh3_64_intdigest,
        "xxh3_128": xxhash.xxh3_128_digest,
        "zlib_crc32": zlib.crc32,
        "sha256": lambda b: hashlib.sha256(b).digest(),
        "blake2b": lambda b: hashlib.blake2b(b).digest(),
    }
    try:
        import crc32c

        cands["crc32c"] = crc32c.crc32c
    except ImportError:
        pass
    cands["is_zero_all_zero"] = lambda _: is_zero(zeros)

    def repeat(fn: Callable[[memoryview], object]) -> Callable[[], int]:
        def run() -> int:
            for _ in range(32):
                fn(buf)
            return 32 * len(buf)

        return run

    return {name: best(repeat(fn), 128 * MIB, 3) for name, fn in cands.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    total = int(args.gib * 1024) * MIB
    result: dict[str, object] = {
        "payload_bytes": total, "record_bytes": RECORD, "repeat": args.repeat,
        "cpus": os.cpu_count(), "python": sys.version.split()[0],
    }
    result["encode_devnull"] = phase(
        best(to_devnull(encode, total), total, args.repeat),
        best(to_devnull(plain_write, total), total, args.repeat),
    )
    result["encode_pipe"] = phase(
        best(to_pipe(encode, total), total, args.repeat),
        best(to_pipe(plain_write, total), total, args.repeat),
    )
    with tempfile.TemporaryDirectory(prefix="ahvbench-") as tmp:
        path = Path(tmp) / "bench.ahvd"
        with path.open("wb") as f:
            stream_bytes = encode(f, total)
        result["stream_bytes"] = stream_bytes
        result["decode_file"] = phase(
            best(from_file(decode, path), total, args.repeat),
            best(from_file(plain_read, path), total, args.repeat),
        )
        result["decode_pipe"] = phase(
            best(from_pipe(decode, path), total, args.repeat),
            best(from_pipe(plain_read, path), total, args.repeat),
        )
    result["hashes_mb_s"] = hash_rates()
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
