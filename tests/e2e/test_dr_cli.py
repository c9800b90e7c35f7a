"""DR from the command line, as an operator runs it: `ahvbackup receiver` as a real process
(readiness through NOTIFY_SOCKET, as systemd sees it), and `ahvbackup dr seed` / `dr push`
against the served simulator, over the real psk and mtls transports on loopback.

Every restore point a receiver lists is byte-identical to the source VM's disks when its
point was taken; a receiver killed mid-push is restarted and the same push resumes from its
durable offset; two receivers on one host keep to their own ports and state; a wrong PSK is
refused on both sides before anything is created or applied; no secret reaches a log at
verbose=3; the cluster keeps only the snapshot of each VM's last acknowledged point.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trustme
from tests.conftest import REPO, require_peer
from tests.e2e.e2e_world import MiB, World

from ahvbackup.bacula.handlers import JobInfo
from ahvbackup.bacula.session import validate_params
from ahvbackup.core.dr.store import VmStore
from ahvbackup.core.errors import ConfigError

CLI = [sys.executable, "-m", "ahvbackup.core.cli"]
TOKEN = "5e" * 32
WRONG = "a7" * 32
HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _conf(path: Path, **keys: object) -> Path:
    """A configuration file, mode 0600 (it may hold dr_auth_token)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{k} = {v}\n" for k, v in keys.items())
    return path


@dataclass
class Channel:
    """The keys of one DR channel, for both sides, and the secrets no log may show."""

    source: dict[str, str]
    receiver: dict[str, str]
    secrets: list[str] = field(default_factory=list)


def psk(token: str = TOKEN) -> Channel:
    return Channel({"dr_auth_token": token}, {"dr_auth_token": token}, [token])


def mtls(where: Path) -> Channel:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    sides = {}
    secrets = []
    for name in ("source", "receiver"):
        leaf = ca.issue_cert(HOST, common_name=f"dr-{name}")
        cert, key = where / f"{name}.pem", where / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        os.chmod(key, 0o600)
        sides[name] = {"dr_auth_cert": str(cert), "dr_auth_key": str(key),
                       "dr_ca_cert": str(where / "ca.pem")}
        body = leaf.private_key_pem.bytes().decode().splitlines()
        secrets += [line for line in body if len(line) > 40]
    return Channel(sides["source"], sides["receiver"], secrets)


@dataclass
class ReceiverProc:
    """`ahvbackup receiver` as its own process; `log` is its stderr (verbose=3)."""

    conf: Path
    state: Path
    port: int
    log: Path
    proc: trio.Process | None = None
    notify: trio.socket.SocketType | None = None

    async def start(self) -> None:
        """Start it and wait for READY=1 on NOTIFY_SOCKET, as systemd's Type=notify does."""
        self.notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        where = self.log.with_suffix(".notify")
        where.unlink(missing_ok=True)
        await self.notify.bind(str(where))
        with self.log.open("ab") as err:
            self.proc = await trio.lowlevel.open_process(
                [*CLI, "-vvv", "receiver", "-c", str(self.conf)], stderr=err,
                stdout=subprocess.DEVNULL, env={**os.environ, "NOTIFY_SOCKET": str(where)})
        with trio.fail_after(15):
            ready = await self.notify.recv(4096)
        assert ready == f"READY=1\nSTATUS=listening on {HOST}:{self.port}".encode(), ready

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal it and wait for its exit code (SIGTERM: STOPPING=1 is sent first)."""
        assert self.proc is not None and self.notify is not None
        self.proc.send_signal(sig)
        with trio.fail_after(15):
            if sig == signal.SIGTERM:
                assert (await self.notify.recv(4096)).startswith(b"STOPPING=1\n")
            code = await self.proc.wait()
        self.notify.close()
        return code

    def points(self, vm_uuid: str) -> list[int]:
        return [p.point for p in VmStore(self.state / "receiver" / vm_uuid).points()]

    def image(self, vm_uuid: str, point: int, disk_uuid: str) -> bytes:
        (p,) = [p for p in VmStore(self.state / "receiver" / vm_uuid).points()
                if p.point == point]
        d = p.disk(disk_uuid)
        assert d is not None
        return d.path.read_bytes()


def receiver_proc(tmp: Path, name: str, channel: Channel) -> ReceiverProc:
    """A receiver on a port and state directory of its own (not started)."""
    port = _free_port()
    state = tmp / f"{name}-state"
    conf = _conf(tmp / f"{name}.conf", dr_host=HOST, dr_port=port, state_dir=state,
                 debug_log="", **channel.receiver)
    return ReceiverProc(conf=conf, state=state, port=port, log=tmp / f"{name}.log")


@asynccontextmanager
async def running(*rxs: ReceiverProc) -> AsyncIterator[None]:
    """The receivers started at once, stopped with SIGTERM at the end (exit code 0)."""
    async with trio.open_nursery() as nursery:
        for r in rxs:
            nursery.start_soon(r.start)
    try:
        yield
    finally:
        for r in rxs:
            if r.proc is not None and r.proc.returncode is None:
                assert await r.stop() == 0, r.log.read_text()[-3000:]


@dataclass
class Source:
    """`ahvbackup dr ...` for one VM of the world to one receiver; stderr kept (verbose=3)."""

    world: World
    vm: str
    conf: Path
    log: Path

    async def run(self, *args: str, **keys: object) -> subprocess.CompletedProcess[bytes]:
        sets = self.world.cli_args(vm=self.vm, data_path="rest", chunk_size_mib=1, **keys)
        done = await trio.run_process([*CLI, "-vvv", "--json", "dr", *args, "-c",
                                       str(self.conf), *sets],
                                      capture_stdout=True, capture_stderr=True, check=False)
        with self.log.open("ab") as f:
            f.write(done.stderr)
        return done

    async def ok(self, *args: str, **keys: object) -> dict[str, object]:
        done = await self.run(*args, **keys)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        result: dict[str, object] = json.loads(done.stdout)
        return result


def source(world: World, vm: str, r: ReceiverProc, channel: Channel) -> Source:
    conf = _conf(world.tmp / f"{vm}-source.conf", dr_host=HOST, dr_port=r.port,
                 **channel.source)
    return Source(world, vm, conf, world.tmp / f"{vm}-source.log")


def scribble(world: World, vm_uuid: str, sizes: list[int], rng: random.Random) -> None:
    """Random writes and zeroings between points."""
    for i, size in enumerate(sizes):
        for _ in range(rng.randrange(1, 4)):
            length = rng.randrange(4096, 384 << 10)
            off = rng.randrange(0, size - length)
            if rng.random() < 0.25:
                world.sim.zero_disk(vm_uuid, i, off, length)
            else:
                world.sim.write_disk(vm_uuid, i, off, rng.randbytes(length))


def disks_now(world: World, vm_uuid: str, sizes: list[int]) -> list[bytes]:
    return [world.sim.read_disk(vm_uuid, i, 0, s) for i, s in enumerate(sizes)]


def _dr_state(world: World, vm_uuid: str) -> dict[str, object]:
    state: dict[str, object] = json.loads(
        (world.tmp / "state" / "dr-source" / f"{vm_uuid}.json").read_text())
    return state


def only_dr_references_left(world: World) -> None:
    """The cluster holds one snapshot per VM: the one its DR state names (by name too)."""
    states = [json.loads(p.read_text()) for p in (world.tmp / "state" / "dr-source")
              .glob("*.json")]
    kept = {s["snapshot_id"] for s in states}
    assert set(world.sim.snapshots) == kept, (set(world.sim.snapshots), kept)
    for s in states:
        name = world.sim.snapshots[s["snapshot_id"]].name
        assert name == f"ahvbackup-dr-{s['vm_name']}-p{s['point']}", name
    assert world.sim.images == {}
    assert not list((world.tmp / "state" / "ledger").glob("*.json"))


def no_secret_in(logs: list[Path], channels: list[Channel]) -> None:
    """No key of `channels` in any of `logs` (each at verbose=3: sources trace every Prism
    call, receivers every peer)."""
    for path in logs:
        text = path.read_text(errors="replace")
        assert "ahvbackup: trace: " in text or " authenticated (" in text, path
        for ch in channels:
            for secret in ch.secrets:
                assert secret not in text, f"a secret is in {path}"


async def test_seed_and_three_deltas_over_psk_and_mtls_on_two_receivers(
        world: World) -> None:
    sizes = [4 * MiB, MiB]
    vms = {name: world.add_vm(name, [(sizes[0], [(0, 2 * MiB)]), (sizes[1], [(0, MiB)])])
           for name in ("dr-a", "dr-b")}
    rng = random.Random(12)
    channels = {"dr-a": psk(), "dr-b": mtls(world.tmp)}
    rx_a = receiver_proc(world.tmp, "rx-psk", channels["dr-a"])
    rx_b = receiver_proc(world.tmp, "rx-mtls", channels["dr-b"])
    async with running(rx_a, rx_b):
        rxs = {"dr-a": rx_a, "dr-b": rx_b}
        sources = {n: source(world, n, rxs[n], channels[n]) for n in vms}
        expected: dict[str, list[list[bytes]]] = {n: [] for n in vms}
        results: dict[str, list[dict[str, object]]] = {n: [] for n in vms}

        async def one(name: str, verb: str) -> None:
            results[name].append(await sources[name].ok(verb))
            expected[name].append(disks_now(world, vms[name].uuid, sizes))

        for cycle in range(4):
            if cycle:
                for vm in vms.values():
                    scribble(world, vm.uuid, sizes, rng)
            if cycle == 2:  # the cluster's retention deletes dr-a's reference behind our back
                world.sim.delete_vm_snapshot(_dr_state(world, vms["dr-a"].uuid)["snapshot_id"])
            async with trio.open_nursery() as nursery:  # both sources at once
                for name in vms:
                    nursery.start_soon(one, name, "seed" if cycle == 0 else "push")
        for name, vm in vms.items():
            rx, other = rxs[name], rxs["dr-b" if name == "dr-a" else "dr-a"]
            assert rx.points(vm.uuid) == [1, 2, 3, 4]
            for point, images in enumerate(expected[name], start=1):
                for disk, want in zip(vm.disks, images, strict=True):
                    assert rx.image(vm.uuid, point, disk.uuid) == want, (name, point)
            (seed, *deltas) = [r["vms"][0] for r in results[name]]  # type: ignore[index]
            assert seed["base"] == 0 and seed["bytes_pushed"] > 3 * MiB
            for n, d in enumerate(deltas, start=2):  # deltas send what changed, not the disks
                assert d["base"] == n - 1, d
                if name == "dr-a" and n == 3:  # healed: each disk sent in full, in the delta
                    assert d["full_disks"] == ["scsi.0", "scsi.1"] and d["data_bytes"] > 2 * MiB
                else:
                    assert d["full_disks"] == [] and 0 < d["data_bytes"] < 2 * MiB, d
            # two receivers on one host: each holds its own VM only, under its own state
            assert not (other.state / "receiver" / vm.uuid).exists()
            assert f"listening on 127.0.0.1:{rx.port} (transport " in rx.log.read_text()
        assert "(transport psk, state " in rx_a.log.read_text()
        assert "reference snapshot of the last acknowledged point is gone on the cluster" \
            in sources["dr-a"].log.read_text()
        # a third receiver on a port that is taken: one line, nothing served
        taken = _conf(world.tmp / "taken.conf", dr_port=rx_a.port, state_dir=world.tmp / "t",
                      debug_log="", **channels["dr-a"].receiver)
        done = await trio.run_process([*CLI, "receiver", "-c", str(taken)], check=False,
                                      capture_stderr=True)
        assert done.returncode == 1
        assert done.stderr.decode().splitlines()[-1].startswith(
            f"ahvbackup: error: dr_port: cannot listen on *:{rx_a.port} (")
        assert "(transport mtls, state " in rx_b.log.read_text()
        only_dr_references_left(world)
        status = await trio.run_process([*CLI, "--json", "dr", "status", *world.cli_args()],
                                        capture_stdout=True)
        rows = {r["vm"]: r for r in json.loads(status.stdout)}
        assert {n: rows[n]["point"] for n in vms} == {"dr-a": 4, "dr-b": 4}
    logs = [rx_a.log, rx_b.log, *(s.log for s in sources.values())]
    no_secret_in(logs, list(channels.values()))
    assert "DR cycle complete: vm=dr-a point=4 bytes_pushed=" in sources["dr-a"].log.read_text()


async def test_wrong_psk_then_a_receiver_killed_mid_push_resumes(world: World) -> None:
    sizes = [20 * MiB]
    vm = world.add_vm("dr-k", [(sizes[0], [(0, 18 * MiB)])])
    good = psk()
    rx = receiver_proc(world.tmp, "rx", good)
    async with running(rx):
        # a wrong key: refused on both sides before any snapshot or write
        stranger = source(world, "dr-k", rx, psk(WRONG))
        done = await stranger.run("seed")
        assert done.returncode == 3, done.stderr.decode()[-2000:]  # a peer refused us
        assert "the receiver refused our dr_auth_token" in done.stderr.decode()
        assert "refused: the source did not prove dr_auth_token" in rx.log.read_text()
        assert world.sim.snapshots == {} and not (rx.state / "receiver" / vm.uuid).exists()

        # a seed slowed to ~8 MB/s; the receiver SIGKILLed once 8 MiB are durable and
        # restarted on its state: the same push reconnects and resumes from there
        src = source(world, "dr-k", rx, good)
        journal = rx.state / "receiver" / vm.uuid / "partial" / "journal.json"

        async def durable(offset: int) -> None:
            with trio.fail_after(20):
                while True:
                    await trio.sleep(0.05)
                    try:
                        if json.loads(journal.read_text())["disks"][0]["offset"] >= offset:
                            return
                    except (OSError, ValueError):
                        continue

        async with trio.open_nursery() as nursery:
            outcome: list[dict[str, object]] = []

            async def push() -> None:
                outcome.append(await src.ok("seed", max_bandwidth_mbps=64))

            nursery.start_soon(push)
            await durable(8 * MiB)
            assert await rx.stop(signal.SIGKILL) == -signal.SIGKILL
            await rx.start()
        (res,) = outcome[0]["vms"]  # type: ignore[misc]
        assert res["ok"] and res["reconnects"] >= 1, res
        log = src.log.read_text()
        resumed = [int(part.split()[0]) for part in
                   log.split("disk scsi.0 resumes at offset ")[1:]]
        assert resumed and resumed[0] >= 8 * MiB, resumed
        assert rx.points(vm.uuid) == [1]
        assert rx.image(vm.uuid, 1, vm.disks[0].uuid) == disks_now(world, vm.uuid, sizes)[0]
        only_dr_references_left(world)

        # dr push --loop: a cycle every push_interval until SIGTERM, which between cycles
        # is a clean stop (exit 0)
        world.sim.write_disk(vm.uuid, 0, 5 * MiB, os.urandom(64 << 10))
        sets = world.cli_args(vm="dr-k", data_path="rest", push_interval=2)
        printed = world.tmp / "loop.json"
        with src.log.open("ab") as err, printed.open("wb") as out:
            loop = await trio.lowlevel.open_process(
                [*CLI, "-vvv", "--json", "dr", "push", "--loop", "-c", str(src.conf), *sets],
                stdout=out, stderr=err)
        with trio.fail_after(20):  # each cycle's result is printed once the cycle is over
            while printed.read_text().count('"job_id"') < 2:
                await trio.sleep(0.05)
        assert rx.points(vm.uuid) == [1, 2, 3]
        loop.send_signal(signal.SIGTERM)  # between cycles (each takes about a second)
        with trio.fail_after(15):
            assert await loop.wait() == 0
        assert rx.image(vm.uuid, 3, vm.disks[0].uuid) == disks_now(world, vm.uuid, sizes)[0]
        only_dr_references_left(world)
    no_secret_in([rx.log, src.log, stranger.log], [good, psk(WRONG)])


def test_bacula_jobs_refuse_the_dr_push_modes_by_name() -> None:
    """The Bacula backend does not run DR pushes yet: a plugin string asking for one is
    refused naming the mode, never run as a backup."""
    for mode in ("seed", "bitmap-push"):
        with pytest.raises(ConfigError, match=rf"mode: '{mode}' disagrees with a Bacula "
                                              "Backup job"):
            validate_params("ahvbackup", [("prism_central", "pc:9440"), ("mode", mode)],
                            job=JobInfo(type="B"))


@pytest.mark.peer
def test_the_systemd_units_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` of both units (the template as an instance, as systemd
    starts it), with the packaged /usr/bin/ahvbackup replaced by this venv's, which exists
    here (verify checks the command is executable). Any line it prints is a problem."""
    analyze = require_peer("systemd-analyze")["systemd-analyze"]
    units = REPO / "packaging" / "systemd"
    here = str(Path(sys.executable).with_name("ahvbackup"))
    for unit, instance in (("ahvbackup-receiver.service", "ahvbackup-receiver.service"),
                           ("ahvbackup-receiver@.service",
                            "ahvbackup-receiver@vm-prod-01.service")):
        text = (units / unit).read_text()
        assert "Type=notify" in text and "ExecStart=/usr/bin/ahvbackup receiver " in text
        (tmp_path / instance).write_text(text.replace("/usr/bin/ahvbackup", here))
    done = subprocess.run(
        [analyze, "verify", *(str(p) for p in sorted(tmp_path.glob("*.service")))],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
