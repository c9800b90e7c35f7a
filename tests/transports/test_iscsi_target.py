"""Our iSCSI target against real initiators (libiscsi's tools, qemu-img over libiscsi) and ours."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from tests.conftest import require_peer
from tests.transports.conftest import INITIATOR_IQN, pattern

from ahvbackup.core.secret import Secret
from ahvbackup.transports.iscsi import (
    Capacity,
    ChapCredentials,
    IscsiAuthError,
    IscsiCommandError,
    IscsiLoginError,
    IscsiSession,
    discover,
)
from ahvbackup.transports.iscsi.target import Export, IscsiTarget, MemoryLun

IQN = "iqn.2010-06.com.nutanix:vg-ahvbackup-test"
CHAP = ChapCredentials("vguser", Secret("chap-secret-1234"))
MUTUAL = ChapCredentials("vgtarget", Secret("target-secret-99"))


@asynccontextmanager
async def served(export: Export, **extra: Export) -> AsyncIterator[tuple[IscsiTarget, int]]:
    target = IscsiTarget(exports={export.iqn: export, **extra})
    async with trio.open_nursery() as nursery:
        _host, port = await nursery.start(target.serve, "127.0.0.1", 0)
        yield target, port
        nursery.cancel_scope.cancel()


async def run(*cmd: str) -> tuple[int, str]:
    r = await trio.run_process(list(cmd), capture_stdout=True, capture_stderr=True, check=False)
    return r.returncode, (r.stdout + r.stderr).decode(errors="replace")


def url(port: int, *, auth: str = "", lun: int = 0) -> str:
    return f"iscsi://{auth}127.0.0.1:{port}/{IQN}/{lun}"


@pytest.mark.parametrize("chap", [False, True], ids=["no-auth", "chap"])
async def test_libiscsi_tools_and_qemu_img_read_byte_exact(tmp_path: Path, chap: bool) -> None:
    require_peer("iscsi-ls", "iscsi-inq", "iscsi-readcapacity16", "qemu-img")
    data = pattern(6 << 20, seed=7)
    export = Export(iqn=IQN, luns=[MemoryLun(data)], chap=CHAP if chap else None)
    auth = "vguser%chap-secret-1234@" if chap else ""
    async with served(export) as (_target, port):
        rc, out = await run("iscsi-ls", "-s", f"iscsi://{auth}127.0.0.1:{port}")
        assert rc == 0, out
        assert IQN in out and "Lun:0" in out and "DIRECT_ACCESS" in out
        rc, out = await run("iscsi-inq", url(port, auth=auth))
        assert rc == 0, out
        assert "DIRECT_ACCESS" in out and "AHVBKUP" in out
        rc, out = await run("iscsi-readcapacity16", url(port, auth=auth))
        assert rc == 0, out
        assert f"Total size:{len(data)}" in out
        dest = tmp_path / "out.raw"
        rc, out = await run("qemu-img", "convert", "-O", "raw", url(port, auth=auth), str(dest))
        assert rc == 0, out
        assert dest.read_bytes() == data


async def test_wrong_chap_secret_is_refused_to_libiscsi_qemu_and_us(tmp_path: Path) -> None:
    require_peer("iscsi-inq", "qemu-img")
    export = Export(iqn=IQN, luns=[MemoryLun(1 << 20)], chap=CHAP)
    async with served(export) as (target, port):
        rc, _ = await run("iscsi-inq", url(port, auth="vguser%wrong-secret-0000@"))
        assert rc != 0
        rc, _ = await run("qemu-img", "convert", "-O", "raw",
                            url(port, auth="vguser%wrong-secret-0000@"), str(tmp_path / "x"))
        assert rc != 0 and not (tmp_path / "x").exists()
        rc, _ = await run("iscsi-inq", url(port))  # no credentials at all
        assert rc != 0
        wrong = ChapCredentials("vguser", Secret("wrong-secret-0000"))
        with pytest.raises(IscsiAuthError) as info:
            async with IscsiSession.connect(portal=("127.0.0.1", port), target_iqn=IQN,
                                            initiator_iqn=INITIATOR_IQN, chap=wrong):
                pass
        assert "authentication failure" in str(info.value)
        assert "wrong-secret" not in str(info.value)
        assert target.refused_logins >= 3
        assert target.logins == 0


async def test_our_initiator_reads_and_writes_with_mutual_chap() -> None:
    data = bytearray(pattern(4 << 20, seed=3))
    lun = MemoryLun(data)
    export = Export(iqn=IQN, luns=[lun], read_only=False, chap=CHAP, mutual=MUTUAL)
    async with served(export) as (_target, port), IscsiSession.connect(
        portal=("127.0.0.1", port), target_iqn=IQN, initiator_iqn=INITIATOR_IQN,
        chap=CHAP, mutual=MUTUAL, queue_depth=8, max_transfer=256 << 10,
    ) as s:
        assert s.size == len(data)
        buf = bytearray(len(data))
        await s.read_into(0, memoryview(buf))
        assert buf == data
        new = pattern(3 << 20, seed=9)  # larger than FirstBurstLength: needs R2Ts
        await s.write(512 * 1000, new)
        expect = bytearray(data)
        expect[512 * 1000 : 512 * 1000 + len(new)] = new
        assert lun.data == expect
        back = bytearray(len(new))
        await s.read_into(512 * 1000, memoryview(back))
        assert back == new


async def test_mutual_chap_with_a_wrong_target_secret_is_detected() -> None:
    liar = ChapCredentials("vgtarget", Secret("not-the-secret-1"))
    export = Export(iqn=IQN, luns=[MemoryLun(1 << 20)], chap=CHAP, mutual=liar)
    async with served(export) as (_target, port):
        with pytest.raises(IscsiAuthError, match="mutual CHAP"):
            async with IscsiSession.connect(portal=("127.0.0.1", port), target_iqn=IQN,
                                            initiator_iqn=INITIATOR_IQN, chap=CHAP,
                                            mutual=MUTUAL):
                pass


async def test_only_attached_initiators_log_in_or_see_the_target() -> None:
    attached = {"iqn.2024-01.test:allowed"}
    export = Export(iqn=IQN, luns=[MemoryLun(1 << 20)], allowed=attached.__contains__)
    other = Export(iqn=IQN + "-open", luns=[MemoryLun(1 << 20)])
    async with served(export, **{other.iqn: other}) as (target, port):
        seen = await discover(("127.0.0.1", port), initiator_iqn="iqn.2024-01.test:stranger")
        assert [t.iqn for t in seen] == [other.iqn]
        with pytest.raises(IscsiLoginError, match="authorization failure"):
            async with IscsiSession.connect(portal=("127.0.0.1", port), target_iqn=IQN,
                                            initiator_iqn="iqn.2024-01.test:stranger"):
                pass
        seen = await discover(("127.0.0.1", port), initiator_iqn="iqn.2024-01.test:allowed")
        assert sorted(t.iqn for t in seen) == sorted([IQN, other.iqn])
        assert seen[0].portals[0][:2] == ("127.0.0.1", port)
        async with IscsiSession.connect(portal=("127.0.0.1", port), target_iqn=IQN,
                                        initiator_iqn="iqn.2024-01.test:allowed") as s:
            assert target.sessions == [(IQN, "iqn.2024-01.test:allowed")]
            attached.clear()  # detached: the next read fails once the session is dropped
            assert target.drop_sessions(IQN) == 1
            with pytest.raises(IscsiLoginError):
                await s.read_into(0, memoryview(bytearray(4096)))
        with pytest.raises(IscsiLoginError, match="target not found"):
            async with IscsiSession.connect(portal=("127.0.0.1", port),
                                            target_iqn=IQN + "-nope", initiator_iqn="iqn.x:y"):
                pass


async def test_read_only_lun_refuses_writes_and_keeps_its_data() -> None:
    data = pattern(1 << 20, seed=5)
    lun = MemoryLun(data)
    async with served(Export(iqn=IQN, luns=[lun])) as (_t, port), IscsiSession.connect(
        portal=("127.0.0.1", port), target_iqn=IQN, initiator_iqn=INITIATOR_IQN,
    ) as s:
        with pytest.raises(IscsiCommandError, match="write protected"):
            await s.write(0, bytes(64 << 10))
        assert lun.data == data
        # past the end is refused by the target itself (our initiator's own check is lifted)
        s.capacity = Capacity(blocks=s.size // 512 + 8, block_size=512, thin=False)
        with pytest.raises(IscsiCommandError, match="out of range"):
            await s.read_into(len(data), memoryview(bytearray(4096)))


async def test_several_sessions_read_at_once_with_digests() -> None:
    luns = {f"{IQN}-{n}": pattern(2 << 20, seed=n) for n in range(4)}
    exports = {iqn: Export(iqn=iqn, luns=[MemoryLun(d)]) for iqn, d in luns.items()}
    target = IscsiTarget(exports=exports)
    results: dict[str, bytes] = {}

    async def reader(iqn: str, port: int) -> None:
        async with IscsiSession.connect(portal=("127.0.0.1", port), target_iqn=iqn,
                                        initiator_iqn=INITIATOR_IQN + iqn[-2:], digests=True,
                                        queue_depth=4, max_transfer=128 << 10) as s:
            assert s.params.header_digest and s.params.data_digest
            buf = bytearray(s.size)
            await s.read_into(0, memoryview(buf))
            results[iqn] = bytes(buf)

    async with trio.open_nursery() as nursery:
        _h, port = await nursery.start(target.serve, "127.0.0.1", 0)
        async with trio.open_nursery() as readers:
            for iqn in luns:
                readers.start_soon(reader, iqn, port)
        assert target.logins == 4
        nursery.cancel_scope.cancel()
    assert results == luns


def test_memory_lun_is_a_backend() -> None:
    lun = MemoryLun(os.urandom(4096))
    buf = bytearray(512)
    lun.read_into(512, memoryview(buf))
    assert bytes(buf) == bytes(lun.data[512:1024])


class SlowLun(MemoryLun):
    def read_into(self, offset: int, buf: memoryview) -> None:
        time.sleep(0.02)  # 64 reads, 4 at a time: at least 0.3 s in all
        super().read_into(offset, buf)


async def test_sessions_dropped_mid_read_reconnect_and_deliver_exact_data() -> None:
    data = pattern(8 << 20, seed=11)
    target = IscsiTarget(exports={IQN: Export(iqn=IQN, luns=[SlowLun(data)])})
    async with trio.open_nursery() as nursery:
        _h, port = await nursery.start(target.serve, "127.0.0.1", 0)
        async with IscsiSession.connect(portal=("127.0.0.1", port), target_iqn=IQN,
                                        initiator_iqn=INITIATOR_IQN, queue_depth=4,
                                        max_transfer=128 << 10) as s:
            buf = bytearray(len(data))

            async def cut() -> None:
                await trio.sleep(0.1)
                assert target.drop_sessions(IQN) == 1

            async with trio.open_nursery() as inner:
                inner.start_soon(cut)
                await s.read_into(0, memoryview(buf))
            assert s.reconnects >= 1
            assert buf == data
        assert target.logins >= 2
        nursery.cancel_scope.cancel()
