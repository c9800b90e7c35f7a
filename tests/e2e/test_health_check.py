"""`ahvbackup health-check` and `ahvbackup-bacula-backend --standalone health-check` against the
served simulator (HTTPS with its own CA, iSCSI on the clusters' DSIPs): a ready setup passes
every step; each step fails alone with its exit code and hint."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from tests.e2e.e2e_world import IWorld

from ahvbackup.core.config import ConfigSources, ModeView, assemble_config
from ahvbackup.core.drivers import Hypervisor
from ahvbackup.core.health import SKIP
from ahvbackup.core.plugins import Hooks
from ahvbackup.hypervisors.ahv.simulator.tls import CertificateAuthority

CLI = [sys.executable, "-m", "ahvbackup.core.cli"]
BACKEND = Path(sys.executable).with_name("ahvbackup-bacula-backend")
PRISM_STEPS = ["tls", "auth", "clusters", "rbac", "iscsi"]
ALL_STEPS = [*PRISM_STEPS, "repository", "state_dir", "passfile"]
USERS = {"admin": "nutanix/4u", "backup": "backup/4u", "viewer": "viewer/4u"}


def write_conf(w: IWorld, *, user: str = "admin", password: str | None = None,
               name: str = "hc.conf", **extra: Any) -> Path:
    """A configuration file and its passfile (both 0600), as an operator writes them."""
    passfile = w.tmp / f"{name}.pass"
    passfile.write_text(f"password = {password or USERS[user]}\n")
    passfile.chmod(0o600)
    keys: dict[str, Any] = {
        "prism_central": w.pc, "prism_ca_cert": w.ca, "user": user, "passfile": passfile,
        "state_dir": w.tmp / "state", "repository": w.tmp / "repo", "debug_log": "",
        "iscsi_port": w.iscsi_port, "data_path": "iscsi", "prism_rate_rpm": 30,
        "iscsi_initiator": "iqn.2024-01.test:health-host",
    }
    keys.update(extra)
    conf = w.tmp / name
    conf.write_text("".join(f"{k} = {v}\n" for k, v in keys.items()))
    conf.chmod(0o600)
    return conf


async def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(list(args), capture_stdout=True, capture_stderr=True,
                                  check=False)


async def check_json(conf: Path, *more: str) -> tuple[int, dict[str, Any]]:
    proc = await run(*CLI, "--json", "health-check", "-c", str(conf), *more)
    assert proc.stdout, proc.stderr.decode()
    return proc.returncode, json.loads(proc.stdout)


def by_step(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["step"]: c for c in report["checks"]}


def only_failure(report: dict[str, Any]) -> dict[str, Any]:
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    assert len(failed) == 1, [(c["step"], c["status"], c["detail"]) for c in report["checks"]]
    return failed[0]


async def test_a_ready_setup_passes_all_six_steps(iworld: IWorld) -> None:
    conf = write_conf(iworld)
    code, report = await check_json(conf)
    assert code == 0, report
    assert report["ready"] is True and report["exit_code"] == 0
    assert [c["step"] for c in report["checks"]] == ALL_STEPS
    assert [c["number"] for c in report["checks"]] == [1, 2, 3, 4, 5, 6, 6, 6]
    assert {c["status"] for c in report["checks"]} == {"ok"}, report
    steps = by_step(report)
    assert steps["tls"]["data"]["certificate"]["issuer"]
    assert steps["auth"]["data"]["user"] == "admin"
    assert steps["clusters"]["data"]["selected"] == [c.name for c in iworld.sim.clusters.values()]
    perms = steps["rbac"]["data"]["permissions"]
    assert perms and all(p["granted"] for p in perms)
    assert {"create vm_snapshot", "create volume_group", "create vm"} <= {
        p["permission"] for p in perms}
    portals = steps["iscsi"]["data"]["portals"]
    assert {p["portal"] for p in portals} == {
        f"{c.dsip}:{iworld.iscsi_port}" for c in iworld.sim.clusters.values()}
    assert all(p["send_targets"] == "answered" for p in portals)
    assert all(c["seconds"] >= 0 for c in report["checks"])
    timings = ", ".join(f"{c['step']}={c['seconds']:.3f}" for c in report["checks"])
    print(f"health-check against the simulator: {report['seconds']:.3f} s ({timings})")
    # nothing was created on the cluster, nothing left in the folders it probed
    assert iworld.sim.volume_groups.groups == {} and iworld.sim.images == {}
    assert not (iworld.tmp / "repo").exists() or not list((iworld.tmp / "repo").iterdir())

    text = await run(*CLI, "health-check", "-c", str(conf))
    assert text.returncode == 0
    out = text.stdout.decode()
    assert "ready: every check passed" in out
    for step in ALL_STEPS:
        assert f" {step} " in out


async def test_cluster_is_resolved_by_name_and_an_unknown_one_is_a_config_error(
        iworld: IWorld) -> None:
    name = next(iter(iworld.sim.clusters.values())).name
    code, report = await check_json(write_conf(iworld, cluster=name))
    assert code == 0 and by_step(report)["clusters"]["data"]["selected"] == [name]
    code, report = await check_json(write_conf(iworld, cluster="no-such-cluster"))
    assert code == 2
    failure = only_failure(report)
    assert failure["step"] == "clusters" and failure["exit_code"] == 2
    assert name in failure["hint"]


async def test_bad_ca_fails_tls_with_the_certificate_details(iworld: IWorld) -> None:
    other = CertificateAuthority(iworld.tmp / "other-ca")
    conf = write_conf(iworld, prism_ca_cert=other.ca_path)
    code, report = await check_json(conf)
    assert code == 3
    failure = only_failure(report)
    assert failure["step"] == "tls" and failure["exit_code"] == 3
    data = failure["data"]
    assert data["certificate"]["subject"] and data["certificate"]["issuer"]
    assert data["certificate"]["not_after"] and data["certificate"]["subject_alt_names"]
    assert data["ca_bundle"] == str(other.ca_path) and data["ca_subjects"]
    assert "certificate verify failed" in failure["detail"] or "verif" in failure["detail"]
    assert "issuer:" in failure["detail"] and "checked against:" in failure["detail"]
    assert "prism_ca_cert" in failure["hint"]
    steps = by_step(report)
    assert [steps[s]["status"] for s in PRISM_STEPS[1:]] == ["skip"] * 4
    assert [steps[s]["status"] for s in ("repository", "state_dir", "passfile")] == ["ok"] * 3


async def test_wrong_password_fails_authentication(iworld: IWorld) -> None:
    code, report = await check_json(write_conf(iworld, password="not-the-password"))
    assert code == 3
    failure = only_failure(report)
    assert failure["step"] == "auth"
    assert "401" in failure["detail"]
    assert "passfile" in failure["hint"] and "user=" in failure["hint"]
    assert "not-the-password" not in json.dumps(report)


async def test_a_user_without_backup_permissions_is_named_one_by_one(iworld: IWorld) -> None:
    code, report = await check_json(write_conf(iworld, user="viewer"))
    assert code == 3
    failure = only_failure(report)
    assert failure["step"] == "rbac" and failure["exit_code"] == 3
    missing = {p["permission"] for p in failure["data"]["permissions"] if not p["granted"]}
    assert {"create vm_snapshot", "delete vm_snapshot", "create volume_group",
            "update volume_group", "create vm"} <= missing
    assert "view vm" not in missing and "view cluster" not in missing
    for perm in missing:
        assert f"missing: {perm} (" in failure["detail"]
    assert failure["data"]["roles"] == ["Viewer"]
    assert "viewer" in failure["hint"]


async def test_backup_admin_alone_is_ready_for_backups_but_not_restores_to_ahv(
        iworld: IWorld) -> None:
    # backups and restores to files need no VM rights: a warning names what AHV would need
    code, report = await check_json(write_conf(iworld, user="backup"))
    assert code == 0
    rbac = by_step(report)["rbac"]
    assert rbac["status"] == "warn" and "target=ahv" in rbac["detail"]
    missing = {p["permission"] for p in rbac["data"]["permissions"] if not p["granted"]}
    assert missing == {"create vm", "update vm", "delete vm"}
    # with target=ahv the same user is not ready
    code, report = await check_json(write_conf(iworld, user="backup"), "-o", "target=ahv")
    assert code == 3
    failure = only_failure(report)
    missing = {p["permission"] for p in failure["data"]["permissions"] if not p["granted"]}
    assert missing == {"create vm", "update vm", "delete vm"}
    assert "restore" in failure["hint"]


async def test_dsip_down_fails_the_iscsi_probe(rest_only_world: IWorld) -> None:
    code, report = await check_json(write_conf(rest_only_world))
    assert code == 3
    failure = only_failure(report)
    assert failure["step"] == "iscsi" and failure["exit_code"] == 3
    dsip = next(iter(rest_only_world.sim.clusters.values())).dsip
    assert f"{dsip}:{rest_only_world.iscsi_port}" in failure["detail"]
    assert "data_path=rest" in failure["hint"]
    # data_path=auto falls back to REST: a warning, and the host is ready
    code, report = await check_json(write_conf(rest_only_world, data_path="auto"))
    assert code == 0 and by_step(report)["iscsi"]["status"] == "warn"
    code, report = await check_json(write_conf(rest_only_world, data_path="rest"))
    assert code == 0 and by_step(report)["iscsi"]["status"] == "skip"


async def test_a_repository_path_that_is_a_file_is_a_config_error(iworld: IWorld) -> None:
    (iworld.tmp / "repo-file").write_text("not a folder")
    code, report = await check_json(write_conf(iworld, repository=iworld.tmp / "repo-file"))
    assert code == 2
    failure = only_failure(report)
    assert failure["step"] == "repository" and failure["number"] == 6
    assert "not a folder" in failure["detail"] and "repository=" in failure["hint"]


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs (root only; elsewhere the test skips, CI runs it as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    where = tmp_path / "ro"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


async def test_a_read_only_repository_is_refused(iworld: IWorld, read_only_mount: Path) -> None:
    code, report = await check_json(write_conf(iworld, repository=read_only_mount))
    assert code == 3
    failure = only_failure(report)
    assert failure["step"] == "repository" and failure["exit_code"] == 3
    assert "Read-only file system" in failure["detail"]
    assert "writable" in failure["hint"] and "repository=" in failure["hint"]


async def test_a_passfile_open_to_others_is_refused(iworld: IWorld) -> None:
    conf = write_conf(iworld)
    (iworld.tmp / "hc.conf.pass").chmod(0o644)
    code, report = await check_json(conf)
    assert code == 2
    failure = only_failure(report)
    assert failure["step"] == "config" and failure["exit_code"] == 2
    assert failure["number"] == 0 and len(report["checks"]) == 1
    assert "mode 0644" in failure["detail"] and "chmod 600" in failure["hint"]
    text = await run(*CLI, "health-check", "-c", str(conf))
    assert text.returncode == 2 and b"chmod 600" in text.stdout


async def test_no_secret_in_the_output_at_verbose_3(iworld: IWorld) -> None:
    debug_log = iworld.tmp / "debug.log"
    conf = write_conf(iworld, verbose=3, debug_log=debug_log)
    proc = await run(*CLI, "-vvv", "health-check", "-c", str(conf))
    proc_json = await run(*CLI, "--json", "-vvv", "health-check", "-c", str(conf))
    backend = await run(str(BACKEND), "--standalone", "health-check", "-vvv", "--config",
                        str(conf))
    assert proc.returncode == 0 and proc_json.returncode == 0, proc.stderr.decode()[-3000:]
    assert backend.returncode == 0
    assert debug_log.stat().st_size > 0
    out = (proc.stdout + proc.stderr + proc_json.stdout + proc_json.stderr + backend.stdout
           + backend.stderr + debug_log.read_bytes())
    assert b"TRACE" in out or b"trace" in out.lower() or b"GET /users/me" in out
    secrets = [USERS["admin"].encode(),
               base64.b64encode(f"admin:{USERS['admin']}".encode()),
               *(token.encode() for token in iworld.sim.sessions._tokens)]
    assert iworld.sim.sessions._tokens, "the health-check logged in with a session cookie"
    for secret in secrets:
        assert secret not in out


async def test_bacula_backend_standalone_health_check(iworld: IWorld) -> None:
    conf = write_conf(iworld)
    proc = await run(str(BACKEND), "--standalone", "health-check", "--config", str(conf),
                     "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    assert report["ready"] and [c["step"] for c in report["checks"]] == ALL_STEPS
    bad = write_conf(iworld, password="wrong", name="bad.conf")
    proc = await run(str(BACKEND), "--standalone", "health-check", "--config", str(bad))
    assert proc.returncode == 3
    assert b"NOT READY" in proc.stdout and b" auth " in proc.stdout
    proc = await run(str(BACKEND), "--standalone", "no-such-command")
    assert proc.returncode == 2


def test_a_hypervisor_driver_without_checks_says_so() -> None:
    class Bare(Hypervisor):
        name = "bare"

        def connect(self) -> Any:
            raise NotImplementedError

    cfg = assemble_config(ConfigSources(), hooks=Hooks(), view=ModeView("a test"))
    (check,) = trio.run(Bare(cfg).health_checks)
    assert check.status == SKIP and "no health checks" in check.detail


async def test_tls_verification_off_is_a_warning(iworld: IWorld) -> None:
    code, report = await check_json(write_conf(iworld, prism_insecure="yes"))
    assert code == 0 and report["ready"]
    tls = by_step(report)["tls"]
    assert tls["status"] == "warn" and "NOT verified" in tls["detail"]
    assert "prism_insecure" in tls["hint"]
