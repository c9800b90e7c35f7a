"""`ahvbackup report`: per-VM status from a real repository, and the page as a browser shows it
(Debian's headless Chromium): the table and the charts render, the console stays silent, and the
page fetches nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from PIL import Image
from tests.conftest import require_peer
from tests.e2e.e2e_world import MiB, World

from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.core.report import build_report, render_html

CLI = [sys.executable, "-m", "ahvbackup.core.cli"]
BAR = (0x15, 0x65, 0xC0)  # the charts' bar colour
OK = (0x2E, 0x7D, 0x32)  # the status dot of a healthy VM


async def _chains(world: World) -> Runtime:
    """VM good-vm: full + incremental. VM lost-vm: full + incremental, then its full deleted
    from the repository, so its newest point cannot be restored."""
    for name in ("good-vm", "lost-vm"):
        world.add_vm(name, [(8 * MiB, [(0, MiB)])])
    rt = Runtime.from_config(world.config(vm="good-vm,lost-vm"))
    assert (await BackupJob(rt).run()).ok
    world.sim.write_disk(world.sim.find_vm("good-vm").uuid, 0, 2 * MiB, b"\x01" * 65536)
    rt = Runtime.from_config(world.config(vm="good-vm,lost-vm", level="incremental"))
    assert (await BackupJob(rt).run()).ok
    [lost_full] = [b for b in await rt.sink.backups("lost-vm") if b.level == "full"]
    [folder] = [p for p in (world.tmp / "repo").rglob(lost_full.backup_id) if p.is_dir()]
    shutil.rmtree(folder)
    return rt


async def test_the_report_says_which_vm_is_protected_and_which_is_not(world: World) -> None:
    rt = await _chains(world)
    report = build_report(await rt.sink.backups(), await rt.sink.damaged())
    by_name = {v.vm_name: v for v in report.vms}
    good, lost = by_name["good-vm"], by_name["lost-vm"]
    assert good.status == "ok" and [p.level for p in good.points] == ["full", "incremental"]
    assert good.last is not None and good.last.chain_depth == 2
    assert all(p.restorable for p in good.points) and good.last.duration > 0
    assert lost.status == "broken" and len(lost.points) == 1 and lost.last is None
    assert "chain link missing" in lost.points[0].problem
    assert sum(b for _, b in report.bytes_per_day) == sum(
        b.bytes_stored for b in await rt.sink.backups())

    done = await trio.run_process([*CLI, "--json", "report", *world.cli_args()],
                                  capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    as_json = json.loads(done.stdout)
    assert {v["vm_name"]: v["status"] for v in as_json["vms"]} == {"good-vm": "ok",
                                                                   "lost-vm": "broken"}


def _chromium(page: Path, shot: Path) -> str:
    """Open `page` headless, screenshot it; returns what the browser logged."""
    exe = require_peer("chromium")["chromium"]
    done = subprocess.run(
        [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--enable-logging=stderr", "--v=0", "--window-size=1200,1400",
         f"--user-data-dir={page.parent / 'chromium-profile'}", f"--screenshot={shot}",
         page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and shot.exists(), done.stderr
    return done.stderr


def _pixels(shot: Path, colour: tuple[int, int, int]) -> int:
    with Image.open(shot) as img:
        counts = img.convert("RGB").getcolors(maxcolors=1 << 24) or []
    return sum(n for n, c in counts if c == colour)


@pytest.mark.peer
async def test_the_page_renders_in_a_browser_and_fetches_nothing(world: World) -> None:
    rt = await _chains(world)
    page = world.tmp / "report.html"
    done = await trio.run_process([*CLI, "report", "--out", str(page), *world.cli_args()],
                                  capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert b"2 VMs (1 ok, 0 stale, 1 broken)" in done.stderr
    text = page.read_text()
    assert text.count('class="vm"') == 2 and text.count("<svg") == 3  # per day + 2 VMs
    shot = world.tmp / "report.png"
    log = await trio.to_thread.run_sync(_chromium, page, shot)
    assert ":CONSOLE" not in log, log  # no error, and no blocked fetch (CSP violations log here)
    assert _pixels(shot, BAR) > 500, "the charts' bars are not on the screenshot"
    assert _pixels(shot, OK) > 20, "the healthy VM's status dot is not on the screenshot"

    # the check above can fail: the same page with one remote image is caught
    leaky = world.tmp / "leaky.html"
    leaky.write_text(render_html(build_report(await rt.sink.backups(), [])).replace(
        "</body>", '<img src="http://127.0.0.1:9/pixel.png"></body>'))
    log = await trio.to_thread.run_sync(_chromium, leaky, world.tmp / "leaky.png")
    assert ":CONSOLE" in log and "127.0.0.1:9/pixel.png" in log
