"""DR channel throughput (psk, mtls) against a raw trio loopback TCP copy of the same bytes.

Prints JSON. Each figure is best of `--repeat`; the ratios (channel MB/s over raw MB/s, same
run, same host) are what to compare across machines; the goal is at least 0.7.

    python bench/dr_push.py [--mib 256] [--repeat 3] [--chunk-kib 1024]

Every case pushes `--mib` MiB in `--chunk-kib` pieces from a source to a receiver on
127.0.0.1; the receiver drains with `receive_some()` until the end, and the time runs from
the first byte sent to the receiver seeing the end (the handshake is timed apart). By default
the receiver runs in its own process, as it would on its own host (`--one-process` puts both
ends on one event loop, sharing one core). The same run then measures, through
`bench/dr_resume.py`, the resume time after a cut connection and the throttle's accuracy
(the "resume" and "throttle" keys).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import dr_resume  # beside this file (a script's folder is on sys.path)
import trio
import trustme

from ahvbackup.core.config import Config, load_config
from ahvbackup.core.drivers import DrTransport
from ahvbackup.transports.dr.mtls import MtlsTransport
from ahvbackup.transports.dr.psk import PskTransport

MIB = 1 << 20
HOST = "127.0.0.1"
#: the bench's own throw-away key, the same in the receiver process
TOKEN = os.environ.setdefault("AHVBACKUP_BENCH_PSK", os.urandom(32).hex())


def make_pki(where: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    for name in ("source", "receiver"):
        leaf = ca.issue_cert(HOST, common_name=name)
        leaf.cert_chain_pems[0].write_to_path(str(where / f"{name}.pem"))
        leaf.private_key_pem.write_to_path(str(where / f"{name}.key"))
        os.chmod(where / f"{name}.key", 0o600)


def side(kind: str, where: Path, name: str) -> Config:
    """One side's configuration (the receiver process builds its own: secrets do not pickle)."""
    if kind == "psk":
        return load_config(overrides={"dr_auth_token": TOKEN, "dr_host": HOST, "dr_port": 1})
    return load_config(overrides={
        "dr_auth_cert": str(where / f"{name}.pem"), "dr_auth_key": str(where / f"{name}.key"),
        "dr_ca_cert": str(where / "ca.pem"), "dr_host": HOST, "dr_port": 1})


def driver(kind: str, config: Config, port: int) -> DrTransport:
    cls = PskTransport if kind == "psk" else MtlsTransport
    return cls(replace(config, dr_port=port))


async def drain(stream: trio.abc.Stream) -> int:
    n = 0
    while chunk := await stream.receive_some():
        n += len(chunk)
    return n


# the receiver ------------------------------------------------------------------------------

async def receiver(kind: str, where: Path, ports: multiprocessing.Queue[int],
                   results: multiprocessing.Queue[tuple[int, float]]) -> None:
    async def handler(stream: trio.abc.Stream) -> None:
        n = await drain(stream)
        results.put((n, time.perf_counter()))

    async with trio.open_nursery() as nursery:
        if kind == "raw":
            async def raw_handler(stream: trio.SocketStream) -> None:
                async with stream:
                    await handler(stream)
            listeners = await nursery.start(trio.serve_tcp, raw_handler, 0)
            port = listeners[0].socket.getsockname()[1]
        else:
            config = side(kind, where, "receiver")
            port = await nursery.start(lambda task_status: driver(kind, config, 0).serve(
                handler, host=HOST, task_status=task_status))
        ports.put(port)
        await trio.sleep_forever()


def receiver_process(kind: str, where: Path, ports: multiprocessing.Queue[int],
                     results: multiprocessing.Queue[tuple[int, float]]) -> None:
    trio.run(receiver, kind, where, ports, results)


# the source --------------------------------------------------------------------------------

async def push(connect: Callable[[], Awaitable[trio.abc.Stream]], total: int,
               chunk: memoryview) -> tuple[float, float]:
    """(handshake seconds, start of the first send)."""
    t0 = time.perf_counter()
    stream = await connect()
    start = time.perf_counter()
    sent = 0
    while sent < total:
        piece = chunk[: min(len(chunk), total - sent)]
        await stream.send_all(piece)
        sent += len(piece)
    await stream.aclose()
    return start - t0, start


KINDS = ("raw", "psk", "mtls")


async def run_cases(where: Path, *, total: int, chunk_size: int, repeat: int,
                    one_process: bool) -> dict[str, dict[str, float]]:
    """Every kind once per round, rounds `repeat` times: a shared machine's load then weighs on
    all kinds alike; best of the rounds."""
    ctx = multiprocessing.get_context("spawn")
    chunk = memoryview(os.urandom(chunk_size))
    best = dict.fromkeys(KINDS, float("inf"))
    shake = dict.fromkeys(KINDS, float("inf"))
    procs = []
    async with trio.open_nursery() as nursery:
        ports, results = {}, {}
        for kind in KINDS:
            port_q: multiprocessing.Queue[int] = ctx.Queue()
            results[kind] = ctx.Queue()
            if one_process:
                nursery.start_soon(receiver, kind, where, port_q, results[kind])
            else:
                procs.append(ctx.Process(target=receiver_process,
                                         args=(kind, where, port_q, results[kind])))
                procs[-1].start()
            ports[kind] = await trio.to_thread.run_sync(port_q.get)

        for _ in range(repeat):
            for kind in KINDS:
                port = ports[kind]

                async def connect(kind: str = kind, port: int = port) -> trio.abc.Stream:
                    if kind == "raw":
                        return await trio.open_tcp_stream(HOST, port)
                    return await driver(kind, side(kind, where, "source"), port).connect()

                hs, start = await push(connect, total, chunk)
                got, end = await trio.to_thread.run_sync(results[kind].get)
                assert got == total, f"{kind}: {got} bytes arrived of {total}"
                best[kind], shake[kind] = min(best[kind], end - start), min(shake[kind], hs)
        nursery.cancel_scope.cancel()
    for proc in procs:
        proc.terminate()
        proc.join()
    return {kind: {"seconds": round(best[kind], 4),
                   "mb_per_s": round(total / best[kind] / 1e6, 1),
                   "handshake_ms": round(shake[kind] * 1000, 2)} for kind in KINDS}


async def main(args: argparse.Namespace) -> dict[str, object]:
    total, chunk = args.mib * MIB, args.chunk_kib << 10
    with tempfile.TemporaryDirectory() as tmp:
        make_pki(Path(tmp))
        cases = await run_cases(Path(tmp), total=total, chunk_size=chunk, repeat=args.repeat,
                                one_process=args.one_process)
    raw = cases["raw"]["mb_per_s"]
    # resume after a cut and throttle accuracy, in the same run (bench/dr_resume.py)
    pushes = await dr_resume.main(argparse.Namespace(mib=64, cut_mib=24, mbps=200))
    return {"mib": args.mib, "chunk_kib": args.chunk_kib, "repeat": args.repeat,
            "one_process": args.one_process, "cpus": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 2), "cases": cases,
            "ratio_psk": round(cases["psk"]["mb_per_s"] / raw, 3),
            "ratio_mtls": round(cases["mtls"]["mb_per_s"] / raw, 3), "goal": 0.7,
            "resume": pushes["resume"], "throttle": pushes["throttle"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument("--one-process", action="store_true")
    json.dump(trio.run(main, parser.parse_args()), sys.stdout, indent=2)
    print()
