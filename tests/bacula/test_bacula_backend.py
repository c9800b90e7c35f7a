"""Conformance of the metaplugin backend, played from the file daemon's side over pipes."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from demo_handlers import CLUSTER, DISK_SIZES, MTIME, disk_content, vm_json
from harness import Backend, BackupFile, job_fields

Spawn = Callable[..., Backend]


def _open(spawn: Spawn, params: list[str], *, kind: str = "B", plugin: str = "ahvbackup",
          **job: object) -> Backend:
    b = spawn()
    b.hello(plugin)
    b.job(**job_fields(kind, **job))
    answer = b.params(params)
    assert answer.kind == "F", f"Params refused: {answer!r}"
    return b


def _backup(spawn: Spawn, params: list[str]) -> tuple[list[BackupFile], Backend]:
    b = _open(spawn, params)
    b.start("BackupStart")
    files = b.files(data=True)
    assert b.end() == 0
    return files, b


def test_hello_is_answered_within_200_ms(spawn: Spawn) -> None:
    times = []
    for _ in range(3):  # best of three: the machine is shared
        b = spawn()
        times.append(b.hello())
        b.send("T")
        assert b.close() == 0
    assert min(times) < 0.2, f"time to Hello: {times}"


@pytest.mark.parametrize("plugin", ["ahvbackup", "kubernetes", "podheitor-nutanix"])
def test_any_plugin_name_is_accepted_and_names_the_namespace(spawn: Spawn, plugin: str,
                                                             base_params: list[str]) -> None:
    b = spawn()
    b.hello(plugin)
    b.job(Name="j", JobID=1, Type="B", Level="F")  # no Namespace: the plugin name is used
    assert b.params([*base_params, "vm=alpha"]).kind == "F"
    b.start("EstimateStart")
    files = b.files(data=False)
    assert files[0].fname == f"/@{plugin}/{CLUSTER}/alpha/vm.json"
    assert b.end() == 0


def test_backup_sends_each_vm_config_and_disks_with_attributes(spawn: Spawn,
                                                               base_params: list[str]) -> None:
    files, b = _backup(spawn, [*base_params, "vm=alpha,beta"])
    names = [f.fname for f in files]
    assert names == [
        f"/@ahvbackup/{CLUSTER}/{vm}/{leaf}"
        for vm in ("alpha", "beta")
        for leaf in ("vm.json", "disks/disk-0.ahvd", "disks/disk-1.ahvd")
    ]
    by_name = {f.fname: f for f in files}
    for vm in ("alpha", "beta"):
        meta = by_name[f"/@ahvbackup/{CLUSTER}/{vm}/vm.json"]
        assert meta.data == vm_json(vm)
        assert meta.stat == f"F {len(vm_json(vm))} 0 0 100640 1"
        assert meta.tstamp == f"{MTIME} {MTIME} {MTIME}"
        for i, size in enumerate(DISK_SIZES):
            disk = by_name[f"/@ahvbackup/{CLUSTER}/{vm}/disks/disk-{i}.ahvd"]
            assert disk.data == disk_content(vm, i)
            assert disk.stat.split()[:2] == ["F", str(size)]
    # 2.5 MB crosses the 999999-byte packet limit: every D packet respected it
    sizes = [len(p.payload) for p in b.received if p.kind == "D"]
    assert max(sizes) <= 999_999
    assert len(sizes) > 2 * 3
    assert any(m.kind == "I" and "vm=beta" in m.text for m in b.messages)


def test_job_level_reaches_the_configuration(spawn: Spawn, tmp_path: Path,
                                             base_params: list[str]) -> None:
    b = _open(spawn, [*base_params, "vm=alpha"], level="I")
    b.start("EstimateStart")
    b.files(data=False)
    assert b.end() == 0
    log = (tmp_path / "backend.log").read_text()
    assert "type=B level=incremental" in log


def test_estimate_sends_attributes_only(spawn: Spawn, base_params: list[str]) -> None:
    b = _open(spawn, [*base_params, "vm=alpha"], kind="E")
    b.start("EstimateStart")
    files = b.files(data=False)
    assert [f.stat.split()[1] for f in files] == [str(len(vm_json("alpha"))),
                                                  *map(str, DISK_SIZES)]
    assert not any(p.kind == "D" for p in b.received)
    assert b.end() == 0


def test_listing_lists_one_level(spawn: Spawn, base_params: list[str]) -> None:
    b = _open(spawn, [*base_params, "vm=alpha,beta", f"listing=/{CLUSTER}"], kind="E")
    b.start("ListingStart")
    files = b.files(data=False)
    assert [(f.fname, f.stat.split()[0]) for f in files] == [
        (f"/@ahvbackup/{CLUSTER}/alpha/", "D"), (f"/@ahvbackup/{CLUSTER}/beta/", "D")]
    assert b.end() == 0


def test_query_answers_key_value_lines(spawn: Spawn, base_params: list[str]) -> None:
    b = _open(spawn, [*base_params, "vm=alpha,beta", "query=vms"], kind="E")
    b.start("QueryStart")
    assert b.expect("C").text == "vm=alpha"
    assert b.expect("C").text == "vm=beta"
    b.expect_ack()
    assert b.end() == 0


def test_restore_rebuilds_files_under_where(spawn: Spawn, tmp_path: Path,
                                            base_params: list[str]) -> None:
    files, _ = _backup(spawn, [*base_params, "vm=alpha"])
    where = tmp_path / "restore"
    b = _open(spawn, base_params, kind="R", where=str(where))
    b.start("RestoreStart")
    for f in files:
        answer = b.restore(f"{where}{f.fname}", f.data)
        assert (answer.kind, answer.text) == ("C", "OK")
    b.command("FINISH")
    b.expect_ack()
    assert b.end() == 0
    for f in files:
        assert (where / f.fname.lstrip("/")).read_bytes() == f.data


def test_restore_skips_disks_outside_restore_disks_only(spawn: Spawn, tmp_path: Path,
                                                        base_params: list[str]) -> None:
    where = tmp_path / "r"
    b = _open(spawn, [*base_params, "restore_disks_only=disk-1"], kind="R", where=str(where))
    b.start("RestoreStart")
    root = f"{where}/@ahvbackup/{CLUSTER}/alpha/disks"
    assert b.restore(f"{root}/disk-0.ahvd", disk_content("alpha", 0)).text == "SKIP"
    assert b.restore(f"{root}/disk-1.ahvd", disk_content("alpha", 1)).text == "OK"
    b.command("FINISH")
    b.expect_ack()
    assert b.end() == 0
    assert not Path(f"{root}/disk-0.ahvd").exists()
    assert Path(f"{root}/disk-1.ahvd").read_bytes() == disk_content("alpha", 1)


def test_restore_error_fails_that_file_only(spawn: Spawn, tmp_path: Path,
                                            base_params: list[str]) -> None:
    where = tmp_path / "r"
    b = _open(spawn, base_params, kind="R", where=str(where))
    b.start("RestoreStart")
    bad = b.restore(f"{where}/@ahvbackup/x/reject/vm.json", b"{}" * 100_000)
    assert bad.kind == "E"
    assert "demo refuses this file" in bad.text
    good = b.restore(f"{where}/@ahvbackup/x/ok/vm.json", b"{}")
    assert (good.kind, good.text) == ("C", "OK")
    b.command("FINISH")
    b.expect_ack()
    assert b.end() == 0


def test_bad_parameter_is_refused_with_one_message_naming_it(spawn: Spawn,
                                                             base_params: list[str]) -> None:
    b = spawn()
    b.hello()
    b.job(**job_fields())
    answer = b.params([*base_params, "vmm=alpha", "concurrent_vms=lots"])
    assert answer.kind == "E"
    assert "vmm: unknown key (did you mean 'vm'?)" in answer.text
    assert "concurrent_vms" in answer.text
    # the plugin gives up on this backend: it closes the pipes and waits for the exit
    started = time.monotonic()
    assert b.close() == 0
    assert time.monotonic() - started < 5
    assert [p.kind for p in b.received] == ["C", "F", "E"]


def test_secret_parameter_value_never_reaches_the_job_log(spawn: Spawn,
                                                          base_params: list[str]) -> None:
    b = spawn()
    b.hello()
    b.job(**job_fields())
    answer = b.params([*base_params, "password=S3cr3t-value", "prism_port=notaport"])
    assert answer.kind == "E"
    assert "prism_port" in answer.text
    assert all(b"S3cr3t-value" not in p.payload for p in b.received)
    assert b.close() == 0


def test_backend_error_fails_the_job_with_one_abort(spawn: Spawn,
                                                    base_params: list[str]) -> None:
    b = _open(spawn, [*base_params, "vm=fail-1"])
    b.start("BackupStart")
    abort = b.expect("A")
    assert abort.text == "backup failed: VM fail-1: snapshot failed (demo)"
    assert b.end() == 0


def test_failed_disk_stream_fails_that_file_and_the_job_goes_on(
        spawn: Spawn, base_params: list[str]) -> None:
    b = _open(spawn, [*base_params, "vm=bad-disk-1,alpha"])
    b.start("BackupStart")
    files = b.files(data=True)
    failed = [f for f in files if f.error]
    assert [f.fname for f in failed] == [f"/@ahvbackup/{CLUSTER}/bad-disk-1/disks/disk-0.ahvd"]
    assert "read of disk failed at offset 1200000" in (failed[0].error or "")
    assert failed[0].fname in (failed[0].error or "")
    assert [f.fname.split("/")[3] for f in files].count("alpha") == 3
    assert any(m.kind == "W" and "bad-disk-1" in m.text for m in b.messages)
    assert b.end() == 0


def test_job_errors_never_break_a_file(spawn: Spawn, base_params: list[str]) -> None:
    files, b = _backup(spawn, [*base_params, "vm=complain-1"])
    assert [f.data for f in files[1:]] == [disk_content("complain-1", i) for i in (0, 1)]
    between = [m for m in b.messages if m.kind == "E"]
    inside = [m for m in b.messages if m.kind == "Q"]
    assert [m.text for m in between] == ["VM complain-1: complaint between files (demo)"]
    assert len(inside) == 1  # disk-0 (disk-1 is one chunk): a Q keeps its data stream whole
    assert all("inside a disk stream" in m.text for m in inside)


def test_internal_error_aborts_and_logs_the_traceback(spawn: Spawn, tmp_path: Path,
                                                      base_params: list[str]) -> None:
    b = _open(spawn, [*base_params, "vm=bug-1"])
    b.start("BackupStart")
    abort = b.expect("A")
    assert "internal error (RuntimeError: demo bug in bug-1)" in abort.text
    assert b.end() == 0
    log = (tmp_path / "backend.log").read_text()
    assert "Traceback" in log
    assert "demo bug in bug-1" in log


def test_stray_output_goes_to_the_log_not_the_pipes(spawn: Spawn, tmp_path: Path,
                                                    base_params: list[str]) -> None:
    files, _ = _backup(spawn, [*base_params, "vm=noisy-1"])  # end() checks stderr is empty
    assert len(files) == 3
    log = (tmp_path / "backend.log").read_text()
    assert "stray stdout line from noisy-1" in log
    assert "stray stderr line from noisy-1" in log
    assert "demo warning from noisy-1" in log


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_cancel_releases_resources_and_exits_promptly(spawn: Spawn, tmp_path: Path,
                                                      base_params: list[str],
                                                      signum: int) -> None:
    state = tmp_path / "state"
    b = _open(spawn, [*base_params, "vm=hang-1"])
    b.start("BackupStart")
    info = b.receive_raw()  # the demo says its snapshot is taken
    assert info.kind == "I"
    assert "snapshot taken" in info.text
    assert len(list((state / "ledger").glob("*.json"))) == 1
    started = time.monotonic()
    b.signal(signum)
    assert b.wait(10) == 0
    elapsed = time.monotonic() - started
    assert elapsed < 3, f"exit took {elapsed:.1f} s"
    assert (state / "released-hang-1").read_text() == "snap-hang-1"
    assert list((state / "ledger").glob("*.json")) == []
    b.check_stderr()
    assert "cancel requested" in (tmp_path / "backend.log").read_text()


def test_malformed_header_is_refused_naming_its_bytes(spawn: Spawn,
                                                      base_params: list[str]) -> None:
    b = _open(spawn, base_params)
    b.proc.stdin.write(b"X000001\nZ")
    b.proc.stdin.flush()
    abort = b.expect("A")
    assert abort.text == ("protocol error: bad packet header b'X000001\\n': "
                          "unknown packet type 'X'")
    assert b.close() == 1


def test_wrong_first_command_is_refused(spawn: Spawn) -> None:
    b = spawn()
    b.command("Job")
    abort = b.expect("A")
    assert "expected 'Hello <plugin> <api>' first, got 'Job'" in abort.text
    assert b.close() == 1


def test_pipe_closed_mid_session_exits_without_stderr(spawn: Spawn,
                                                      base_params: list[str]) -> None:
    b = _open(spawn, [*base_params, "vm=alpha"])
    assert b.close() == 1  # no T: an abnormal end, but quiet


@pytest.mark.parametrize("debug_log", [True, False], ids=["debug_log", "no-debug_log"])
def test_stderr_stays_open_and_empty_through_a_backup(spawn: Spawn, tmp_path: Path,
                                                      base_params: list[str],
                                                      debug_log: bool) -> None:
    # the file daemon polls the backend's stderr: an end-of-file there is a job error
    params = base_params if debug_log else [
        "debug_log=" if p.startswith("debug_log=") else p for p in base_params]
    b = _open(spawn, [*params, "vm=alpha"])
    b.check_stderr_open()  # right after Params, where the log is set up
    b.start("BackupStart")
    files = b.files(data=True)
    assert len(files) == 3
    b.check_stderr_open()
    assert b.end() == 0  # T, then the backend reads on until the pipe closes


def test_restore_closed_without_end_after_job_errors_is_a_warning(spawn: Spawn,
                                                                  tmp_path: Path,
                                                                  base_params: list[str]
                                                                  ) -> None:
    where = tmp_path / "r"
    b = _open(spawn, base_params, kind="R", where=str(where))
    b.start("RestoreStart")
    assert b.restore(f"{where}/@ahvbackup/x/reject/vm.json", b"{}").kind == "E"
    assert b.restore(f"{where}/@ahvbackup/x/ok/vm.json", b"{}").text == "OK"
    assert b.hang_up() == 0  # Bacula 13.x/15.x send no END after a job with errors
    assert (where / "@ahvbackup/x/ok/vm.json").read_bytes() == b"{}"
    log = (tmp_path / "backend.log").read_text()
    closing = [line for line in log.splitlines() if "without END" in line]
    assert closing and all("WARNING" in line for line in closing), log[-2000:]


def test_hang_up_in_the_middle_of_a_restored_file_is_an_error(spawn: Spawn, tmp_path: Path,
                                                               base_params: list[str]) -> None:
    where = tmp_path / "r"
    b = _open(spawn, base_params, kind="R", where=str(where))
    b.start("RestoreStart")
    fname = f"{where}/@ahvbackup/x/ok/vm.json"
    b.command(f"FNAME:{fname}")
    b.command("STAT:F 10 0 0 100640 1 0")
    b.eod()
    assert b.receive().text == "OK"
    b.command("DATA")
    b.send("D", b"12345")  # half the file, then the pipe closes
    assert b.hang_up() == 1
