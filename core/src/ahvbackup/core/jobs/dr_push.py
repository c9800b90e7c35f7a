"""The DR source job: mode=seed and mode=bitmap-push, one cycle per `run`.

Each selected VM (`selection.py`, as backups select) is snapshotted through the hypervisor
session with every resource on the cleanup ledger (a `ReleaseStack`, as backups do), and the
point is pushed to the receiver (`dr.push.push_point`). A seed sends every disk in full; a
bitmap-push sends the changed regions since the last point the receiver acknowledged, whose
snapshot the VM's DR state names (`dr.source_state`, a namespace apart from backups'). Any disk
that cannot be a delta (new, resized, its reference gone on the cluster) is sent in full in
the same point, with a warning; a VM the receiver has no base for is seeded. Once the receiver
committed the point, its snapshot becomes the reference and the previous one is released.

A failed VM fails alone; the cycle's result says which. `max_bandwidth_mbps` is one token
bucket for the whole cycle, shared by the VMs pushed at once.
"""

from __future__ import annotations

__all__ = ["DrCycleResult", "DrPushJob", "DrVmResult", "ReceiverUnavailable"]

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from .. import __version__
from .. import log as msgs
from ..config import Config
from ..dr.protocol import MAX_CHUNK
from ..dr.push import PushPoint, PushRefused, PushSettings, open_disk_sources, push_point
from ..dr.source_state import DrDiskRef, DrStateStore, DrVmState
from ..dr.throttle import TokenBucket
from ..drivers import DataPath, DrTransport, Hypervisor, HypervisorSession, dr_transport_name
from ..errors import (
    AhvBackupError,
    ConfigError,
    ExitCode,
    HypervisorError,
    SinkError,
    TransportError,
    our_errors,
)
from ..ledger import Ledger, ReleaseStack, sweep_orphans
from ..model import VmInfo, VmSnapshot
from ..plugins import Hooks, load_driver
from .concurrency import each_limited
from .references import handle_api
from .runtime import resolve_data_path
from .selection import select_vms

log = logging.getLogger("ahvbackup.dr.job")

DR_MODES = ("seed", "bitmap-push")


class ReceiverUnavailable(TransportError):
    """The receiver did not answer, or refused our credentials: a peer that could not be
    reached (exit code 3, as an unreachable Prism)."""

    exit_code = ExitCode.UNAVAILABLE


@dataclass
class DrVmResult:
    vm_uuid: str
    vm_name: str
    ok: bool = False
    point: int = 0
    base: int = 0  # 0: a seed
    snapshot_id: str = ""
    full_disks: list[str] = field(default_factory=list)  # labels sent in full
    bytes_pushed: int = 0
    data_bytes: int = 0
    reconnects: int = 0
    lag: float = 0.0
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class DrCycleResult:
    job_id: str
    mode: str
    receiver: str
    vms: list[DrVmResult] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [v.vm_name for v in self.vms if not v.ok]

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "failed": self.failed}


class DrPushJob:
    """Pushes the selected VMs to the receiver at dr_host:dr_port (mode seed or bitmap-push).
    `transport` is the configured DR transport's driver unless given."""

    def __init__(self, config: Config, *, hooks: Hooks,
                 transport: DrTransport | None = None) -> None:
        if config.mode not in DR_MODES:
            raise ConfigError(f"mode: {config.mode!r} is not a DR push mode (use seed or "
                              "bitmap-push)")
        if not config.dr_host:
            raise ConfigError("dr_host: the DR receiver to push to is not set")
        self.cfg = config
        self.hooks = hooks
        self.transport = transport or load_driver(
            "transport", dr_transport_name(config), base=DrTransport)(config)
        self.hypervisor = load_driver("hypervisor", config.hypervisor, base=Hypervisor)(config)
        state_dir = Path(config.state_dir)
        self.ledger = Ledger(state_dir, hooks=hooks)
        self.states = DrStateStore(state_dir)
        self.receiver = f"{config.dr_host}:{config.dr_port}"
        self.busy = False

    async def run(self) -> DrCycleResult:
        """One cycle: every selected VM pushed once."""
        cfg = self.cfg
        job_id = uuid.uuid4().hex[:12]
        result = DrCycleResult(job_id=job_id, mode=cfg.mode, receiver=self.receiver,
                               warnings=list(cfg.warnings))
        started = time.monotonic()
        for warning in cfg.warnings:
            log.warning("%s", warning)
        level = "full" if cfg.mode == "seed" else "incremental"
        log.info(msgs.backend_up(__version__, mode=cfg.mode, level=level, vm=",".join(cfg.vm)))
        self.hooks.job_started(job_id=job_id, mode=cfg.mode, level=level, config=cfg)
        finished = False  # a cycle that raised is not ok, whatever its VMs say
        try:
            await self._probe()
            async with self.hypervisor.connect() as session:
                log.info("%s", await session.discover())
                if cfg.job_cleanup_on_abort:
                    await self._sweep(session)
                vms, warnings = select_vms(await session.list_vms(), include=cfg.vm,
                                           exclude=cfg.exclude, cluster=cfg.cluster,
                                           project=cfg.project)
                for w in warnings:
                    log.warning("%s", w)
                result.warnings += warnings
                log.info(msgs.selected_vms(len(vms), [v.name for v in vms], mode=cfg.mode))
                datapath = await resolve_data_path(cfg, session)
                bucket = TokenBucket.mbps(cfg.max_bandwidth_mbps)
                result.vms = [DrVmResult(vm_uuid=v.uuid, vm_name=v.name) for v in vms]
                work = _Cycle(session=session, datapath=datapath, job_id=job_id, bucket=bucket)
                await each_limited(zip(vms, result.vms, strict=True), cfg.concurrent_vms,
                                   lambda pair: self._vm(work, *pair))
            finished = True
        finally:
            result.seconds = time.monotonic() - started
            ok = finished and result.ok
            self.hooks.measure({"mode": cfg.mode, "outcome": "ok" if ok else "failed"},
                               job_seconds=result.seconds)
            self.hooks.job_finished(job_id=job_id, ok=ok, failed=result.failed,
                                    seconds=result.seconds)
        return result

    async def loop(self, on_cycle: Callable[[DrCycleResult], None]) -> None:
        """Run a cycle every push_interval seconds (start to start; at once when a cycle took
        longer) until cancelled. A cycle that fails as a whole (the receiver or Prism
        unreachable) is logged and the next one tries again; a configuration error ends the
        loop. `busy` is true while a cycle runs."""
        while True:
            start = trio.current_time()
            self.busy = True
            try:
                on_cycle(await self.run())
            except ConfigError:
                raise
            except AhvBackupError as err:
                log.error("DR cycle failed: %s; the next cycle in %ds tries again", err,
                          self.cfg.push_interval)
            finally:
                self.busy = False
            await trio.sleep_until(start + self.cfg.push_interval)

    async def _probe(self) -> None:
        """Connect once before anything is created on the cluster: an unreachable receiver
        or refused credentials fail the cycle at once (a push retries lost connections)."""
        try:
            stream = await self.transport.connect()
        except TransportError as err:
            raise ReceiverUnavailable(str(err)) from err
        await stream.aclose()

    async def _sweep(self, session: HypervisorSession) -> None:
        """Release what a killed run left on the cluster (the ledger's orphans)."""
        await sweep_orphans(self.ledger, session.release)

    async def _vm(self, w: _Cycle, vm: VmInfo, vr: DrVmResult) -> None:
        self.hooks.vm_started(job_id=w.job_id, vm_uuid=vm.uuid, vm_name=vm.name)
        try:
            await self._push_vm(w, vm, vr)
        except (AhvBackupError, BaseExceptionGroup) as err:
            errors = our_errors(err)
            if errors is None:
                raise
            vr.ok = False
            vr.error = vr.error or "; ".join(dict.fromkeys(str(e) for e in errors))
            log.error("VM %s: %s", vm.name, vr.error)
        self.hooks.vm_finished(job_id=w.job_id, vm_uuid=vm.uuid, vm_name=vm.name, ok=vr.ok,
                               bytes_stored=vr.bytes_pushed, error=vr.error)

    def _warn(self, vr: DrVmResult, warning: str) -> None:
        log.warning("%s", warning)
        vr.warnings.append(warning)

    def _base(self, vm: VmInfo, vr: DrVmResult) -> DrVmState | None:
        """The last acknowledged point to push a delta on, or None to seed (with the reason
        as a warning, unless a seed was asked for)."""
        old, problem = self.states.load(vm.uuid)
        seeding = self.cfg.mode == "seed"
        if problem:
            self._warn(vr, f"VM {vm.name}: {problem}; sending a seed")
            return None
        if old is not None and old.receiver != self.receiver:
            self._warn(vr, f"VM {vm.name}: its DR state is for receiver {old.receiver}, this "
                           f"push goes to {self.receiver}; sending a seed")
            return None
        if old is None and not seeding:
            self._warn(vr, f"VM {vm.name}: no point acknowledged by {self.receiver} yet; "
                           "sending a seed")
        return None if seeding else old

    async def _push_vm(self, w: _Cycle, vm: VmInfo, vr: DrVmResult) -> None:
        old, _ = self.states.load(vm.uuid)
        base = self._base(vm, vr)
        acked = old.point if old is not None and old.receiver == self.receiver else 0
        # after a killed push the receiver may hold a point the state does not: number after it
        point = max(acked, self.states.started(vm.uuid, receiver=self.receiver)) + 1
        self.states.begin(vm.uuid, receiver=self.receiver, point=point)
        stack = ReleaseStack(self.ledger, owner=w.job_id, releaser=w.session.release)
        async with stack:
            snap = await w.session.snapshot_vm(
                vm, application_consistent=self._consistency(vm, vr),
                name=f"ahvbackup-dr-{vm.name}-p{point}", stack=stack)
            taken = time.time()
            self.hooks.snapshot_created(job_id=w.job_id, vm_uuid=vm.uuid, snapshot_id=snap.id,
                                        consistency=snap.consistency)
            try:
                await self._push(w, vm, vr, snap, stack, point=point, base=base, taken=taken)
            except PushRefused as err:
                if base is None:
                    raise
                # the receiver lost or replaced the base: a seed of this same snapshot heals it
                self._warn(vr, f"VM {vm.name}: {err}; sending a seed")
                await self._push(w, vm, vr, snap, stack, point=point, base=None, taken=taken)
            self._keep(vm, snap, vr, old, stack)
        vr.warnings += stack.left_behind()
        vr.ok = True

    async def _push(self, w: _Cycle, vm: VmInfo, vr: DrVmResult, snap: VmSnapshot,
                    stack: ReleaseStack, *, point: int, base: DrVmState | None,
                    taken: float) -> None:
        references = self._references(vm, snap, base, vr) if base is not None else {}
        settings = PushSettings(max_bandwidth_mbps=self.cfg.max_bandwidth_mbps,
                                chunk_size=min(w.datapath.read_size(), MAX_CHUNK))
        async with open_disk_sources(w.session, w.datapath, snap, references=references,
                                     stack=stack) as disks:
            pushed = PushPoint(vm_uuid=vm.uuid, vm_name=vm.name, point=point,
                               snapshot_id=snap.id, base=base.point if base else 0,
                               base_snapshot_id=base.snapshot_id if base else "",
                               taken=taken, disks=disks)
            res = await push_point(pushed, connect=self.transport.connect, settings=settings,
                                   hooks=self.hooks, throttle=w.bucket)
        vr.point, vr.base, vr.snapshot_id = point, pushed.base, snap.id
        vr.full_disks = [d.label for d in disks if d.full]
        vr.bytes_pushed += res.bytes_pushed
        vr.data_bytes += res.data_bytes
        vr.reconnects += res.reconnects
        vr.lag = res.lag

    def _references(self, vm: VmInfo, snap: VmSnapshot, base: DrVmState,
                    vr: DrVmResult) -> Mapping[str, str]:
        """Per disk uuid, the handle of its snapshot at `base`; a disk without a usable one
        is left out (sent in full), with the reason."""
        out = {}
        for d in snap.disks:
            who = f"VM {vm.name} disk {d.disk.label}"
            ref = base.disks.get(d.disk.uuid)
            if ref is None:
                self._warn(vr, f"{who}: added since DR point {base.point}; sending it in full")
            elif ref.size != d.size:
                self._warn(vr, f"{who}: resized from {ref.size} to {d.size} bytes since DR "
                               f"point {base.point}; sending it in full")
            elif handle_api(ref.handle) != handle_api(d.handle):
                self._warn(vr, f"{who}: the reference of DR point {base.point} was taken "
                               "through another API than this snapshot; sending it in full")
            else:
                out[d.disk.uuid] = ref.handle
        return out

    def _keep(self, vm: VmInfo, snap: VmSnapshot, vr: DrVmResult, old: DrVmState | None,
              stack: ReleaseStack) -> None:
        """The committed point's snapshot becomes the reference; the previous one is put on
        the ledger first (so a kill in between still has it swept), then the state names
        the new one, then the new one leaves the ledger."""
        new = DrVmState(vm_uuid=vm.uuid, vm_name=vm.name, cluster_uuid=vm.cluster_uuid,
                        receiver=self.receiver, point=vr.point, snapshot_id=snap.id,
                        disks={d.disk.uuid: DrDiskRef(label=d.disk.label, size=d.size,
                                                      handle=d.handle) for d in snap.disks})
        doomed = None
        if old is not None and old.snapshot_id and old.snapshot_id != snap.id:
            doomed = stack.record("snapshot", old.snapshot_id,
                                  cluster=old.cluster_uuid or vm.cluster_uuid, vm=vm.name)
        try:
            self.states.save(new)
        except OSError as err:
            if doomed is not None:
                stack.keep(doomed)  # the old state still names it
            raise SinkError(f"VM {vm.name}: cannot write its DR state in {self.states.dir} "
                            f"({err.strerror}); point {vr.point} is on the receiver but the "
                            "next push seeds again") from err
        kept = stack.held("snapshot", snap.id)
        if kept is not None:
            stack.keep(kept)

    def _consistency(self, vm: VmInfo, vr: DrVmResult) -> bool:
        """application_consistent as backups read it: true needs NGT with VSS, try falls
        back to crash-consistent with a warning."""
        mode = self.cfg.application_consistent
        if mode == "false":
            return False
        if vm.app_consistent_capable:
            return True
        why = "guest tools (NGT) with VSS are not enabled"
        if mode == "true":
            raise HypervisorError(f"VM {vm.name}: application_consistent=true but {why}; "
                                  "enable NGT with VSS or set application_consistent=try")
        self._warn(vr, f"VM {vm.name}: {why}; taking a crash-consistent snapshot instead")
        return False


@dataclass(frozen=True)
class _Cycle:
    """What every VM of one cycle shares."""

    session: HypervisorSession
    datapath: DataPath
    job_id: str
    bucket: TokenBucket | None

