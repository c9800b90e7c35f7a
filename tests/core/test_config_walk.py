"""The whole key table, walked: every key either changes what a job does, or is refused when
set (one line naming it, saying this version does not do it yet).

Each working key has an entry in `EVIDENCE`: a check that runs real jobs against a served
simulator with the key set two ways and asserts what an operator would notice (a different
result, a failure, files in a different place). Each refused key is set in a config file, a
plugin string and on the command line, and each time the job is refused before it starts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import socket
import subprocess
import sys
import time
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from tests.core.dr.walk_evidence import DR_EVIDENCE
from tests.core.tenant_walk_evidence import TENANT_EVIDENCE
from tests.e2e.e2e_world import MiB, World

from ahvbackup.core import hookimpl
from ahvbackup.core.cli.options import refuse_hosted_sink
from ahvbackup.core.config import (
    KEYS,
    NOT_YET,
    Config,
    ConfigSources,
    assemble_config,
    view_of_job,
)
from ahvbackup.core.errors import AhvBackupError, ConfigError
from ahvbackup.core.jobs import retention
from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.results import JobResult
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.core.plugins import Hooks, load_driver
from ahvbackup.hypervisors.ahv.simulator import Simulator, serve_simulator

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "ahvbackup.core.cli"]
BACKUP = view_of_job("the walk", "backup")
REFUSED = {n.key: n for n in NOT_YET}


# the world -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Walk:
    """A served simulator (Prism and its iSCSI target) and jobs run against it in-process.
    `not_prism` is a local port that answers, but not as Prism: a wrong endpoint fails at
    once there (where a closed port is retried for a minute)."""

    world: World
    iscsi_port: int
    not_prism: int

    def keys(self, **extra: Any) -> dict[str, str]:
        """The world's keys with `extra` applied; a value of None drops the key."""
        keys = self.world.overrides(iscsi_port=self.iscsi_port)
        for k, v in extra.items():
            if v is None:
                keys.pop(k, None)
            else:
                keys[k] = str(v)
        return keys

    def config(self, **extra: Any) -> Config:
        return assemble_config(ConfigSources(overrides=self.keys(**extra)), hooks=Hooks(),
                               view=BACKUP, require=("prism_central", "user", "password"))

    async def backup(self, *, plugins: tuple[object, ...] = (), **extra: Any) -> JobResult:
        cfg = self.config(**extra)
        return await BackupJob(Runtime.from_config(cfg, hooks=Hooks(plugins=plugins))).run()

    async def works(self, **extra: Any) -> JobResult:
        result = await self.backup(**extra)
        assert result.vms and result.ok, result.to_json()
        return result

    async def fails(self, **extra: Any) -> str:
        """The job's failure (raised, or a failed VM), as text."""
        try:
            result = await self.backup(**extra)
        except AhvBackupError as err:
            return str(err)
        assert not result.ok, f"expected a failure with {extra}"
        return "; ".join(result.failed + [v.error or "" for v in result.vms])

    async def cli(self, *args: str, **extra: Any) -> subprocess.CompletedProcess[str]:
        """The command line, in a thread: the simulator is served by this test's event loop."""
        sets = [a for k, v in self.keys(**extra).items() for a in ("-o", f"{k}={v}")]
        return await trio.to_thread.run_sync(lambda: subprocess.run(
            [*CLI, *args, *sets], capture_output=True, text=True, timeout=120, check=False))


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _not_prism(stream: trio.SocketStream) -> None:
    with trio.move_on_after(5):
        await stream.send_all(b"HTTP/1.0 400 Bad Request\r\n\r\n")  # plain text, no TLS
        await stream.aclose()


@asynccontextmanager
async def _walk(tmp_path: Path) -> AsyncIterator[Walk]:
    sim = Simulator(tmp_path / "sim", seed=True, task_seconds=0.05, sync=False)
    try:
        async with serve_simulator(sim, port=0, tls=True, iscsi_port=0) as ep:
            assert ep.ca_path is not None
            ((_host, port),) = set(ep.iscsi_portals.values())
            world = World(sim=sim, pc=ep.pc_url.split("://", 1)[1], ca=ep.ca_path, tmp=tmp_path)
            world.add_vm("walk-a", [(2 * MiB, [(0, MiB)]), (MiB, [(0, 512 * 1024)])])
            world.add_vm("walk-b", [(MiB, [(0, MiB)])])
            async with trio.open_nursery() as nursery:
                (listener,) = await nursery.start(
                    functools.partial(trio.serve_tcp, _not_prism, 0, host="127.0.0.1"))
                yield Walk(world, port, listener.socket.getsockname()[1])
                nursery.cancel_scope.cancel()
    finally:
        sim.close()


# evidence for the working keys ------------------------------------------------------------------

def names(result: JobResult) -> list[str]:
    return sorted(v.vm_name for v in result.vms)


async def prism_endpoint(w: Walk) -> None:
    await w.works(vm="walk-b")
    assert await w.fails(vm="walk-b", prism_central=f"127.0.0.1:{w.not_prism}")
    host, port = w.world.pc.rsplit(":", 1)
    await w.works(vm="walk-b", prism_central=host, prism_port=port)
    assert await w.fails(vm="walk-b", prism_central=host, prism_port=w.not_prism)


async def credentials(w: Walk, tmp: Path) -> None:
    await w.works(vm="walk-b")
    assert await w.fails(vm="walk-b", user="nobody")
    assert await w.fails(vm="walk-b", password="wrong")
    good, bad = tmp / "good.pass", tmp / "bad.pass"
    for path, pw in ((good, "backup/4u"), (bad, "wrong")):
        path.write_text(f"password = {pw}\n")
        path.chmod(0o600)
    await w.works(vm="walk-b", password=None, passfile=good)
    assert await w.fails(vm="walk-b", password=None, passfile=bad)


async def tls_trust(w: Walk) -> None:
    await w.works(vm="walk-b")
    assert await w.fails(vm="walk-b", prism_ca_cert=None)  # the simulator's CA is not trusted
    await w.works(vm="walk-b", prism_ca_cert=None, prism_insecure="yes")


async def cluster(w: Walk) -> None:
    name = next(iter(w.world.sim.clusters.values())).name
    assert names(await w.works(vm="walk-*", cluster=name)) == ["walk-a", "walk-b"]
    assert await w.fails(vm="walk-*", cluster="no-such-cluster")


async def selection(w: Walk) -> None:
    assert names(await w.works(vm="walk-a")) == ["walk-a"]
    assert names(await w.works(vm="walk-*", exclude="walk-a")) == ["walk-b"]


async def application_consistent(w: Walk) -> None:
    ok = await w.works(vm="walk-b", application_consistent="try")
    assert ok.vms[0].consistency == "crash"
    assert await w.fails(vm="walk-b", application_consistent="true")  # no guest tools


async def data_path(w: Walk) -> None:
    nowhere = _unused_port()
    await w.works(vm="walk-b", data_path="rest", iscsi_port=nowhere)
    assert await w.fails(vm="walk-b", data_path="iscsi", iscsi_port=nowhere)
    await w.works(vm="walk-b", data_path="iscsi")
    assert await w.fails(vm="walk-b", data_path="iscsi", dsip="127.0.0.77")


async def iscsi_initiator(w: Walk) -> None:
    from ahvbackup.transports.iscsi.datapath import initiator_iqn

    iqn = "iqn.2024-01.org.example:walk"
    assert initiator_iqn(w.config(iscsi_initiator=iqn)) == iqn
    assert initiator_iqn(w.config()) != iqn
    await w.works(vm="walk-b", data_path="iscsi", iscsi_initiator=iqn)


class Overlap:
    """Hook plugin: the most VMs (or disks) in flight at once."""

    def __init__(self) -> None:
        self.now = {"vm": 0, "disk": 0}
        self.most = {"vm": 0, "disk": 0}

    def _step(self, what: str, by: int) -> None:
        self.now[what] += by
        self.most[what] = max(self.most[what], self.now[what])

    @hookimpl
    def ahvbackup_vm_started(self, job_id: str, vm_uuid: str, vm_name: str) -> None:
        self._step("vm", 1)

    @hookimpl
    def ahvbackup_vm_finished(self, job_id: str, vm_uuid: str) -> None:
        self._step("vm", -1)

    @hookimpl
    def ahvbackup_disk_started(self, job_id: str, disk: str) -> None:
        self._step("disk", 1)

    @hookimpl
    def ahvbackup_disk_finished(self, job_id: str, disk: str) -> None:
        self._step("disk", -1)


async def concurrency(w: Walk) -> None:
    w.world.add_vm("walk-c", [(MiB, [(0, MiB)]), (MiB, [(0, MiB)]), (MiB, [(0, MiB)])])
    w.world.sim.faults.add(method="GET", path=r"/images/.*/file", latency=0.2, count=None)
    one, many = Overlap(), Overlap()
    await w.backup(plugins=(one,), vm="walk-*", concurrent_vms=1, concurrent_disks=1)
    await w.backup(plugins=(many,), vm="walk-*", concurrent_vms=3, concurrent_disks=3)
    assert one.most == {"vm": 1, "disk": 1}
    assert many.most["vm"] > 1 and many.most["disk"] > 1, many.most


async def chunk_size(w: Walk) -> None:
    iscsi = load_driver("datapath", "iscsi")
    assert iscsi(w.config(chunk_size_mib=1)).read_size() == MiB
    assert iscsi(w.config(chunk_size_mib=4)).read_size() == 4 * MiB


async def rate(w: Walk) -> None:
    async def lists_vms(rpm: int) -> bool:
        hyp = Runtime.from_config(w.config(prism_rate_rpm=rpm)).hypervisor
        with trio.move_on_after(3):
            async with hyp.connect() as session:  # creates nothing on the cluster
                await session.discover()
                await session.list_vms()
            return True
        return False

    assert await lists_vms(100_000)
    assert not await lists_vms(1)  # one request a minute: the second one waits


async def mode(w: Walk) -> None:
    est = await w.works(vm="walk-b", mode="estimate")
    assert est.mode == "estimate" and est.vms[0].bytes_stored == 0
    assert not list((w.world.tmp / "repo").rglob("manifest.json"))
    real = await w.works(vm="walk-b", mode="backup")
    assert real.vms[0].bytes_stored > 0
    with pytest.raises(ConfigError,
                       match=r"mode: failover-test .*this version does not do that yet"):
        w.config(mode="failover-test")


async def restore_place(w: Walk, tmp: Path) -> None:
    await w.works(vm="walk-a")
    only, every = tmp / "only", tmp / "every"
    done = await w.cli("restore", "--vm", "walk-a", where=only, restore_disks_only="scsi.1")
    assert done.returncode == 0, done.stderr
    done = await w.cli("restore", "--vm", "walk-a", where=every)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in only.rglob("*.raw")) == ["scsi.1.raw"]
    assert sorted(p.name for p in every.rglob("*.raw")) == ["scsi.0.raw", "scsi.1.raw"]


async def logging_keys(w: Walk, tmp: Path) -> None:
    log = tmp / "debug.log"
    quiet = await w.cli("backup", vm="walk-b", verbose=0)
    loud = await w.cli("backup", vm="walk-b", verbose=2, debug_log=log)
    assert quiet.returncode == 0 and loud.returncode == 0, loud.stderr
    assert quiet.stderr == ""
    assert "DEBUG" in loud.stderr or "debug" in loud.stderr.lower(), loud.stderr[:500]
    assert log.stat().st_size > 0 and log.stat().st_mode & 0o077 == 0


async def log_format(w: Walk, tmp: Path) -> None:
    from ahvbackup.core.cli.options import load_job_config
    from ahvbackup.core.log import reset_logging

    text, lines = tmp / "text.log", tmp / "json.log"
    for log, fmt in ((text, "text"), (lines, "json")):  # set up as the CLI does, in-process
        keys = w.keys(vm="walk-b", debug_log=log, log_format=fmt)
        cfg = load_job_config(configs=(), sets=[f"{k}={v}" for k, v in keys.items()],
                              plugin_string=None, hooks=Hooks(), stderr=False, view=BACKUP)
        try:
            assert (await BackupJob(Runtime.from_config(cfg)).run()).ok
        finally:
            reset_logging()
    assert " INFO ahvbackup." in text.read_text()
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    assert any(r["vm"] == "walk-b" and r["job"] for r in records), records


async def metrics_textfile(w: Walk, tmp: Path) -> None:
    await w.works(vm="walk-b")
    assert not list(tmp.iterdir())
    await w.works(vm="walk-b", metrics_textfile=tmp / "a.prom")
    assert 'ahvbackup_vm_last_success_timestamp_seconds{tenant="",vm="walk-b"}' in \
        (tmp / "a.prom").read_text()


async def metrics_pushgateway(w: Walk, tmp: Path) -> None:
    from tests.metrics.peers import get, pushgateway  # a real Pushgateway

    pushed = re.compile(r'ahvbackup_job_duration_seconds\{[^}]*job="ahvbackup"')
    with pushgateway(tmp) as pg:
        assert not pushed.search(get(f"http://{pg}/metrics").decode())
        await w.works(vm="walk-b", metrics_pushgateway=pg)
        assert pushed.search(get(f"http://{pg}/metrics").decode())


async def places(w: Walk, tmp: Path) -> None:
    await w.works(vm="walk-b", repository=None, working_dir=tmp / "work")
    assert list((tmp / "work" / "repository").rglob("manifest.json"))
    await w.works(vm="walk-b", repository=tmp / "elsewhere")
    assert list((tmp / "elsewhere").rglob("manifest.json"))


async def level_and_state(w: Walk, tmp: Path) -> None:
    await w.works(vm="walk-b", state_dir=tmp / "s1")
    same = await w.works(vm="walk-b", state_dir=tmp / "s1", level="incremental")
    fresh = await w.works(vm="walk-b", state_dir=tmp / "s2", level="incremental")
    assert [d.kind for d in same.vms[0].disks] == ["incremental"]
    assert [d.kind for d in fresh.vms[0].disks] == ["full"]  # no reference in a fresh state_dir
    assert list((tmp / "s1").rglob("*.json"))


async def cleanup_on_abort(w: Walk, tmp: Path) -> None:
    dead = subprocess.Popen(["true"])  # a process that is gone: a killed job's pid
    dead.wait()

    def plant(state: Path) -> Path:
        ledger = state / "ledger"
        ledger.mkdir(parents=True, exist_ok=True)
        path = ledger / f"{uuid.uuid4().hex}.json"
        path.write_text(json.dumps({"kind": "image", "resource_id": str(uuid.uuid4()),
                                    "owner": "killed-job", "pid": dead.pid, "scope": {},
                                    "id": path.stem, "created": time.time()}))
        return path

    swept, kept = plant(tmp / "yes"), plant(tmp / "no")
    await w.works(vm="walk-b", state_dir=tmp / "yes", job_cleanup_on_abort="yes")
    await w.works(vm="walk-b", state_dir=tmp / "no", job_cleanup_on_abort="no")
    assert not swept.exists()
    assert kept.exists()


async def drivers(w: Walk) -> None:
    await w.works(vm="walk-b", hypervisor="ahv", sink="directory")
    for key in ("hypervisor", "sink", "target"):
        with pytest.raises(ConfigError, match=f"command line: {key}: no .* driver named 'x'"):
            w.config(**{key: "x"})
    with pytest.raises(ConfigError, match="sink=bacula works only inside a Bacula job"):
        refuse_hosted_sink(w.config(sink="bacula"))
    assert type(Runtime.from_config(w.config(target="raw")).target()).name == "raw"
    assert type(Runtime.from_config(w.config(target="ahv")).target()).name == "ahv"
    assert type(Runtime.from_config(w.config(target="qcow2")).target()).name == "qcow2"
    # a target's own key with another target chosen would do nothing: refused, not ignored
    with pytest.raises(ConfigError, match=r"qcow2_compression: a key of the qcow2 target, but "
                                          r"target=raw: it would do nothing"):
        w.config(target="raw", qcow2_compression="zstd")


async def trust_sample(w: Walk) -> None:
    await w.works(vm="walk-b")
    off = await w.works(vm="walk-b", level="incremental", verify_unchanged_sample=0)
    on = await w.works(vm="walk-b", level="incremental", verify_unchanged_sample=100)
    assert off.vms[0].disks[0].sampled_bytes == 0
    assert on.vms[0].disks[0].sampled_bytes > 0


async def retention_keys(w: Walk, monkeypatch: pytest.MonkeyPatch) -> None:
    async def count() -> int:
        return len(await Runtime.from_config(w.config()).sink.backups("walk-b"))

    for _ in range(3):
        await w.works(vm="walk-b")
    await w.works(vm="walk-b", keep_fulls=2)
    assert await count() == 2
    await w.works(vm="walk-b", keep_days=1)  # everything is young
    assert await count() == 3
    later = time.time() + 3 * 86400
    monkeypatch.setattr(retention, "time", types.SimpleNamespace(
        time=lambda: later, strftime=time.strftime, gmtime=time.gmtime))
    await w.works(vm="walk-b", keep_days=1)
    assert await count() == 1  # only the newest is kept, however old


async def restore_to_ahv(w: Walk) -> None:
    """target=ahv with each key unset and set: the VM made differs as the key says, and a
    value that cannot work is refused before anything is created."""
    from ahvbackup.core.jobs.restore import RestoreJob, pick_backup
    from ahvbackup.hypervisors.ahv.simulator.model import Nic

    sim = w.world.sim
    cluster = next(iter(sim.clusters.values()))
    vlan0 = next(s for s in sim.subnets.values() if s.name == "vlan0")
    sim.find_vm("walk-a").nics.append(Nic(str(uuid.uuid4()), "50:6b:8d:00:00:01", vlan0.uuid))
    await w.works(vm="walk-a")

    async def restore(**keys: Any) -> Any:
        cfg = w.config(target="ahv", user="admin", password="nutanix/4u", **keys)
        rt = Runtime.from_config(cfg)
        backup = await pick_backup(rt, vm="walk-a", backup_id=None)
        try:
            out = await RestoreJob(rt, backup, dest=w.world.tmp / "unused").run()
        except AhvBackupError as err:
            return str(err)
        assert out.ok, out.to_json()
        return sim.vms[out.path]

    def shape(vm: Any) -> tuple[Any, ...]:
        return (vm.name, vm.cluster_uuid, {d.container_uuid for d in vm.data_disks},
                vm.num_sockets * vm.num_vcpus_per_socket, vm.memory_mib, vm.power_state,
                [sim.subnets[n.subnet_uuid].name for n in vm.nics])

    src = sim.find_vm("walk-a")
    plain = await restore()
    assert shape(plain) == ("walk-a-restored", cluster.uuid, {cluster.containers[0].uuid},
                            src.num_sockets * src.num_vcpus_per_socket, src.memory_mib, "OFF",
                            ["vlan0"])
    tuned = await restore(restore_vm_name="walk-a-2", target_cluster=cluster.name,
                          target_container="SelfServiceContainer", vcpu=3, memory_mib=512,
                          power_on="yes", network_map="vlan0=backup-net")
    assert shape(tuned) == ("walk-a-2", cluster.uuid, {cluster.containers[1].uuid}, 3, 512,
                            "ON", ["backup-net"])
    made = set(sim.vms)
    for keys, said in (({"restore_vm_name": "walk-b"}, "already exists"),
                       ({"target_cluster": "nope"}, "target_cluster: no cluster 'nope'"),
                       ({"target_container": "nope"}, "has no container 'nope'"),
                       ({"network_map": "vlan0=nope"}, "has no subnet 'nope'")):
        assert said in await restore(**{"restore_vm_name": "walk-a-3", **keys})
    assert set(sim.vms) == made


async def api_version(w: Walk) -> None:
    sim = w.world.sim
    await w.works(vm="walk-b", prism_api_version="v3")
    assert not sim.recovery_points.points
    await w.works(vm="walk-b", prism_api_version="v4", data_path="iscsi")
    assert sim.recovery_points.points  # v4 takes recovery points
    sim.v4 = False
    assert "serves no v4 API" in await w.fails(vm="walk-b", prism_api_version="v4")
    sim.v4 = True


async def stream_codec_keys(w: Walk, tmp: Path) -> None:
    """compression shrinks what is stored; encryption_key makes streams that only its key
    opens, and encryption_old_keys keeps them open after a rotation."""
    from ahvbackup.core.jobs.restore import RestoreJob, pick_backup

    sim = w.world.sim
    line = b"walk the key table\n"
    sim.write_disk(sim.find_vm("walk-b").uuid, 0, 0, line * (MiB // 19) + b"\n" * (MiB % 19))
    plain = await w.works(vm="walk-b", compression="none")
    packed = await w.works(vm="walk-b", compression="zstd:3")
    assert packed.vms[0].disks[0].bytes_stored * 10 < plain.vms[0].disks[0].bytes_stored
    old, new = tmp / "old.key", tmp / "new.key"
    for path in (old, new):
        path.write_text(os.urandom(32).hex())
        path.chmod(0o600)
    await w.works(vm="walk-b", encryption_key=old)

    async def restore(**keys: Any) -> str:
        rt = Runtime.from_config(w.config(**keys))
        backup = await pick_backup(rt, vm="walk-b", backup_id=None)
        out = await RestoreJob(rt, backup, dest=tmp / f"r{len(keys)}").run()
        return "ok" if out.ok else out.disks[0].error or "failed"

    assert "encrypted with key id" in await restore(encryption_key=new)
    assert await restore(encryption_key=new, encryption_old_keys=old) == "ok"


Evidence = Callable[..., Awaitable[None]]

EVIDENCE: dict[str, Evidence] = {
    "prism_central": prism_endpoint,
    "prism_port": prism_endpoint,
    "prism_api_version": api_version,
    "user": credentials,
    "password": credentials,
    "passfile": credentials,
    "prism_insecure": tls_trust,
    "prism_ca_cert": tls_trust,
    "cluster": cluster,
    "vm": selection,
    "exclude": selection,
    "application_consistent": application_consistent,
    "data_path": data_path,
    "dsip": data_path,
    "iscsi_initiator": iscsi_initiator,
    "concurrent_vms": concurrency,
    "concurrent_disks": concurrency,
    "chunk_size_mib": chunk_size,
    "prism_rate_rpm": rate,
    "mode": mode,
    "where": restore_place,
    "restore_disks_only": restore_place,
    "restore_vm_name": restore_to_ahv,
    "target_cluster": restore_to_ahv,
    "target_container": restore_to_ahv,
    "network_map": restore_to_ahv,
    "power_on": restore_to_ahv,
    "vcpu": restore_to_ahv,
    "memory_mib": restore_to_ahv,
    "verbose": logging_keys,
    "debug_log": logging_keys,
    "log_format": log_format,
    "metrics_textfile": metrics_textfile,
    "metrics_pushgateway": metrics_pushgateway,
    "working_dir": places,
    "repository": places,
    "state_dir": level_and_state,
    "level": level_and_state,
    "job_cleanup_on_abort": cleanup_on_abort,
    "hypervisor": drivers,
    "sink": drivers,
    "target": drivers,
    "verify_unchanged_sample": trust_sample,
    "keep_fulls": retention_keys,
    "keep_days": retention_keys,
    "compression": stream_codec_keys,
    "encryption_key": stream_codec_keys,
    "encryption_old_keys": stream_codec_keys,
    **DR_EVIDENCE,
    **TENANT_EVIDENCE,
}


def test_every_key_is_either_evidenced_or_refused() -> None:
    table = {k.name for k in KEYS}
    refused_outright = {k for k, n in REFUSED.items() if not n.values}
    assert set(EVIDENCE) | refused_outright == table
    assert not set(EVIDENCE) & refused_outright, "a key cannot both work and be refused"


@pytest.mark.parametrize("key", sorted(EVIDENCE))
async def test_a_working_key_changes_what_the_job_does(key: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    check = EVIDENCE[key]
    wanted = check.__code__.co_varnames[: check.__code__.co_argcount]
    async with _walk(tmp_path) as w:
        extra = {"tmp": tmp_path / "t", "monkeypatch": monkeypatch}
        (tmp_path / "t").mkdir()
        await check(w, *(extra[a] for a in wanted[1:]))


def example_value(key: str) -> str:
    """The key's value in packaging/ahvbackup.conf (a valid, non-default example)."""
    for line in (REPO / "packaging" / "ahvbackup.conf").read_text().splitlines():
        if line.startswith(f"#{key} = "):
            return line.split(" = ", 1)[1]
    raise AssertionError(f"{key} is not in packaging/ahvbackup.conf")


@pytest.mark.parametrize("key", sorted(k for k, n in REFUSED.items() if not n.values))
def test_a_refused_key_stops_the_job_from_every_source(key: str, tmp_path: Path) -> None:
    value = example_value(key)
    conf = tmp_path / "ahvbackup.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{key} = {value}\n")
    quoted = "'" + value + "'"
    for sources, origin in (
        (ConfigSources(files=(conf,)), f"{conf}:1"),
        (ConfigSources(plugin_string=f"ahvbackup: {key}={quoted}"), "plugin string"),
        (ConfigSources(overrides={key: value}), "command line"),
    ):
        with pytest.raises(ConfigError) as err:
            assemble_config(sources, hooks=Hooks(), view=BACKUP)
        (line,) = str(err.value).splitlines()
        assert line.startswith(f"{origin}: {key}: ")
        assert line.endswith("this version does not do that yet")
    # unset, it stops nothing
    assemble_config(ConfigSources(), hooks=Hooks(), view=BACKUP)


def test_refused_keys_name_their_issue_in_the_docs() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text()
    conf = (REPO / "packaging" / "ahvbackup.conf").read_text()
    for key, entry in REFUSED.items():
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{key}` |"))
        state = row.rstrip(" |").rsplit("|", 1)[1]
        if entry.values:
            for v in entry.values:
                assert f"`{v}` is refused (issue {entry.issue})" in state, row
        else:
            assert state.strip() == f"refused (issue {entry.issue})", row
        assert f"issue {entry.issue}" in conf.split(f"#{key} = ")[0].rsplit("\n\n", 1)[-1], key
    for key in EVIDENCE:
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{key}` |"))
        state = row.rstrip(" |").rsplit("|", 1)[1]
        assert state.strip() == "works" or key in REFUSED or key in {"mode", "target"}, row


def test_cli_refuses_a_refused_key_with_exit_2(tmp_path: Path) -> None:
    done = subprocess.run([*CLI, "restore", "--vm", "x", "-o", "metrics_port=9000", "-o",
                           "push_apply_remote=no", "-o", f"repository={tmp_path}"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "ahvbackup: error: command line: push_apply_remote=False: keeping DR deltas "
        "unapplied until a failover (push_apply_remote=no; DR replication): this version "
        "does not do that yet",
        "command line: metrics_port: the DR receiver's /metrics port (DR replication): this "
        "version does not do that yet",
    ]
