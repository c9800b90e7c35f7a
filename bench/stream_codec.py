"""Disk stream codec throughput against a plain copy of the same bytes, in the same run.

Prints JSON. Every figure is best of `--repeat`; ratios (codec MB/s over plain MB/s) are what to
compare across machines, absolute numbers on a shared machine are noise.

    python bench/stream_codec.py [--gib 1] [--repeat 3]

Phases (payload: 1 MiB records, one in eight all-zero and sent as a zero record):
- encode_devnull: StreamWriter to /dev/null vs plain writes of the same buffers;
- encode_pipe: StreamWriter into a pipe drained by `cat > /dev/null` vs plain writes to the same;
- decode_file: StreamReader.verify() of the stream in the page cache vs plain readinto;
- decode_pipe: the same fed by `cat stream |` (a real pipe, no seeks);
- hashes: single-thread MB/s of the checksum candidates (docs/stream-format.md section 6);
- codecs (format 2.0, docs/stream-format.md section 7): on a mixed data set (text, zeros,
  random bytes, and a real ext4 image made with `mkfs.ext4 -d` from files of this host), per
  codec (plain, zstd at the default level and others, AES-256-GCM, both): encode and decode
  MB/s (in memory, one thread), the stored/disk ratio, `xxh3_64` of the same bytes in the same
  run, and a file-to-file pipeline (read the image, encode, write the stream) as a ratio of
  the plain pipeline: the full-backup cost of compression and encryption on one core.

- pipeline (`--pipeline`): the whole full-backup job over `data_path=iscsi` (the simulator's
  target, in its own process) of a disk holding the same mixed data, once per setting of
  compression and encryption, as a ratio of the job with neither.

    python bench/stream_codec.py --codecs-only [--mib 384] [--pipeline]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import xxhash

from ahvbackup.core.stream import (
    Encoder,
    Keyring,
    StreamCodec,
    StreamHeader,
    StreamKey,
    StreamReader,
    StreamWriter,
    is_zero,
)

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


# codecs (format 2.0) ---------------------------------------------------------------------

KEY = StreamKey(os.urandom(32), source="bench")
CODECS = {
    "plain": StreamCodec(),
    f"zstd:{StreamCodec.ZSTD_DEFAULT}": StreamCodec("zstd", StreamCodec.ZSTD_DEFAULT),
    "zstd:3": StreamCodec("zstd", 3),
    "aes-256-gcm": StreamCodec(key=KEY),
    f"zstd:{StreamCodec.ZSTD_DEFAULT}+aes-256-gcm": StreamCodec(
        "zstd", StreamCodec.ZSTD_DEFAULT, KEY),
}


def ext4_image(path: Path, size: int, tmp: Path) -> None:
    """A real ext4 filesystem holding files of this host (libraries, programs, docs, Python
    sources), about half full, made without mounting (`mkfs.ext4 -d`)."""
    root = tmp / "root"
    budget = size // 2
    for src in ("/usr/lib/python3.11", "/usr/share/doc", "/usr/bin", "/usr/lib/x86_64-linux-gnu"):
        for dirpath, _, files in os.walk(src):
            for name in files:
                f = Path(dirpath) / name
                if budget <= 0:
                    break
                if f.is_symlink() or not f.is_file():
                    continue
                dest = root / f.relative_to("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dest)
                budget -= f.stat().st_size
    with path.open("wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(path)], check=True)
    shutil.rmtree(root)


def mixed_data(total: int, tmp: Path) -> bytes:
    """Half a real filesystem image, then text, zeros and random bytes (1/6 each)."""
    image = tmp / "fs.img"
    ext4_image(image, total // 2, tmp)
    part = total // 6 // RECORD * RECORD
    text = b"".join(p.read_bytes() for p in sorted(Path("/usr/lib/python3.11").glob("*.py")))
    text = (text * (part // len(text) + 1))[:part]
    data = image.read_bytes() + text + bytes(part) + os.urandom(part)
    return data[: len(data) // RECORD * RECORD]


def encode_all(data: memoryview, codec: StreamCodec, out: BinaryIO | None = None) -> int:
    enc = Encoder(header(len(data)), codec)
    write = out.write if out is not None else (lambda b: len(b))
    stored = write(enc.header()) or 0
    for off in range(0, len(data), RECORD):
        buf = data[off : off + RECORD]
        if is_zero(buf):
            stored += write(enc.zero(off, len(buf))) or 0
            continue
        head, body = enc.data(off, buf)
        stored += (write(head) or 0) + (write(body) or 0)
    return stored + (write(enc.trailer()) or 0)


def codec_rates(total: int, repeat: int) -> dict[str, object]:
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="ahvbench-") as tmp_name:
        tmp = Path(tmp_name)
        data = memoryview(mixed_data(total, tmp))
        n = len(data)
        source = tmp / "disk.img"
        source.write_bytes(data)
        out["data_set"] = {"bytes": n, "ext4_image": n // 2, "text_zeros_random_each": n // 6}

        def hash_all() -> int:
            for off in range(0, n, RECORD):
                xxhash.xxh3_64_intdigest(data[off : off + RECORD])
            return n

        out["xxh3_64_mb_s"] = best(hash_all, n, repeat)

        def pipeline(codec: StreamCodec) -> Callable[[], int]:
            def run() -> int:
                buf = bytearray(RECORD)
                view = memoryview(buf)
                with source.open("rb", buffering=0) as src, \
                        (tmp / "out.ahvd").open("wb", buffering=0) as dst:
                    enc = Encoder(header(n), codec)
                    dst.write(enc.header())
                    off = 0
                    while k := src.readinto(view):
                        chunk = view[:k]
                        if is_zero(chunk):
                            dst.write(enc.zero(off, k))
                        else:
                            head, body = enc.data(off, chunk)
                            dst.write(head)
                            dst.write(body)
                        off += k
                    dst.write(enc.trailer())
                return n

            return run

        plain_pipeline = 0.0
        keys = Keyring((KEY,))
        for name, codec in CODECS.items():
            stream = tmp / f"{name}.ahvd"
            with stream.open("wb") as f:
                stored = encode_all(data, codec, f)

            def decode_stream(path: Path = stream) -> int:
                with path.open("rb", buffering=0) as src:
                    t = StreamReader(src, keys=keys).verify()
                return t.data_bytes + t.zero_bytes

            pipe = best(pipeline(codec), n, repeat)
            plain_pipeline = plain_pipeline or pipe
            out[name] = {
                "encode_mb_s": best(lambda c=codec: encode_all(data, c), n, repeat),
                "decode_mb_s": best(decode_stream, n, repeat),
                "stored_ratio": round(stored / n, 3),
                "pipeline_mb_s": pipe,
                "pipeline_ratio": round(pipe / plain_pipeline, 3),
            }
            stream.unlink()
    return out


PIPELINE_SETTINGS = {
    "none": {"compression": "none"},
    f"zstd:{StreamCodec.ZSTD_DEFAULT}": {"compression": f"zstd:{StreamCodec.ZSTD_DEFAULT}"},
    "aes-256-gcm": {"compression": "none", "encryption_key": "KEY"},
    f"zstd:{StreamCodec.ZSTD_DEFAULT}+aes-256-gcm": {
        "compression": f"zstd:{StreamCodec.ZSTD_DEFAULT}", "encryption_key": "KEY"},
}


def pipeline_rates(total: int, repeat: int) -> dict[str, object]:
    """The full-backup job over iSCSI, per codec setting, on a disk of mixed data."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _simproc import Served, job_args, run_cli_measured
    from iscsi_read import INITIATOR_IQN

    from ahvbackup.hypervisors.ahv.simulator import Simulator
    from ahvbackup.hypervisors.ahv.simulator.model import Disk, Vm

    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="ahvbench-pipe-") as tmp_name:
        work = Path(tmp_name)
        data = mixed_data(total, work)
        sim = Simulator(work / "sim", seed=True, sync=False)
        try:
            cluster = next(iter(sim.clusters.values()))
            vm = Vm(uuid="b0000000-0000-4000-8000-000000000001", name="bench-vm",
                    cluster_uuid=cluster.uuid,
                    disks=[Disk(uuid="b0000000-0000-4000-8000-0000000000d1", device_type="DISK",
                                adapter_type="SCSI", device_index=0, size=len(data),
                                container_uuid=cluster.containers[0].uuid)])
            sim.create_vm(vm)
            for off in range(0, len(data), 8 * MIB):
                piece = data[off : off + 8 * MIB]
                if not is_zero(piece):
                    sim.write_disk(vm.uuid, 0, off, piece)
        finally:
            sim.close()
        key = work / "bench.key"
        key.write_text(os.urandom(32).hex())
        key.chmod(0o600)
        child = subprocess.Popen([sys.executable, str(Path(__file__).parent / "iscsi_read.py"),
                                  "--child-sim", "--state", str(work / "sim")],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            info = json.loads(child.stdout.readline())
            served = Served(pc=info["pc"], ca=info["ca"], state=work / "sim")
            def job(name: str, i: int) -> dict[str, object]:
                keys = {k: (key if v == "KEY" else v) for k, v in PIPELINE_SETTINGS[name].items()}
                repo = work / f"repo-{name}-{i}"
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                result, _ = run_cli_measured(["backup", *job_args(
                    served, work, vm="bench-vm", data_path="iscsi",
                    iscsi_port=info["portal"][1], iscsi_initiator=INITIATOR_IQN,
                    chunk_size_mib=1, repository=repo, **keys)])
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                result["cpu_s"] = (after.ru_utime + after.ru_stime - before.ru_utime
                                   - before.ru_stime)
                shutil.rmtree(repo)
                return result

            job("none", -1)  # warm-up: the simulator's disk file into the page cache
            runs: dict[str, list[dict[str, object]]] = {n: [] for n in PIPELINE_SETTINGS}
            for i in range(repeat):  # interleaved, so drift of the machine hits all alike
                for name in PIPELINE_SETTINGS:
                    runs[name].append(job(name, i))
            base = min(float(r["seconds"]) for r in runs["none"])  # type: ignore[arg-type]
            for name, done in runs.items():
                job_s = min(float(r["seconds"]) for r in done)  # type: ignore[arg-type]
                stored = int(done[0]["bytes_stored"])  # type: ignore[call-overload]
                cpu = min(float(r["cpu_s"]) for r in done)  # type: ignore[arg-type]
                out[name] = {"job_seconds": round(job_s, 3),
                             "job_cpu_s_per_gib": round(cpu / (len(data) / (1 << 30)), 2),
                             "disk_mb_s": round(len(data) / job_s / 1e6, 1),
                             "stored_ratio": round(stored / len(data), 3),
                             "ratio": round(base / job_s, 3)}
        finally:
            child.terminate()
            child.wait(timeout=30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mib", type=int, default=384, help="size of the codecs' mixed data set")
    ap.add_argument("--codecs-only", action="store_true", help="only the codecs section")
    ap.add_argument("--pipeline", action="store_true",
                    help="also the full-backup job over iSCSI per codec setting")
    ap.add_argument("--pipeline-only", action="store_true", help="only the pipeline section")
    args = ap.parse_args()
    total = int(args.gib * 1024) * MIB
    if args.pipeline_only:
        print(json.dumps({"cpus": os.cpu_count(), "pipeline_over_iscsi": pipeline_rates(
            args.mib * MIB, args.repeat)}, indent=2))
        return
    if args.codecs_only:
        report: dict[str, object] = {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                     "codecs": codec_rates(args.mib * MIB, args.repeat)}
        if args.pipeline:
            report["pipeline_over_iscsi"] = pipeline_rates(args.mib * MIB, args.repeat)
        print(json.dumps(report, indent=2))
        return
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
    result["codecs"] = codec_rates(args.mib * MIB, args.repeat)
    if args.pipeline:
        result["pipeline_over_iscsi"] = pipeline_rates(args.mib * MIB, args.repeat)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
