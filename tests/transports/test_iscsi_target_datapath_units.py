"""The iscsi data path without Prism: its initiator name (explicit, validated, or generated
once and kept), and `open` against our target with CHAP and an ACL."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from tests.transports.conftest import pattern

from ahvbackup.core.drivers import IscsiSource
from ahvbackup.core.errors import DataPathError
from ahvbackup.core.model import DiskInfo, DiskSnapshot
from ahvbackup.core.secret import Secret
from ahvbackup.transports.iscsi import ChapCredentials, IscsiAuthError, datapath
from ahvbackup.transports.iscsi.target import Export, IscsiTarget, MemoryLun


def test_explicit_initiator_name_is_used_and_checked(tmp_path: Path) -> None:
    cfg = SimpleNamespace(iscsi_initiator="iqn.2024-01.com.example:fd1", state_dir=tmp_path)
    assert datapath.initiator_iqn(cfg) == "iqn.2024-01.com.example:fd1"
    cfg.iscsi_initiator = "backup-host"
    with pytest.raises(DataPathError, match=r"iscsi_initiator: .*\(got 'backup-host'\)"):
        datapath.initiator_iqn(cfg)


def test_auto_prefers_the_hosts_name_then_a_stable_generated_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "initiatorname.iscsi"
    monkeypatch.setattr(datapath, "_SYSTEM_IQN", system)
    cfg = SimpleNamespace(iscsi_initiator="auto", state_dir=tmp_path / "state")
    first = datapath.initiator_iqn(cfg)
    assert first.startswith("iqn.2024-01.org.ahvbackup:")
    assert datapath.initiator_iqn(cfg) == first  # kept in state_dir
    assert (tmp_path / "state" / "iscsi_initiator").read_text().strip() == first
    system.write_text("## comment\nInitiatorName=iqn.1993-08.org.debian:01:abc\n")
    assert datapath.initiator_iqn(cfg) == "iqn.1993-08.org.debian:01:abc"


# The data path against our target, with the hypervisor's staging faked: CHAP, discovery, ACL.

IQN = "iqn.2010-06.com.nutanix:vg-unit"
ME = "iqn.2024-01.test:datapath"


class StagedOnly:
    """Stands in for a hypervisor session whose stage_iscsi hands out a fixed source."""

    def __init__(self, source: IscsiSource) -> None:
        self.source = source
        self.asked: list[str] = []

    async def stage_iscsi(self, disk: DiskSnapshot, *, initiator_iqn: str,
                          stack: object) -> IscsiSource:
        self.asked.append(initiator_iqn)
        return self.source


def _disk(size: int) -> DiskSnapshot:
    return DiskSnapshot(disk=DiskInfo(uuid="d1", bus="SCSI", index=0, size=size),
                        snapshot_id="s1", handle="/ctr/.snapshot/x", size=size)


@pytest.mark.parametrize("allowed", [True, False])
async def test_datapath_reads_a_chap_target_and_needs_the_acl(tmp_path: Path,
                                                              allowed: bool) -> None:
    data = pattern(2 << 20, seed=4)
    chap = ChapCredentials("vg-user", Secret("vg-secret-123"))
    export = Export(iqn=IQN, luns=[MemoryLun(data)], chap=chap,
                    allowed=(lambda iqn: iqn == ME) if allowed else (lambda iqn: False))
    target = IscsiTarget(exports={IQN: export})
    cfg = SimpleNamespace(iscsi_initiator=ME, state_dir=tmp_path, chunk_size_mib=1)
    async with trio.open_nursery() as nursery:
        _h, port = await nursery.start(target.serve, "127.0.0.1", 0)
        session = StagedOnly(IscsiSource(portal=("127.0.0.1", port), target_iqn=IQN, lun=0,
                                         size=len(data), chap=("vg-user",
                                                               Secret("vg-secret-123"))))
        path = datapath.IscsiDataPath(cfg)
        opened = path.open(session, _disk(len(data)), stack=None)  # type: ignore[arg-type]
        if not allowed:
            with pytest.raises(DataPathError, match=f"does not offer {IQN} to {ME}"):
                async with opened:
                    pass
        else:
            async with opened as reader:
                buf = bytearray(1000)  # not block-aligned: read through a bounce buffer
                await reader.read_into(1234, memoryview(buf))
                assert buf == data[1234:2234]
                whole = bytearray(len(data))
                await reader.read_into(0, memoryview(whole))
                assert whole == data
                assert target.sessions == [(IQN, ME)]
            with trio.fail_after(5):  # logged out: the target forgets the session
                while target.sessions:
                    await trio.sleep(0.01)
        assert session.asked == [ME]
        nursery.cancel_scope.cancel()


async def test_datapath_with_a_wrong_chap_secret_fails_clearly(tmp_path: Path) -> None:
    export = Export(iqn=IQN, luns=[MemoryLun(1 << 20)],
                    chap=ChapCredentials("vg-user", Secret("vg-secret-123")))
    target = IscsiTarget(exports={IQN: export})
    cfg = SimpleNamespace(iscsi_initiator=ME, state_dir=tmp_path, chunk_size_mib=1)
    async with trio.open_nursery() as nursery:
        _h, port = await nursery.start(target.serve, "127.0.0.1", 0)
        session = StagedOnly(IscsiSource(portal=("127.0.0.1", port), target_iqn=IQN, lun=0,
                                         size=1 << 20, chap=("vg-user", Secret("nope-nope"))))
        with pytest.raises(IscsiAuthError) as info:
            async with datapath.IscsiDataPath(cfg).open(
                    session, _disk(1 << 20), stack=None):  # type: ignore[arg-type]
                pass
        assert "nope-nope" not in str(info.value)
        nursery.cancel_scope.cancel()
