"""Real Bacula 15.0.3 (Director, Storage and File daemons, bconsole; Debian's bookworm-backports
packages in a private prefix, lab15.py) running our own ``ahvbackup-fd.so`` (bacula/fd-plugin/)
with the metaplugin backend against a served simulator, as an operator would.

One set of daemons serves the whole module (`lab`); each test writes the backend's
configuration file (``AHVBACKUP_CONFIG`` of the file daemon) for its own simulator and uses
Jobs of its own. The daemons, bconsole and the backend are real programs, run in worker threads
so the simulator (served by this test process) keeps serving.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from lab import BaculaLab, JobResult, free_ports
from lab15 import LabConfig, describe, job_lines, lab15
from tests.e2e.e2e_world import MiB, World, same_as_sim

from ahvbackup.bacula.sink import LOOKAHEAD, UNKNOWN_SIZE

pytestmark = pytest.mark.peer

# The FileSets of this module. The backend's keys that every job needs (Prism, CA, state,
# scratch, log) come from the configuration file; the plugin strings hold the selection, as an
# operator's would.
FILESETS: dict[str, str | list[str]] = {
    "ahv-chain": "ahvbackup: vm=mc",
    "ahv-estimate": "ahvbackup: vm=me1,me2",
    "ahv-prism-down": "ahvbackup: vm=mf",
    "ahv-cancel": "ahvbackup: vm=mx",
    "ahv-driver-key": "ahvbackup: vm=md iscsi_port=3261",
    "ahv-streamed": "ahvbackup: vm=ms concurrent_disks=1",
    "ahv-spooled": "ahvbackup: vm=mp concurrent_disks=3",
    "ahv-midfail": "ahvbackup: vm=mfa,mfb concurrent_vms=1 concurrent_disks=1",
}


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BaculaLab, LabConfig]]:
    root = tmp_path_factory.mktemp("bacula15")
    config = LabConfig(root / "ahvbackup.conf")
    config.write({})
    # the Director includes extra.conf (resources a test adds with `add_resources`)
    (root / "lab" / "etc").mkdir(parents=True)
    extra = root / "lab" / "etc" / "extra.conf"
    extra.write_text("")
    bl = lab15(root / "lab", filesets=FILESETS, config=config.path,
               resources=f"@{extra}\n")
    bl.start()
    try:
        yield bl, config
    finally:
        bl.stop()
    assert all(p.poll() is not None for p in bl.procs.values()), "a daemon outlived the lab"


def add_resources(lab: BaculaLab, text: str) -> None:
    """More Director resources (FileSets, Jobs), then `reload`."""
    extra = lab.etc / "extra.conf"
    extra.write_text(extra.read_text() + text)
    out = lab.bconsole("reload")
    assert "rror" not in out, out


def configure(config: LabConfig, world: World, **extra: str) -> None:
    """Point the backend at this test's simulator: the keys an operator's ahvbackup.conf has."""
    passfile = world.tmp / "backup.pass"
    fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("password = backup/4u\n")
    keys = world.overrides(debug_log=str(world.tmp / "backend.log"), verbose="2", **extra)
    keys.pop("repository")
    keys.pop("password")
    keys["passfile"] = str(passfile)
    config.write(keys)


def cluster_of(world: World, vm_uuid: str) -> str:
    vm = world.sim.vms[vm_uuid]
    return world.sim.clusters[vm.cluster_uuid].name


def lines(lab: BaculaLab, job: JobResult) -> str:
    return "\n".join(job_lines(lab, job.job_id))


def assert_clean(lab: BaculaLab, job: JobResult) -> None:
    """Status T, no job errors, no error or warning line in the job's log."""
    assert (job.status, job.errors) == ("T", 0), describe(lab, job)
    text = lines(lab, job)
    bad = [line for line in job_lines(lab, job.job_id)
           if re.search(r"JobId \d+: (.*\b)?(Error|Warning|Fatal error):|Backend reported|"
                        r"Unknown parameter", line)]
    assert not bad, text


async def restore(lab: BaculaLab, job: JobResult, where: Path) -> JobResult:
    return await in_thread(lab.run_job, f"restore jobid={job.job_id} client=lab-fd "
                                        f"where={where} all done yes")


async def test_full_incremental_differential_and_restores_byte_identical(
        lab: tuple[BaculaLab, LabConfig], world: World, tmp_path: Path) -> None:
    bl, config = lab
    configure(config, world)
    size = 16 * MiB
    vm = world.add_vm("mc", [(size, [(0, 3 * MiB), (9 * MiB, 2 * MiB)])], ngt=True)
    disk = Path("@ahvbackup") / cluster_of(world, vm.uuid) / "mc"
    at_full = world.sim.read_disk(vm.uuid, 0, 0, size)

    status = await in_thread(bl.bconsole, "status client=lab-fd")
    assert re.search(r"Plugin: .*\bahvbackup\(1\.0\.0\)", status), status  # our .so is loaded

    full = await in_thread(bl.run_job, "run job=ahv-chain level=Full yes")
    assert_clean(bl, full)
    # the disk stream, vm.json and the plugin's restore options (a restore object the
    # metaplugin saves first in every Full); 5 MiB of data, plus the stream's framing
    assert full.files == 3, describe(bl, full)
    assert 5 * MiB < full.bytes < 5 * MiB + 64 * 1024, describe(bl, full)
    text = lines(bl, full)
    assert re.search(r"ahvbackup: VM backed up: vm=mc backup=\S+ disks=scsi\.0:full", text), text
    assert "Backup OK" in text, text

    world.sim.write_disk(vm.uuid, 0, 12 * MiB, os.urandom(MiB))
    inc = await in_thread(bl.run_job, "run job=ahv-chain level=Incremental yes")
    assert_clean(bl, inc)
    assert re.search(r"VM backed up: vm=mc backup=\S+ disks=scsi\.0:incremental",
                     lines(bl, inc)), lines(bl, inc)
    assert MiB <= inc.bytes < 2 * MiB, describe(bl, inc)
    assert inc.files == 2, describe(bl, inc)

    world.sim.write_disk(vm.uuid, 0, 2 * MiB, os.urandom(MiB))
    diff = await in_thread(bl.run_job, "run job=ahv-chain level=Differential yes")
    assert_clean(bl, diff)
    assert re.search(r"VM backed up: vm=mc backup=\S+ disks=scsi\.0:differential",
                     lines(bl, diff)), lines(bl, diff)
    assert 2 * MiB <= diff.bytes < 3 * MiB, describe(bl, diff)  # both changes since the Full
    assert diff.files == 2, describe(bl, diff)

    world.sim.write_disk(vm.uuid, 0, 5 * MiB, bytes(MiB))
    inc2 = await in_thread(bl.run_job, "run job=ahv-chain level=Incremental yes")
    assert_clean(bl, inc2)
    assert inc2.bytes < 2 * MiB, describe(bl, inc2)  # only the zeroed MiB since the Diff

    # the newest point in ONE restore job: bconsole's most recent selection (the Full, the
    # Differential and the Incremental after it) holds every link, each backup's files being
    # named apart; the backend applies them oldest to newest, each range once
    newest = tmp_path / "newest"
    done = await in_thread(bl.run_job, f"restore client=lab-fd fileset=ahv-chain "
                                       f"where={newest} select current all done yes")
    assert_clean(bl, done)
    assert done.files == 6, describe(bl, done)  # a disk and vm.json of each of the 3 jobs
    ids = [json.loads(p.read_text())["backup_id"] for p in
           sorted((newest / disk).glob("*/vm.json"), key=lambda p: p.parent.name)]
    assert len(ids) == 3, ids
    assert f"chain {'+'.join(ids)})" in lines(bl, done), lines(bl, done)
    assert same_as_sim(world.sim, vm.uuid, 0, newest / disk / "scsi.0.raw")

    # the Full alone
    first = tmp_path / "full"
    done = await restore(bl, full, first)
    assert_clean(bl, done)
    assert (first / disk / "scsi.0.raw").read_bytes() == at_full
    assert re.search(r"disk restored: \S+scsi\.0\.raw \(full", lines(bl, done)), lines(bl, done)
    files = bl.bconsole(f"list files jobid={full.job_id}")
    for name in ("disks/scsi.0.ahvd", "vm.json"):
        assert re.search(rf"/{disk}/[0-9TZ]+-[0-9a-f]+/{name}", files), files
    assert "| RestoreOptions | ahvbackup: vm=mc |" in bl.bconsole(
        f"list restoreobjects jobid={full.job_id}")


def catalog_sizes(lab: BaculaLab, job: JobResult) -> dict[str, int]:
    """Each file of a job and its size as the catalog holds it (st_size of its LStat, decoded
    by the Director: `.bvfs_decode_lstat`)."""
    with sqlite3.connect(f"file:{lab.catalog}?mode=ro", uri=True) as db:
        rows = db.execute("select Path.Path || File.Filename, File.LStat from File join Path "
                          "using (PathId) where File.JobId = ? and File.Filename != ''",
                          (job.job_id,)).fetchall()
    db.close()
    sizes = {}
    for name, lstat in rows:
        out = lab.bconsole(f'.bvfs_decode_lstat lstat="{lstat}"')
        m = re.search(r"^st_size=(-?\d+)$", out, re.M)
        assert m, out
        sizes[name] = int(m.group(1))
    return sizes


def backup_folder(vm_folder: Path) -> Path:
    """The one backup's folder (``<backup id>/``) under a VM's restored folder."""
    (vm_json,) = vm_folder.glob("*/vm.json")
    return vm_json.parent


def streams_of(vm_json: Path) -> dict[str, int]:
    """The exact size of each disk stream of a backup, from its (restored) vm.json."""
    return {d["label"]: d["bytes_stored"] for d in json.loads(vm_json.read_text())["disks"]}


async def test_a_disk_is_streamed_while_it_is_read_and_restores_byte_identical(
        lab: tuple[BaculaLab, LabConfig], world: World, tmp_path: Path) -> None:
    """The sink sends a disk stream as it is read (no spool file), announcing its size as
    unknown (-1, as Bacula's bpipe does) when the stream is longer than its lookahead, exactly
    when not; Bacula stores it whole and the restore (which gets -1 back in the STAT) rebuilds
    the disk byte-identical. One disk at a time (concurrent_disks=1): nothing ever waits, so
    nothing is spooled: working_dir is a folder that cannot be created (under a file), which
    a spool file would need."""
    bl, config = lab
    blocker = world.tmp / "a-file"
    blocker.write_text("working_dir cannot be under a file\n")
    configure(config, world, working_dir=str(blocker / "work"))
    big = 3 * LOOKAHEAD
    vm = world.add_vm("ms", [(64 * MiB, [(0, big // 2), (32 * MiB, big // 2)]),
                             (8 * MiB, [(MiB, MiB)]), (32 * MiB, [(0, big)])], ngt=True)
    root = f"/@ahvbackup/{cluster_of(world, vm.uuid)}/ms"
    full = await in_thread(bl.run_job, "run job=ahv-streamed level=Full yes")
    assert_clean(bl, full)
    assert full.files == 3 + 1 + 1, describe(bl, full)  # 3 disks, vm.json, restore options
    assert "spooling to" not in (world.tmp / "backend.log").read_text()  # no disk waited
    assert blocker.is_file()

    configure(config, world)  # a restore spools what it receives under working_dir
    first = tmp_path / "full"
    done = await restore(bl, full, first)
    assert_clean(bl, done)
    disk = first / root.lstrip("/")
    here = backup_folder(disk)
    streams = streams_of(here / "vm.json")
    sizes = catalog_sizes(bl, full)
    root = f"{root}/{here.name}"
    # longer than the lookahead: streamed, size unknown; the small one: its exact size
    assert sizes[f"{root}/disks/scsi.0.ahvd"] == UNKNOWN_SIZE, sizes
    assert sizes[f"{root}/disks/scsi.2.ahvd"] == UNKNOWN_SIZE, sizes
    assert sizes[f"{root}/disks/scsi.1.ahvd"] == streams["scsi.1"], (sizes, streams)
    assert sizes[f"{root}/vm.json"] == (here / "vm.json").stat().st_size, sizes
    # every byte is in the job: the streams, vm.json and the plugin's restore options
    assert sum(streams.values()) + sizes[f"{root}/vm.json"] <= full.bytes, describe(bl, full)
    assert full.bytes < sum(streams.values()) + sizes[f"{root}/vm.json"] + 4096
    for i in range(3):
        assert same_as_sim(world.sim, vm.uuid, i, disk / f"scsi.{i}.raw"), i

    world.sim.write_disk(vm.uuid, 2, 4 * MiB, os.urandom(2 * LOOKAHEAD))
    inc = await in_thread(bl.run_job, "run job=ahv-streamed level=Incremental yes")
    assert_clean(bl, inc)
    inc_sizes = catalog_sizes(bl, inc)
    assert [v for k, v in inc_sizes.items() if k.endswith("/disks/scsi.2.ahvd")] == \
        [UNKNOWN_SIZE], inc_sizes
    done = await restore(bl, inc, first)  # link by link into the same where, as before
    assert_clean(bl, done)
    for i in range(3):
        assert same_as_sim(world.sim, vm.uuid, i, disk / f"scsi.{i}.raw"), i


async def test_disks_read_while_another_is_sent_are_spooled_and_restore_byte_identical(
        lab: tuple[BaculaLab, LabConfig], world: World, tmp_path: Path) -> None:
    """With three disks read at once, one streams while the others spool meanwhile (each
    spool file removed once sent); every disk is in the job whole, announced with its exact
    size or as unknown (never another size), and restores byte-identical."""
    bl, config = lab
    configure(config, world)
    big = 2 * LOOKAHEAD
    vm = world.add_vm("mp", [(32 * MiB, [(0, big)]), (32 * MiB, [(MiB, big)]),
                             (8 * MiB, [(0, MiB)])], ngt=True)
    root = f"/@ahvbackup/{cluster_of(world, vm.uuid)}/mp"
    full = await in_thread(bl.run_job, "run job=ahv-spooled level=Full yes")
    assert_clean(bl, full)
    assert full.files == 3 + 1 + 1, describe(bl, full)
    assert "spooling to" in (world.tmp / "backend.log").read_text()  # some disk waited
    assert not list(world.tmp.glob("ahvbackup-spool-*/*")), "a spool file was left behind"
    where = tmp_path / "restored"
    done = await restore(bl, full, where)
    assert_clean(bl, done)
    disk = where / root.lstrip("/")
    here = backup_folder(disk)
    streams = streams_of(here / "vm.json")
    sizes = catalog_sizes(bl, full)
    root = f"{root}/{here.name}"
    for i in range(3):
        assert sizes[f"{root}/disks/scsi.{i}.ahvd"] in (streams[f"scsi.{i}"], UNKNOWN_SIZE)
        assert same_as_sim(world.sim, vm.uuid, i, disk / f"scsi.{i}.raw"), i
    assert sum(streams.values()) + sizes[f"{root}/vm.json"] <= full.bytes, describe(bl, full)


async def test_a_disk_that_fails_while_it_is_streamed_fails_its_vm_alone(
        lab: tuple[BaculaLab, LabConfig], world: World, tmp_path: Path) -> None:
    """Prism fails in the middle of a streamed disk: that file's data is ended cleanly (an
    error packet inside a file's data would make the metaplugin stop the backend, failing
    every VM), the job log says the file is incomplete and the VM failed; the other VM of the
    job is backed up and restores byte-identical, and the incomplete file is refused at
    restore."""
    bl, config = lab
    configure(config, world)
    failing = world.add_vm("mfa", [(64 * MiB, [(0, 6 * LOOKAHEAD)])], ngt=True)
    fine = world.add_vm("mfb", [(8 * MiB, [(0, 2 * MiB)])], ngt=True)
    reads = r"^/api/nutanix/v3/images/[^/]+/file$"
    # reads slowed down (8 at once, half a second each), so the test sees the stream going
    slow = world.sim.faults.add(method="GET", path=reads, latency=0.5, count=None)
    log_path = world.tmp / "backend.log"

    def data_reads() -> int:
        return sum(n for k, n in world.sim.stats.requests.items()
                   if k.endswith("GET /api/nutanix/v3/images/{uuid}/file"))

    out = await in_thread(bl.bconsole, "run job=ahv-midfail level=Full yes")
    (job_id,) = (int(x) for x in re.findall(r"Job queued\. JobId=(\d+)", out))
    with trio.fail_after(120):
        while data_reads() < 2 * LOOKAHEAD // MiB + 4:  # mfa (first) is past the lookahead
            await trio.sleep(0.05)
        world.sim.faults.remove(slow.id)
        broken = world.sim.faults.add(method="GET", path=reads, status=500, count=None)
        while "the disk stream stopped after" not in log_path.read_text():
            await trio.sleep(0.05)
        world.sim.faults.remove(broken.id)
    await in_thread(bl.bconsole, f"wait jobid={job_id}")
    job = bl.job(job_id)
    text = lines(bl, job)
    assert job.status == "T" and job.errors > 0, describe(bl, job)
    assert "Backend reported error" not in text and "Protocol error" not in text, text
    assert re.search(r"Warning: ahvbackup: \S+/mfa/\S+/disks/scsi\.0\.ahvd: the disk stream "
                     r"stopped after \d+ bytes were sent \(its reading failed or was "
                     r"cancelled\); that file of this job is incomplete", text), text
    assert re.search(r"Error: ahvbackup: VM mfa: backup failed", text), text
    assert "VM backed up: vm=mfb" in text and "VM backed up: vm=mfa" not in text, text
    files = bl.bconsole(f"list files jobid={job.job_id}")
    assert re.search(r"/mfa/\S+/disks/scsi\.0\.ahvd", files), files
    assert not re.search(r"/mfa/\S+/vm\.json", files), files

    where = tmp_path / "restored"
    done = await restore(bl, job, where)
    assert done.errors > 0, describe(bl, done)  # the incomplete stream is refused
    assert "truncated" in lines(bl, done), lines(bl, done)
    cluster = cluster_of(world, fine.uuid)
    assert same_as_sim(world.sim, fine.uuid, 0, where / "@ahvbackup" / cluster / "mfb" /
                       "scsi.0.raw")
    assert not (where / "@ahvbackup" / cluster_of(world, failing.uuid) / "mfa" /
                "scsi.0.raw").exists()


async def test_estimate_listing_sizes_each_disk_by_its_allocated_data(
        lab: tuple[BaculaLab, LabConfig], world: World) -> None:
    bl, config = lab
    configure(config, world)
    world.add_vm("me1", [(32 * MiB, [(0, 2 * MiB)]), (8 * MiB, [(MiB, MiB)])], ngt=True)
    world.add_vm("me2", [(16 * MiB, [(4 * MiB, 3 * MiB)])], ngt=True)
    before = set(world.sim.snapshots)
    out = await in_thread(bl.bconsole, "estimate job=ahv-estimate level=Full listing")
    listed = {m.group(2): int(m.group(1)) for m in
              re.finditer(r"^\S+\s+\d+\s+\S+\s+\S+\s+(\d+)\s+.*?(/@ahvbackup/\S+)$", out, re.M)}
    disks = {p: n for p, n in listed.items() if p.endswith(".ahvd")}
    assert sorted(p.split("/", 3)[3] for p in disks) == [
        "me1/disks/scsi.0.ahvd", "me1/disks/scsi.1.ahvd", "me2/disks/scsi.0.ahvd"], out
    sizes = {p.split("/", 3)[3]: n for p, n in disks.items()}
    assert sizes["me1/disks/scsi.0.ahvd"] == 2 * MiB, out
    assert sizes["me1/disks/scsi.1.ahvd"] == MiB, out
    assert sizes["me2/disks/scsi.0.ahvd"] == 3 * MiB, out
    m = re.search(r"2000 OK estimate files=(\d+) bytes=([\d,]+)", out)
    assert m and int(m.group(1)) == len(listed), out
    assert set(world.sim.snapshots) == before  # nothing was read or left on the cluster


async def test_a_backup_whose_prism_is_down_ends_with_job_errors_and_says_why(
        lab: tuple[BaculaLab, LabConfig], world: World) -> None:
    bl, config = lab
    (port,) = free_ports(1)
    configure(config, world, prism_central=f"127.0.0.1:{port}")
    job = await in_thread(bl.run_job, "run job=ahv-prism-down level=Full yes")
    text = lines(bl, job)
    assert job.status in ("f", "E") and job.errors > 0, describe(bl, job)
    # nothing of ours was stored; the one file is the plugin's restore options (a restore
    # object the metaplugin saves first in every Full)
    assert (job.files, job.bytes) == (1, 0), describe(bl, job)
    assert "/@ahvbackup/" not in bl.bconsole(f"list files jobid={job.job_id}")
    assert re.search(rf"lab-fd JobId {job.job_id}: Fatal error: ahvbackup: .*127\.0\.0\.1:{port}",
                     text), text
    assert "Backend reported error" not in text, text


async def test_cancel_mid_backup_leaves_nothing_on_the_cluster(
        lab: tuple[BaculaLab, LabConfig], world: World) -> None:
    bl, config = lab
    configure(config, world)
    world.add_vm("mx", [(64 * MiB, [(0, 32 * MiB)]), (32 * MiB, [(0, 16 * MiB)])], ngt=True)
    world.sim.task_seconds = 2  # every Prism task (snapshot, image, volume group) takes 2 s
    out = await in_thread(bl.bconsole, "run job=ahv-cancel level=Full yes")
    (job_id,) = (int(x) for x in re.findall(r"Job queued\. JobId=(\d+)", out))
    with trio.fail_after(60):
        while not world.sim.images:  # snapshot taken, its disks staged as images: mid-backup
            await trio.sleep(0.05)
    cancelled = await in_thread(bl.bconsole, f"cancel jobid={job_id} yes")
    assert "cancel" in cancelled.lower(), cancelled
    await in_thread(bl.bconsole, f"wait jobid={job_id}")
    job = bl.job(job_id)
    text = lines(bl, job)
    assert job.status == "A", describe(bl, job)
    assert job.bytes < 48 * MiB, describe(bl, job)  # it did not run to its end
    assert "Backup Canceled" in text, text
    assert "Backend reported error" not in text, text
    with trio.fail_after(30):  # the backend's cleanup (SIGUSR1) runs before it is terminated
        while world.sim.snapshots or world.sim.images or any(
                world.sim.volume_groups.of_cluster(c) for c in world.sim.clusters):
            await trio.sleep(0.1)


async def test_a_driver_key_in_the_plugin_string_is_accepted(
        lab: tuple[BaculaLab, LabConfig], world: World) -> None:
    bl, config = lab
    configure(config, world)
    vm = world.add_vm("md", [(8 * MiB, [(0, MiB)])], ngt=True)
    job = await in_thread(bl.run_job, "run job=ahv-driver-key level=Full yes")
    assert_clean(bl, job)
    assert "VM backed up: vm=md" in lines(bl, job), lines(bl, job)
    # the key reached the iscsi driver: data_path=auto probed that port (no iSCSI target is
    # served here, so it used rest)
    assert re.search(r"data_path=auto: using rest \(nothing answers on iSCSI at [\d.]+:3261",
                     (world.tmp / "backend.log").read_text())
    where = world.tmp / "driver-key"
    done = await restore(bl, job, where)
    assert_clean(bl, done)
    path = where / "@ahvbackup" / cluster_of(world, vm.uuid) / "md" / "scsi.0.raw"
    assert same_as_sim(world.sim, vm.uuid, 0, path)


async def test_the_whitepaper_filesets_8_1_and_8_2_with_our_plugin_name(
        lab: tuple[BaculaLab, LabConfig], world: World) -> None:
    bl, config = lab
    configure(config, world)
    passfile = world.tmp / "backup.pass"
    cluster = next(iter(world.sim.clusters.values())).name
    prod = {n: world.add_vm(n, [(8 * MiB, [(0, MiB)]), (4 * MiB, [(MiB, 512 * 1024)])], ngt=True)
            for n in ("prod-web", "prod-db")}
    world.add_vm("prod-test-1", [(4 * MiB, [(0, MiB)])], ngt=True)
    # whitepaper 8.1 and 8.2 as printed, with our plugin name, our Prism and passfile, our
    # cluster's name; the multi-line plugin strings stay multi-line; LZO for LZ4, which
    # Bacula 15.0.3 does not have (test_the_whitepapers_lz4_is_refused_by_the_director)
    add_resources(bl, f'''\
FileSet {{
  Name = "Nutanix-All-VMs"
  Include {{
    Options {{
      signature = SHA1
      compression = LZO
    }}
    Plugin = "ahvbackup: prism_central={world.pc}
             passfile={passfile} vm=*"
  }}
}}
FileSet {{
  Name = "Nutanix-Prod-AppConsistent"
  Include {{
    Options {{
      signature = SHA256
      compression = LZO
    }}
    Plugin = "ahvbackup: prism_central={world.pc}
             passfile={passfile}
             vm=prod-* exclude=prod-test-*
             application_consistent=true
             concurrent_vms=4 concurrent_disks=8
             cluster={cluster}"
  }}
}}
Job {{ Name = "wp-8-1"; JobDefs = LabDefs; FileSet = "Nutanix-All-VMs" }}
Job {{ Name = "wp-8-2"; JobDefs = LabDefs; FileSet = "Nutanix-Prod-AppConsistent" }}
''')
    every = await in_thread(bl.run_job, "run job=wp-8-1 level=Full yes")
    assert (every.status, every.errors) == ("T", 0), describe(bl, every)
    text = lines(bl, every)
    backed_up = set(re.findall(r"VM backed up: vm=(\S+)", text))
    assert backed_up == {vm.name for vm in world.sim.vms.values()}, text
    disks = sum(len(vm.data_disks) for vm in world.sim.vms.values())
    assert every.files == disks + len(backed_up) + 1, describe(bl, every)  # + restore options

    prod_job = await in_thread(bl.run_job, "run job=wp-8-2 level=Full yes")
    assert_clean(bl, prod_job)
    text = lines(bl, prod_job)
    assert set(re.findall(r"VM backed up: vm=(\S+)", text)) == set(prod), text
    assert prod_job.files == 2 * 3 + 1, describe(bl, prod_job)  # 2 disks + vm.json each
    assert 2 * (MiB + 512 * 1024) < prod_job.bytes < 3 * (MiB + 512 * 1024), describe(bl, prod_job)
    assert all(re.search(rf"vm={n} .*consistency=application", text) for n in prod), text
    where = world.tmp / "wp"
    done = await restore(bl, prod_job, where)
    assert_clean(bl, done)
    for name, vm in prod.items():
        for i in range(2):
            path = where / "@ahvbackup" / cluster / name / f"scsi.{i}.raw"
            assert same_as_sim(world.sim, vm.uuid, i, path)


def test_the_whitepapers_lz4_is_refused_by_the_director(
        lab: tuple[BaculaLab, LabConfig], tmp_path: Path) -> None:
    """Why the FileSets above say LZO: 15.0.3's Director refuses the whitepaper's LZ4."""
    bl, _ = lab
    conf = (bl.etc / "bacula-dir.conf").read_text().replace(
        "Options { signature = MD5 }", "Options { signature = SHA1; compression = LZ4 }")
    (tmp_path / "lz4.conf").write_text(conf)
    done = subprocess.run([bl.programs["bacula-dir"], "-t", "-c", str(tmp_path / "lz4.conf")],
                          capture_output=True, text=True, timeout=60, env=bl.env, check=False)
    assert done.returncode != 0
    assert "Expected a FileSet option keyword, got:LZ4" in done.stdout + done.stderr
