"""Drivers emit their events through the running job's hooks (`Hooks.current()`): Prism
answers, retries and failures by endpoint, iSCSI logins and attach failures; outside a job
they reach no plugin."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.metrics.peers import free_port

from ahvbackup.core import hookimpl
from ahvbackup.core.config import load_config
from ahvbackup.core.errors import ApiAuthError
from ahvbackup.core.plugins import Hooks
from ahvbackup.core.secret import Secret
from ahvbackup.hypervisors.ahv.client import connect_prism
from ahvbackup.hypervisors.ahv.simulator import Simulator, pc_app
from ahvbackup.transports.iscsi.errors import IscsiError
from ahvbackup.transports.iscsi.initiator import IscsiSession

Event = tuple[str, tuple[tuple[str, str], ...]]


class Recorder:
    def __init__(self) -> None:
        self.seen: list[Event] = []

    @hookimpl
    def ahvbackup_metric(self, name: str, value: float, labels: dict[str, str]) -> None:
        self.seen.append((name, tuple(sorted(labels.items()))))


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Simulator]:
    s = Simulator(tmp_path / "sim", task_seconds=0.05, sync=False)
    yield s
    s.close()


def a_job(recorder: Recorder) -> None:
    Hooks(autoload=False, plugins=(recorder,)).job_started(
        job_id="j", mode="backup", level="full", config=load_config())


async def test_prism_answers_retries_and_failures_by_endpoint(sim: Simulator) -> None:
    outside, inside = Recorder(), Recorder()
    Hooks(autoload=False, plugins=(outside,))  # registered, but no job started with it
    a_job(inside)
    sim.faults.add(method="POST", path=r"/vms/list$", status=503, retry_after=0, count=1)
    sim.faults.add(method="GET", path=r"/vms/[0-9a-f-]+$", status=403, count=1)
    async with connect_prism(
        "https://pc.sim:9440", user="backup", password=Secret("backup/4u"), rate_rpm=0,
        transport=httpx.ASGITransport(app=pc_app(sim)),
    ) as prism:
        vms = await prism.pc.list_vms()
        with pytest.raises(ApiAuthError):
            await prism.pc.get_vm(vms[0].uuid)
    post = (("endpoint", "/vms/list"), ("method", "POST"))
    get = (("endpoint", "/vms/{id}"), ("method", "GET"))
    assert [e for e in inside.seen if e[1][:2] in (post, get)] == [
        ("prism_requests", (*post, ("status", "503"))),
        ("prism_retries", (*post, ("reason", "503"))),
        ("prism_requests", (*post, ("status", "200"))),
        ("prism_requests", (*get, ("status", "403"))),
        ("prism_errors", (*get, ("status", "403"))),
    ]
    assert outside.seen == []


async def test_an_iscsi_login_nobody_answers_is_a_failed_login_and_attach() -> None:
    recorder = Recorder()
    a_job(recorder)
    with pytest.raises(IscsiError):
        async with IscsiSession.connect(portal=("127.0.0.1", free_port()),
                                        target_iqn="iqn.2024-01.org.x:t",
                                        initiator_iqn="iqn.2024-01.org.x:i", login_timeout=2):
            pass
    assert recorder.seen == [("iscsi_logins", (("outcome", "failed"),)),
                             ("iscsi_attach_failures", ())]
