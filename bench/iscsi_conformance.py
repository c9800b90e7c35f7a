"""Run libiscsi's conformance suite (`iscsi-test-cu`) against tgtd and against our target, on
LUNs of the same size, and print JSON with the counts of each and the tests where they differ.

    .venv/bin/python bench/iscsi_conformance.py [--families iSCSI,SCSI] [--size-mib 64]

`--families` takes iscsi-test-cu test specs (FAMILY[.SUITE[.TEST]], comma-separated); the
default, iSCSI and SCSI, is the whole suite once (its ALL and LINUX families repeat the SCSI
tests). Destructive tests are allowed (`-d`): both LUNs are scratch. Needs root, tgt and
libiscsi-bin. Our target runs in a child process (`--serve`), so the suite talks to it over TCP
exactly as to tgtd.

CUnit counts a test that skips itself ("[SKIPPED] X is not implemented") as passed; here a
test is `passed` only when it ran and passed, `skipped` when it skipped itself, `failed` when an
assertion failed, and `crashed` when iscsi-test-cu died before reporting it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUR_IQN = "iqn.2024-01.bench.ahvbackup:conformance"
MiB = 1 << 20

_RESULT = re.compile(r"(?<![\[\w])(passed|FAILED)(?![\]\w])")


def parse(text: str) -> dict[str, str]:
    """iscsi-test-cu's verbose output -> {"Suite.Test": status}."""
    results: dict[str, str] = {}
    suite = ""
    current: str | None = None
    lines: list[str] = []

    def close() -> None:
        if current is None:
            return
        body = "\n".join(lines)
        found = _RESULT.search(body)
        if found is None:
            results[current] = "crashed"
        elif found.group(1) == "FAILED":
            results[current] = "failed"
        else:
            results[current] = "skipped" if "[SKIPPED]" in body[: found.start()] else "passed"

    for line in text.splitlines():
        if m := re.match(r"^Suite: (\S+)", line):
            close()
            current, suite = None, m.group(1)
        elif m := re.match(r"^  Test: (\S+) \.\.\.(.*)$", line):
            close()
            current, lines = f"{suite}.{m.group(1)}", [m.group(2)]
        elif line.startswith("Run Summary"):
            close()
            current = None
        elif current is not None:
            lines.append(line)
    close()
    return results


def run_suite(url: str, specs: list[str], *, timeout: float = 900) -> tuple[dict[str, str],
                                                                            list[int]]:
    """Run each spec against `url`; returns (results, return codes)."""
    results: dict[str, str] = {}
    codes: list[int] = []
    exe = shutil.which("iscsi-test-cu") or "iscsi-test-cu"
    for spec in specs:
        done = subprocess.run([exe, "-d", "-t", spec, url], capture_output=True,
                              timeout=timeout, check=False)
        codes.append(done.returncode)
        results.update(parse(done.stdout.decode(errors="replace")
                             + done.stderr.decode(errors="replace")))
    return results, codes


def summary(results: dict[str, str]) -> dict[str, object]:
    out: dict[str, object] = {s: sum(1 for v in results.values() if v == s)
                              for s in ("passed", "failed", "skipped", "crashed")}
    out["total"] = len(results)
    out["failed_tests"] = sorted(k for k, v in results.items() if v in ("failed", "crashed"))
    return out


class OurTarget:
    """Our target with one writable MemoryLun of `size` bytes, in a child process."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def __enter__(self) -> OurTarget:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(self.size)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.proc.kill()
            raise RuntimeError(f"our target did not start: {line!r}")
        self.port = int(line)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    @property
    def url(self) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{OUR_IQN}/0"


def _serve(size: int) -> None:
    import trio

    from ahvbackup.transports.iscsi.target import Export, IscsiTarget, MemoryLun

    target = IscsiTarget(exports={OUR_IQN: Export(iqn=OUR_IQN, luns=[MemoryLun(size)],
                                                  read_only=False)})

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            _host, port = await nursery.start(target.serve, "127.0.0.1", 0)
            print(port, flush=True)

    trio.run(main)


def compare(specs: list[str], size: int) -> dict[str, object]:
    from ahvbackup.transports.iscsi.testing import TgtdTarget

    report: dict[str, object] = {"families": specs, "lun_bytes": size}
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "tgtd.img"
        with open(image, "wb") as f:
            f.truncate(size)
        tgtd = TgtdTarget(image=image, log_path=Path(tmp) / "tgtd.log").start()
        try:
            start = time.monotonic()
            theirs, codes = run_suite(f"iscsi://127.0.0.1:{tgtd.port}/{tgtd.iqn}/1", specs)
            report["tgtd"] = summary(theirs) | {"seconds": round(time.monotonic() - start, 1),
                                                "exit_codes": codes}
        finally:
            tgtd.stop()
    with OurTarget(size) as ours:
        start = time.monotonic()
        mine, codes = run_suite(ours.url, specs)
        report["ours"] = summary(mine) | {"seconds": round(time.monotonic() - start, 1),
                                          "exit_codes": codes}
    report["tgtd_passes_ours_does_not"] = sorted(
        k for k, v in theirs.items() if v == "passed" and mine.get(k) != "passed")
    report["ours_passes_tgtd_does_not"] = sorted(
        k for k, v in mine.items() if v == "passed" and theirs.get(k) != "passed")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default="iSCSI,SCSI")
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--serve", type=int, metavar="BYTES", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        _serve(args.serve)
        return
    specs = [s.strip() for s in args.families.split(",") if s.strip()]
    print(json.dumps(compare(specs, args.size_mib * MiB), indent=2))


if __name__ == "__main__":
    main()
