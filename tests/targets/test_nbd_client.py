"""Our NBD client against a real qemu-nbd, and the granule regrouping the image targets use."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from tests.conftest import require_peer

from ahvbackup.targets.granules import Granules
from ahvbackup.targets.nbd import NbdClient, NbdError
from ahvbackup.targets.nbd_server import NbdServer

MiB = 1 << 20


@asynccontextmanager
async def served(image: Path, *extra: str) -> AsyncIterator[NbdClient]:
    socket = image.with_suffix(".sock")
    proc = await trio.lowlevel.open_process(
        ["qemu-nbd", "--socket", str(socket), "-f", "qcow2", *extra, str(image)])
    try:
        with trio.fail_after(10):
            while not socket.exists():
                await trio.sleep(0.01)
            while True:
                try:
                    client = await NbdClient.connect(socket, depth=4)
                    break
                except NbdError:
                    await trio.sleep(0.01)
        yield client
        await client.close()
        with trio.fail_after(10):
            assert await proc.wait() == 0  # qemu-nbd exits once its one client said goodbye
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.peer
async def test_pipelined_writes_read_back_and_refusals_carry_the_servers_errno(
        tmp_path: Path) -> None:
    require_peer("qemu-img", "qemu-nbd")
    image = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(8 * MiB)],
                   check=True)
    blocks = {off: os.urandom(300_000) for off in (0, 2 * MiB + 7, 5 * MiB)}
    async with served(image) as nbd:
        assert nbd.export.size == 8 * MiB and nbd.export.writable and nbd.export.flush
        for off, data in blocks.items():  # more in flight than the window: it drains itself
            await nbd.write(off, data)
        await nbd.flush()
        for off, data in blocks.items():
            back = bytearray(len(data))
            await nbd.read_into(off, memoryview(back))
            assert back == data
        await nbd.write(8 * MiB, bytes(4096))  # past the end: refused in its reply
        with pytest.raises(NbdError, match=r"NBD write of 4096 bytes at 8388608 failed") as err:
            await nbd.drain()
        assert err.value.errno in (errno.EINVAL, errno.ENOSPC)
    async with served(image, "--read-only") as ro:
        assert not ro.export.writable
        with pytest.raises(NbdError, match="the NBD export is read-only"):
            await ro.write(0, b"x" * 512)


def test_granules_cover_every_byte_once_whole_and_skip_zeros() -> None:
    for seed in range(40):
        rng = random.Random(seed)
        size = rng.randrange(1, 300) * 512
        g = rng.choice([512, 4096, 65536])
        cut = Granules(size=size, granule=g, max_write=g * rng.choice([1, 2, 8]))
        image, out = bytearray(size), bytearray(size)
        writes, pos = [], 0
        while True:
            pos += rng.randrange(0, 20000)
            if pos >= size:
                break
            n = min(rng.randrange(1, 30000), size - pos)
            data = bytes(n) if rng.random() < 0.2 else rng.randbytes(n)
            image[pos : pos + n] = data
            writes += cut.add(pos, data)
            pos += n
        writes += cut.end()
        seen: set[int] = set()
        for off, view in writes:
            assert off % g == 0 and (len(view) % g == 0 or off + len(view) == size)
            assert any(view), "an all-zero write was sent"
            granules = set(range(off // g, -(-(off + len(view)) // g)))
            assert not granules & seen, "a granule was written twice"
            seen |= granules
            out[off : off + len(view)] = view
        assert out == image, seed
    cut = Granules(size=MiB, granule=4096)
    cut.add(8192, b"x")
    with pytest.raises(ValueError, match="out of order"):
        cut.add(4096, b"y")


async def test_a_tmpdir_too_deep_for_a_socket_still_serves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A unix socket path holds 107 bytes: with a deeper TMPDIR, qemu-nbd's private folder
    goes to /tmp instead of failing (it did, under CI's long test paths), and is removed."""
    tools = require_peer("qemu-nbd")
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    image = tmp_path / "small.raw"
    image.write_bytes(b"\x5a" * 65536)
    server = await NbdServer.start(tools["qemu-nbd"], ["--format", "raw", str(image)],
                                   socket=None, what="test", read_only=True)
    assert server.client is not None and server.private is not None
    assert not str(server.private).startswith(str(deep))
    buf = bytearray(4096)
    await server.client.read_into(0, memoryview(buf))
    assert bytes(buf) == b"\x5a" * 4096
    await server.kill()
    assert not server.private.exists() and list(deep.iterdir()) == []
