"""log_format=json: one JSON object per line with time, level, tenant, job, vm, disk, phase
and message, the context set by the lifecycle hooks in the task doing the work, and the same
secret masking as text."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from ahvbackup.core import log
from ahvbackup.core.config import load_config
from ahvbackup.core.errors import ConfigError
from ahvbackup.core.ledger import Ledger, Record, ReleaseStack
from ahvbackup.core.plugins import Hooks
from ahvbackup.core.secret import Secret

FIELDS = {"time", "level", "tenant", "job", "vm", "disk", "phase", "logger", "message"}


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    log.reset_logging()


def raise_(err: Exception) -> None:
    raise err


def lines(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_json_lines_carry_the_context_of_the_task_that_logged(tmp_path: Path) -> None:
    path = tmp_path / "debug.log"
    log.configure_logging(verbose=2, debug_log=path, stderr=False, log_format="json")
    hooks, lg = Hooks(autoload=False), logging.getLogger("ahvbackup.test")
    hooks.job_started(job_id="j1", mode="backup", level="full", config=load_config())
    lg.info("job begins")

    async def disk(label: str) -> None:
        hooks.disk_started(job_id="j1", vm_name="db-01", disk=label, size=1)
        await trio.sleep(0)
        lg.debug("reading %s", label)

    async with trio.open_nursery() as nursery:
        hooks.vm_started(job_id="j1", vm_uuid="u", vm_name="db-01")
        for label in ("scsi.0", "scsi.1"):
            nursery.start_soon(disk, label)
    lg.warning("job ends")

    got = lines(path)
    assert all(set(r) == FIELDS for r in got), got
    assert got[0]["time"].endswith("Z") and got[0]["level"] == "INFO"
    by_message = {r["message"]: r for r in got}
    assert {k: by_message["job begins"][k] for k in ("job", "vm", "disk", "phase")} == \
        {"job": "j1", "vm": "", "disk": "", "phase": "job"}
    for label in ("scsi.0", "scsi.1"):  # each disk task logs with its own disk
        r = by_message[f"reading {label}"]
        assert (r["job"], r["vm"], r["disk"], r["phase"]) == ("j1", "db-01", label, "disk")
    assert by_message["job ends"]["vm"] == "db-01" and by_message["job ends"]["disk"] == ""
    assert {r["tenant"] for r in got} == {""}  # tenancy fills it (issue 13)


def test_json_lines_mask_secrets_as_text_lines_do(tmp_path: Path) -> None:
    secret = Secret("hunter2-Pa55/word")
    path = tmp_path / "debug.log"
    log.configure_logging(verbose=3, debug_log=path, stderr=False, log_format="json")
    lg = logging.getLogger("ahvbackup.test")
    lg.info("login as admin:%s", secret.reveal())
    lg.info("url https://admin:%s@pc", "hunter2-Pa55%2Fword")
    try:
        raise_(RuntimeError(f"refused {secret.reveal()}"))
    except RuntimeError:
        lg.exception("it failed")
    text = path.read_text()
    assert "hunter2" not in text
    got = lines(path)
    assert got[0]["message"] == "login as admin:********"
    assert "********" in got[1]["message"]
    assert got[2]["message"] == "it failed" and "refused ********" in got[2]["error"]


def test_log_format_is_a_key_with_two_values() -> None:
    assert load_config().log_format == "text"
    assert load_config(overrides={"log_format": "json"}).log_format == "json"
    with pytest.raises(ConfigError, match=r"log_format"):
        load_config(overrides={"log_format": "xml"})


async def test_releases_log_in_the_cleanup_phase(tmp_path: Path) -> None:
    path = tmp_path / "debug.log"
    log.configure_logging(verbose=2, debug_log=path, stderr=False, log_format="json")
    ledger = Ledger(tmp_path / "state")

    async def release(rec: Record) -> None:
        logging.getLogger("ahvbackup.test").info("deleting %s", rec.resource_id)

    async with ReleaseStack(ledger, owner="j", releaser=release) as stack:
        stack.record("image", "img-1")
    logging.getLogger("ahvbackup.test").info("after")
    phases = {r["message"]: r["phase"] for r in lines(path)}
    assert phases["deleting img-1"] == "cleanup" and phases["released image img-1"] == "cleanup"
    assert phases["after"] == ""
