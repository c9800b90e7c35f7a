"""Memory stays flat as disks grow: the backup of an 8x larger disk needs no more memory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import trio
from tests.e2e.e2e_world import MiB, World

# run the CLI and report this process's peak RSS (KiB) on the fd named in RSS_FD when it exits
WRAPPER = (
    "import atexit, os, resource\n"
    "atexit.register(lambda: os.write(int(os.environ['RSS_FD']), str(resource.getrusage("
    "resource.RUSAGE_SELF).ru_maxrss).encode()))\n"
    "from ahvbackup.core.cli import main\n"
    "main()\n"
)


async def peak_rss_kib(world: World, vm: str) -> int:
    r, w = os.pipe()
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", WRAPPER, "backup",
             *world.cli_args(vm=vm, chunk_size_mib=1, concurrent_disks=1)],
            pass_fds=(w,), env={**os.environ, "RSS_FD": str(w)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        code = await proc.wait()
        assert code == 0
        os.close(w)
        w = -1
        return int(os.read(r, 64))
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


@pytest.mark.slow
async def test_peak_memory_does_not_grow_with_disk_size(world: World) -> None:
    world.add_vm("small", [(256 * MiB, [(0, 128 * MiB)])])
    world.add_vm("large", [(2048 * MiB, [(0, 1024 * MiB)])])
    small = await peak_rss_kib(world, "small")
    large = await peak_rss_kib(world, "large")
    # 896 MiB more went through. Python-level memory is a fixed buffer pool (tracemalloc shows
    # the same peak for both); the allocator and TLS add a little slack, not the data.
    print(f"peak RSS: {small} KiB (128 MiB of data), {large} KiB (1024 MiB)")
    assert large - small < 48 * 1024, f"peak RSS {small} KiB -> {large} KiB"
