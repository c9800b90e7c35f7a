"""DR push: resume time after a cut connection, and throttle accuracy, over the psk channel.

Prints JSON. A point of one local-file disk is pushed with `push_point` through the psk
transport to a `Receiver` on 127.0.0.1, through a proxy that cuts the connection (both
sockets closed) once `--cut-mib` MiB went through. Resume time is from the cut to the
source's "resumes at offset" (the receiver's welcome with the durable offset came back):
noticing the cut, the backoff (as logged, to 0.1 s), reconnect, handshake and welcome (goal:
at most 1 s plus the backoff).
The throttle case pushes `--mib` MiB at `--mbps` and compares the wire rate with the cap.

    python bench/dr_resume.py [--mib 64] [--cut-mib 24] [--mbps 200]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from ahvbackup.core.config import load_config
from ahvbackup.core.dr.push import DiskSource, PushPoint, PushResult, PushSettings, push_point
from ahvbackup.core.dr.receiver import Receiver, ReceiverSettings
from ahvbackup.core.drivers import DiskReader
from ahvbackup.core.model import Region
from ahvbackup.transports.dr.psk import PskTransport

MIB = 1 << 20
HOST = "127.0.0.1"
TOKEN = os.urandom(32).hex()


class FileReader(DiskReader):
    def __init__(self, path: Path) -> None:
        self.size = path.stat().st_size
        self.fd = os.open(path, os.O_RDONLY)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        buf[:] = os.pread(self.fd, len(buf), offset)


@dataclass
class Proxy:
    """Forwards to `port`; the first connection is cut after `cut_after` source bytes."""

    port: int
    cut_after: int | None
    cut_at: float | None = None
    connections: int = 0

    async def handle(self, client: trio.SocketStream) -> None:
        first = self.connections == 0
        self.connections += 1
        upstream = await trio.open_tcp_stream(HOST, self.port)
        async with client, upstream, trio.open_nursery() as nursery:
            async def pump(src: trio.SocketStream, dst: trio.SocketStream, count: bool) -> None:
                moved = 0
                try:
                    while data := await src.receive_some(1 << 16):
                        await dst.send_all(data)
                        moved += len(data)
                        if count and first and self.cut_after is not None \
                                and moved >= self.cut_after:
                            self.cut_at = time.perf_counter()
                            break
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump, client, upstream, True)
            nursery.start_soon(pump, upstream, client, False)


class Timeline(logging.Handler):
    """When the source logged its backoff wait and its resume."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []
        self.resumed_at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if m := re.search(r"reconnecting in ([0-9.]+)s", text):
            self.waits.append(float(m.group(1)))
        if "resumes at offset" in text and self.resumed_at is None:
            self.resumed_at = time.perf_counter()


def point(path: Path, size: int) -> PushPoint:
    async def regions() -> AsyncIterator[Region]:
        yield Region(0, size)

    disk = DiskSource(uuid="d0", label="scsi.0", size=size, full=True,
                      reader=FileReader(path), regions=regions)
    return PushPoint(vm_uuid="vm-bench", vm_name="bench", point=1, snapshot_id="s1", base=0,
                     base_snapshot_id="", taken=time.time(), disks=(disk,))


async def one_push(where: Path, size: int, *, cut_after: int | None, mbps: int,
                   sync_bytes: int) -> tuple[PushResult, float, Proxy]:
    image = where / "disk.img"
    if not image.exists():
        image.write_bytes(os.urandom(size))
    state = where / f"rx-{time.time_ns()}"
    receiver = Receiver(ReceiverSettings(state_dir=state, sync_bytes=sync_bytes))
    served = PskTransport(load_config(overrides={"dr_auth_token": TOKEN, "dr_host": HOST,
                                                 "dr_port": 1}))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: served.serve(
            receiver.handle, host=HOST, task_status=task_status))
        proxy = Proxy(port, cut_after)
        (listener,) = await nursery.start(partial(trio.serve_tcp, proxy.handle, 0, host=HOST))
        source = PskTransport(load_config(overrides={
            "dr_auth_token": TOKEN, "dr_host": HOST,
            "dr_port": listener.socket.getsockname()[1]}))
        start = time.perf_counter()
        result = await push_point(point(image, size), connect=source.connect,
                                  settings=PushSettings(max_bandwidth_mbps=mbps,
                                                        backoff=0.2))
        seconds = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    (done,) = receiver.points("vm-bench")
    assert done.disks[0].path.read_bytes() == image.read_bytes(), "the pushed image differs"
    return result, seconds, proxy


async def main(args: argparse.Namespace) -> dict[str, object]:
    size = args.mib * MIB
    timeline = Timeline()
    logging.getLogger("ahvbackup.dr.push").addHandler(timeline)
    logging.getLogger("ahvbackup.dr.push").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        clean, clean_s, _ = await one_push(where, size, cut_after=None, mbps=0,
                                           sync_bytes=8 * MIB)
        cut, cut_s, proxy = await one_push(where, size, cut_after=args.cut_mib * MIB,
                                           mbps=0, sync_bytes=8 * MIB)
        assert proxy.cut_at is not None and timeline.resumed_at is not None
        backoff = sum(timeline.waits)
        resume = timeline.resumed_at - proxy.cut_at
        throttled, thr_s, _ = await one_push(where, size, cut_after=None, mbps=args.mbps,
                                             sync_bytes=8 * MIB)
    cap = args.mbps * 1e6 / 8
    rate = throttled.bytes_pushed / thr_s
    return {
        "mib": args.mib, "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "resume": {"cut_after_mib": args.cut_mib, "resumed_at_offset": cut.resumed_at,
                   "reconnects": cut.reconnects, "resume_seconds": round(resume, 3),
                   "backoff_seconds": round(backoff, 3),
                   "goal": "resume_seconds <= 1.0 + backoff_seconds",
                   "goal_met": resume <= 1.0 + backoff,
                   "clean_push_seconds": round(clean_s, 3),
                   "cut_push_seconds": round(cut_s, 3),
                   "resent_bytes": cut.data_bytes - clean.data_bytes},
        "throttle": {"max_bandwidth_mbps": args.mbps, "seconds": round(thr_s, 3),
                     "wire_bytes": throttled.bytes_pushed,
                     "wire_mbps": round(rate * 8 / 1e6, 2),
                     "ratio_to_cap": round(rate / cap, 4), "goal": "within 10% of 1.0"},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--cut-mib", type=int, default=24)
    parser.add_argument("--mbps", type=int, default=200)
    json.dump(trio.run(main, parser.parse_args()), sys.stdout, indent=2)
    print()
