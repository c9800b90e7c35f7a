"""libiscsi's conformance suite (iscsi-test-cu) against tgtd and against our target, and
qemu-img writing to our target.

The suite here runs the iSCSI family and the SCSI suites an initiator of a disk depends on, in
about 30 s for both targets; `bench/iscsi_conformance.py` runs the whole suite and prints both
counts as JSON (the same parser and runner, imported from there).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import trio
from tests.conftest import require_peer
from tests.transports.conftest import pattern

from ahvbackup.transports.iscsi.target import Export, IscsiTarget, MemoryLun
from ahvbackup.transports.iscsi.testing import TgtdTarget

pytestmark = pytest.mark.peer

SUITES = [
    "iSCSI", "SCSI.Inquiry", "SCSI.Mandatory", "SCSI.ModeSense6", "SCSI.TestUnitReady",
    "SCSI.ReadCapacity10", "SCSI.ReadCapacity16", "SCSI.Read6", "SCSI.Read10", "SCSI.Read12",
    "SCSI.Read16", "SCSI.Write10", "SCSI.Write12", "SCSI.Write16", "SCSI.WriteVerify16",
    "SCSI.Verify16", "SCSI.WriteSame16", "SCSI.ReportSupportedOpcodes", "SCSI.Prefetch16",
    "SCSI.OrWrite", "SCSI.GetLBAStatus", "SCSI.PrinReadKeys", "SCSI.ProutRegister",
    "SCSI.ProutReserve",
]


def _bench() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "iscsi_conformance.py"
    spec = importlib.util.spec_from_file_location("iscsi_conformance", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("iscsi_conformance", module)
    spec.loader.exec_module(module)
    return module


def test_parser_tells_passed_from_skipped_and_failed() -> None:
    out = """
Suite: Read10
  Test: Simple ...passed
  Test: DpoFua ...    [SKIPPED] REPORT_SUPPORTED_OPCODES is not implemented.
passed
  Test: Protect ...    [FAILED] READ10 command failed
FAILED
    1. test_read10_rdprotect.c:63  - CU_ASSERT_EQUAL(ret,0)
  Test: Next ...passed    [SKIPPED] PERSISTENT RESERVE IN is not implemented.
  Test: Crash ...
"""
    assert _bench().parse(out) == {"Read10.Simple": "passed", "Read10.DpoFua": "skipped",
                                   "Read10.Protect": "failed", "Read10.Next": "passed",
                                   "Read10.Crash": "crashed"}


@pytest.mark.slow
def test_iscsi_test_cu_passes_everything_tgtd_passes(tgtd: Callable[..., TgtdTarget],
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    require_peer("iscsi-test-cu")
    bench = _bench()
    size = 64 << 20
    theirs_target = tgtd(size=size)
    theirs, _ = bench.run_suite(
        f"iscsi://127.0.0.1:{theirs_target.port}/{theirs_target.iqn}/1", SUITES, timeout=120)
    with bench.OurTarget(size) as ours_target:
        ours, codes = bench.run_suite(ours_target.url, SUITES, timeout=120)
    counts = {"tgtd": bench.summary(theirs), "ours": bench.summary(ours)}
    with capsys.disabled():
        print("\niscsi-test-cu:", {k: {s: v[s] for s in ("passed", "failed", "skipped")}
                                   for k, v in counts.items()})
    assert all(code in (0, 1) for code in codes), f"iscsi-test-cu died: {codes}"
    assert len(theirs) > 100 and set(ours) == set(theirs)
    missing = sorted(k for k, v in theirs.items() if v == "passed" and ours[k] != "passed")
    assert not missing, f"tgtd passes these, we do not: {missing}"
    worse = sorted(k for k, v in ours.items() if v in ("failed", "crashed")
                   and theirs[k] not in ("failed", "crashed"))
    assert not worse, f"we fail where tgtd does not: {worse}"


@pytest.mark.parametrize("block_size", [512, 4096])
async def test_qemu_img_writes_to_our_target_byte_exactly(tmp_path: Path,
                                                          block_size: int) -> None:
    require_peer("qemu-img")
    size = 8 << 20
    src = bytearray(pattern(size, seed=21))
    src[1 << 20 : 3 << 20] = bytes(2 << 20)  # a hole: qemu-img must still write the zeros
    src[5 << 20 : (5 << 20) + 4096] = bytes(4096)
    (tmp_path / "src.raw").write_bytes(src)
    lun = MemoryLun(b"\xa5" * size)  # not zero: nothing may be left as it was
    iqn = "iqn.2010-06.com.nutanix:vg-qemu-write"
    target = IscsiTarget(exports={iqn: Export(iqn=iqn, luns=[lun], read_only=False,
                                              block_size=block_size)})
    async with trio.open_nursery() as nursery:
        _host, port = await nursery.start(target.serve, "127.0.0.1", 0)
        url = f"iscsi://127.0.0.1:{port}/{iqn}/0"
        done = await trio.run_process(
            ["qemu-img", "convert", "-O", "raw", "-n", str(tmp_path / "src.raw"), url],
            capture_stdout=True, capture_stderr=True, check=False)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        assert lun.data == src
        back = tmp_path / "back.raw"
        done = await trio.run_process(["qemu-img", "convert", "-O", "raw", url, str(back)],
                                      capture_stdout=True, capture_stderr=True, check=False)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        assert back.read_bytes() == src
        nursery.cancel_scope.cancel()


def test_bench_script_prints_both_counts_as_json() -> None:
    """The documented full comparison runs (here on one small suite, to stay quick)."""
    require_peer("iscsi-test-cu", "tgtd")
    import json
    import os

    if os.geteuid() != 0:
        pytest.skip("tgtd needs root")
    script = Path(__file__).resolve().parents[2] / "bench" / "iscsi_conformance.py"
    done = subprocess.run([sys.executable, str(script), "--families", "SCSI.Inquiry",
                           "--size-mib", "16"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["tgtd"]["passed"] >= 6 and report["ours"]["passed"] >= 6
    assert report["tgtd_passes_ours_does_not"] == []
