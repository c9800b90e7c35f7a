"""Driver contracts: the small abstract classes every plugin area implements.

stevedore picks one driver class per kind by the name the configuration gives (see
`ahvbackup.core.plugins`). Each driver class declares its `name` (the entry-point name) and,
when it adds configuration keys of its own, a marshmallow `config_schema`. A driver is
constructed with the job's `Config` (``cls(config)``).

`ahvbackup.core.testing` holds every driver, ours and third parties', to these contracts.
"""

from __future__ import annotations

__all__ = [
    "BackupWriter",
    "ClusterAccess",
    "ClusterPlace",
    "DataPath",
    "DiskReader",
    "DiskStage",
    "DiskWriter",
    "DrTransport",
    "Driver",
    "HttpSource",
    "HttpUpload",
    "Hypervisor",
    "HypervisorSession",
    "IscsiSource",
    "Network",
    "NewDisk",
    "NewNic",
    "NewVm",
    "NicShape",
    "RestoreRequest",
    "RestoreTarget",
    "Sink",
    "SourceRange",
    "StoredBackup",
    "VmRestore",
    "VmShape",
    "VmStage",
    "dr_transport_name",
]

import abc
import errno
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

import marshmallow
import trio

from .errors import ConfigError, DataPathError, HypervisorError, SinkError
from .health import HealthCheck, skipped
from .ledger import Record, ReleaseStack
from .manifest import Manifest
from .model import DiskInfo, DiskSnapshot, Region, VmInfo, VmSnapshot

if TYPE_CHECKING:  # config imports the plugin loader, which imports this module
    from .config import Config


class Driver(abc.ABC):  # noqa: B024 - each driver kind below adds its abstract methods
    """Base of every driver. Subclasses set `name`; `config_schema` is optional."""

    #: the entry-point name that selects this driver (`data_path=rest` selects `name == "rest"`)
    name: ClassVar[str] = ""
    #: configuration keys this driver adds; loaded and validated with the core keys
    config_schema: ClassVar[type[marshmallow.Schema] | None] = None
    #: one line for `ahvbackup plugins`
    summary: ClassVar[str] = ""

    def __init__(self, config: Config) -> None:
        #: the job's configuration; a driver's own keys: ``config.settings(MyKeys)``
        self.config = config


# Hypervisor ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpSource:
    """A disk made readable over HTTP ranges (AHV: an image materialised from a snapshot).

    `headers` carry the credentials (never shown); `ssl_context` is None for plain http.
    """

    url: str
    size: int
    headers: Mapping[str, str] = field(repr=False, default_factory=dict)
    ssl_context: Any = field(repr=False, default=None)


@dataclass(frozen=True)
class IscsiSource:
    """A disk made readable over iSCSI (AHV: a volume group cloned from a snapshot disk).

    `portal` is (host, port); `target_iqn` comes from the management API; `chap` is an
    optional (user, secret) the target requires; `size` is what the API says the disk holds
    (a LUN smaller than that is an error).
    """

    portal: tuple[str, int]
    target_iqn: str
    lun: int
    size: int
    chap: tuple[str, Any] | None = field(repr=False, default=None)


@dataclass(frozen=True)
class ClusterPlace:
    """A cluster a restore may create a VM on: `uuid`, `name`, and its storage `containers`
    as (uuid, name) pairs."""

    uuid: str
    name: str
    containers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Network:
    """A network a VM's NIC may join: `uuid`, `name`, `cidr` (``10.0.0.0/24``, "" when the
    platform does not manage its addresses), on cluster `cluster_uuid`."""

    uuid: str
    name: str
    cidr: str
    cluster_uuid: str


@dataclass(frozen=True)
class NicShape:
    """One NIC of a recorded VM: the network it was on, and its MAC address."""

    network_uuid: str
    mac: str | None = None


@dataclass(frozen=True)
class VmShape:
    """What a restore recreates of a backed-up VM, read from its recorded configuration:
    CPU (`sockets` x `cores_per_socket`), `memory_mib`, firmware (`boot_type`),
    `machine_type`, its NICs and `description`, and the cluster it was on."""

    cluster_uuid: str
    sockets: int = 1
    cores_per_socket: int = 1
    memory_mib: int = 1024
    boot_type: str = ""
    machine_type: str = ""
    nics: tuple[NicShape, ...] = ()
    description: str = ""

    @property
    def uefi(self) -> bool:
        """It boots from UEFI firmware (AHV's UEFI and SECURE_BOOT boot types)."""
        return self.boot_type.upper() in ("UEFI", "SECURE_BOOT")


@dataclass(frozen=True)
class NewNic:
    """A NIC of a VM to create: its network, and a MAC address (None: a new one)."""

    network_uuid: str
    mac: str | None = None


@dataclass(frozen=True)
class NewVm:
    """A VM to create (without disks: `attach_disks` adds them). Empty `boot_type` or
    `machine_type` take the platform's default."""

    name: str
    cluster_uuid: str
    sockets: int
    cores_per_socket: int
    memory_mib: int
    boot_type: str = ""
    machine_type: str = ""
    nics: tuple[NewNic, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class DiskStage:
    """A disk written on the cluster before its VM has it (a volume-group disk, an uploaded
    image): `source_id` is what `NewDisk` clones, `size` its bytes, and `records` what to
    release (newest last) once the VM's disk is made."""

    source_id: str
    size: int
    records: tuple[Record, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class NewDisk:
    """A disk to add to a created VM: a clone of `stage`, at `bus`.`index`, in `container_uuid`
    (empty: the cluster's default)."""

    stage: DiskStage
    bus: str
    index: int
    container_uuid: str = ""


@dataclass(frozen=True)
class HttpUpload:
    """Where a disk's bytes are sent whole, in one HTTP PUT of `size` bytes: `url`,
    `headers` with the credentials (never shown), `ssl_context` (None for plain http)."""

    url: str
    size: int
    headers: Mapping[str, str] = field(repr=False, default_factory=dict)
    ssl_context: Any = field(repr=False, default=None)


class HypervisorSession(abc.ABC):
    """One authenticated conversation with the management plane, for the length of a job.

    Every method that creates a remote resource records it through the given `ReleaseStack`
    before relying on it, so it is released when the job ends however it ends.
    """

    @abc.abstractmethod
    async def discover(self) -> str:
        """Probe the endpoints; return the one-line discovery summary for the job log."""

    @abc.abstractmethod
    async def list_vms(self) -> list[VmInfo]:
        """Every VM the configured cluster(s) hold, with disks and configuration."""

    @abc.abstractmethod
    async def snapshot_vm(
        self, vm: VmInfo, *, application_consistent: bool, name: str, stack: ReleaseStack
    ) -> VmSnapshot:
        """Take a snapshot of every disk of `vm` at one point in time."""

    @abc.abstractmethod
    def regions(
        self, disk: DiskSnapshot, *, reference: str | None = None
    ) -> AsyncIterator[Region]:
        """Regions to read: the allocation map (no reference) or the changes since `reference`."""

    @abc.abstractmethod
    async def stage_http(self, disk: DiskSnapshot, *, stack: ReleaseStack) -> HttpSource:
        """Make a snapshot disk readable over HTTP ranges (REST data path)."""

    @abc.abstractmethod
    async def release(self, record: Record) -> None:
        """Release one recorded resource; an already-gone resource counts as released."""

    async def iscsi_portal(self, cluster_uuid: str | None = None) -> tuple[str, int] | None:
        """The iSCSI portal (data services address, port) if the platform offers one (of
        cluster `cluster_uuid`, or of the first cluster)."""
        return None

    async def stage_iscsi(
        self, disk: DiskSnapshot, *, initiator_iqn: str, stack: ReleaseStack
    ) -> IscsiSource:
        """Expose a snapshot disk as an iSCSI LUN that `initiator_iqn` may log in to (iSCSI
        data path); every remote step goes on `stack` before it is relied on."""
        raise DataPathError(f"disk {disk.disk.label}: this hypervisor has no iSCSI path")

    async def stage_iscsi_vm(
        self, disks: Sequence[DiskSnapshot], *, initiator_iqn: str, stack: ReleaseStack
    ) -> tuple[IscsiSource, ...]:
        """Expose several disks of one snapshot at once, one source each in `disks` order (a
        platform may put them behind one target, a LUN each, with fewer API calls). By
        default each disk is staged on its own (`stage_iscsi`)."""
        return tuple([await self.stage_iscsi(d, initiator_iqn=initiator_iqn, stack=stack)
                      for d in disks])

    # restore side: what a target that recreates VMs on the platform needs ------------------

    def _no_restore(self, what: str) -> HypervisorError:
        return HypervisorError(f"this hypervisor cannot {what} (no restore to it)")

    async def restore_places(self) -> list[ClusterPlace]:
        """The clusters a restore may create VMs on, with their storage containers."""
        raise self._no_restore("list clusters to restore to")

    async def list_networks(self) -> list[Network]:
        """Every network of every cluster (the subnets a restored VM's NICs may join)."""
        raise self._no_restore("list networks")

    async def stage_empty_iscsi(
        self, *, cluster_uuid: str, container_uuid: str, size: int, name: str,
        initiator_iqn: str, stack: ReleaseStack,
    ) -> tuple[IscsiSource, DiskStage]:
        """A new, all-zero disk of `size` bytes in `container_uuid`, exposed as an iSCSI LUN
        `initiator_iqn` may write; every remote step goes on `stack` before it is relied on."""
        raise DataPathError(f"disk {name}: this hypervisor has no iSCSI path")

    async def stage_upload(
        self, *, cluster_uuid: str, size: int, name: str, stack: ReleaseStack,
    ) -> tuple[HttpUpload, DiskStage]:
        """An empty disk object (an image) to PUT `size` bytes into, recorded on `stack`
        first."""
        raise self._no_restore("take a disk upload")

    async def create_vm(self, vm: NewVm, *, stack: ReleaseStack) -> str:
        """Create `vm` (powered off, no disks) under an id recorded on `stack` first, so a
        retried request makes one VM and an aborted restore leaves none; returns its id."""
        raise self._no_restore("create VMs")

    async def attach_disks(self, vm_id: str, disks: Sequence[NewDisk]) -> None:
        """Give the created VM `vm_id` its disks, each a clone of a staged disk."""
        raise self._no_restore("attach disks")

    async def power_on(self, vm_id: str) -> None:
        """Power the VM on (and wait until the platform says it is)."""
        raise self._no_restore("power VMs on")


class Hypervisor(Driver):
    """Talks to a hypervisor's management plane (for AHV: Prism)."""

    kind: ClassVar[str] = "hypervisor"

    @abc.abstractmethod
    def connect(self) -> AbstractAsyncContextManager[HypervisorSession]:
        """``async with driver.connect() as session:``"""

    def vm_shape(self, config: Mapping[str, Any]) -> VmShape | None:
        """Read a backed-up VM's recorded configuration (`Manifest.config`, as this platform
        gave it) into what a restore recreates; None when this platform records none or it
        is empty. Pure: no connection is made."""
        del config
        return None

    async def health_checks(self, *, timeout: float = 10.0) -> list[HealthCheck]:
        """Pre-flight checks of the management plane, in order, for `ahvbackup health-check`
        (reach, authentication, inventory, permissions, the data path's portal); `timeout`
        bounds each network step. They create nothing on the cluster. By default the
        platform has none, and one skipped check says so."""
        return [skipped("hypervisor", f"{self.name or type(self).__name__} checks",
                        f"the {self.name or type(self).__name__} hypervisor driver has no "
                        "health checks")]


# Data path -------------------------------------------------------------------------------------


class DiskReader(abc.ABC):
    """Random-access reads of one snapshot disk."""

    size: int

    @abc.abstractmethod
    async def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill `buf` with the bytes at `offset`; anything short of that is an error."""


class DataPath(Driver):
    """Moves disk bytes between a snapshot on the cluster and the job (iscsi, rest)."""

    kind: ClassVar[str] = "datapath"

    def read_size(self) -> int:
        """Bytes per read. By default the configured chunk (`chunk_size_mib`, which the
        whitepaper defines for iSCSI); a path with a high per-request cost may read more."""
        return self.config.chunk_size_mib << 20

    @abc.abstractmethod
    def open(
        self, session: HypervisorSession, disk: DiskSnapshot, *, stack: ReleaseStack
    ) -> AbstractAsyncContextManager[DiskReader]:
        """``async with path.open(session, disk, stack=stack) as reader``: expose `disk`.

        The reader, and the connections or sessions it holds, live in the caller's task for
        the block and are closed when it ends; resources staged on the cluster go on `stack`
        (released by it, after the block). Reads may come from several tasks at once."""

    def stage(
        self, session: HypervisorSession, disks: Sequence[DiskSnapshot], *, stack: ReleaseStack
    ) -> AbstractAsyncContextManager[VmStage]:
        """``async with path.stage(session, disks, stack=stack) as staged``: whatever one VM's
        disks can share (iscsi: one volume group and target for all of them), staged once,
        on `stack`; each disk is then opened with ``staged.open(disk, stack=...)``. By
        default nothing is shared and each disk is opened as `open` does."""
        return nullcontext(_EachDisk(self, session))


class VmStage(abc.ABC):
    """The disks of one VM as a data path staged them together (`DataPath.stage`)."""

    @abc.abstractmethod
    def open(
        self, disk: DiskSnapshot, *, stack: ReleaseStack
    ) -> AbstractAsyncContextManager[DiskReader]:
        """As `DataPath.open`, for one of the staged disks; what only this disk needs goes
        on `stack`."""


class _EachDisk(VmStage):
    """Nothing shared: every disk is opened, and staged, on its own."""

    def __init__(self, path: DataPath, session: HypervisorSession) -> None:
        self._path = path
        self._session = session

    def open(
        self, disk: DiskSnapshot, *, stack: ReleaseStack
    ) -> AbstractAsyncContextManager[DiskReader]:
        return self._path.open(self._session, disk, stack=stack)


# Sink ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredBackup:
    """One complete backup of one VM as a sink lists it (`of` its manifest, the one way)."""

    backup_id: str
    vm_uuid: str
    vm_name: str
    level: str
    created: float
    disks: tuple[str, ...]  # disk labels with a stream
    bytes_stored: int
    manifest: Manifest = field(repr=False, compare=False)

    @classmethod
    def of(cls, manifest: Manifest) -> StoredBackup:
        return cls(backup_id=manifest.backup_id, vm_uuid=manifest.vm.uuid,
                   vm_name=manifest.vm.name, level=manifest.level, created=manifest.created,
                   disks=tuple(d.label for d in manifest.streams),
                   bytes_stored=manifest.bytes_stored, manifest=manifest)


@dataclass(frozen=True)
class DamagedBackup:
    """An entry of a repository that is not a complete backup, and why."""

    vm: str  # the VM's folder (or name) it was found under
    backup_id: str
    where: str  # the path (or catalog entry) that is damaged
    reason: str
    unreadable: bool = False  # it could not be read at all (permissions, I/O), not just wrong


@dataclass
class Inventory:
    """Everything a sink holds: complete backups and damaged entries."""

    backups: list[StoredBackup] = field(default_factory=list)
    damaged: list[DamagedBackup] = field(default_factory=list)


class BackupWriter(abc.ABC):
    """Receives one VM's backup: a stream per disk, then the manifest. Nothing is visible as a
    complete backup until `commit`; `abort` (or an exception) leaves nothing that looks complete."""

    @abc.abstractmethod
    async def write_disk(self, label: str, chunks: AsyncIterator[bytes | memoryview]) -> int:
        """Store one disk stream; returns the bytes stored.

        Take one item at a time and be done with it before asking for the next: an item's
        buffer is reused once the next one is requested (that is what keeps memory flat).
        """

    @abc.abstractmethod
    async def commit(self, manifest: Manifest) -> StoredBackup: ...

    @abc.abstractmethod
    async def abort(self) -> None: ...

    def open_written(self, label: str) -> BinaryIO:
        """Read back a stream written in this (uncommitted) backup; sinks that manage their
        backups (`Sink.manages_backups`) provide it, consolidation checks its output with it."""
        raise SinkError(f"{type(self).__name__} cannot read back what it wrote")


class Sink(Driver):
    """Stores disk streams and manifests (the directory repository, Bacula)."""

    kind: ClassVar[str] = "sink"
    #: lists earlier backups and opens their streams, so deltas can be chained onto them
    #: (incremental and differential levels are refused for a sink without it)
    keeps_chains: ClassVar[bool] = False
    #: removes and replaces its own backups: retention and consolidation run on it (Bacula's
    #: sink does not: Bacula's catalog and retention own those backups)
    manages_backups: ClassVar[bool] = False

    async def begin_replace(self, vm: VmInfo, *, backup_id: str, level: str) -> BackupWriter:
        """A new version of an existing backup (same id), replacing it at commit."""
        raise SinkError(f"sink {self.name!r} cannot replace backups (consolidation needs the "
                        "directory repository)")

    async def remove(self, backup: StoredBackup) -> None:
        """Remove one complete backup."""
        raise SinkError(f"sink {self.name!r} cannot remove backups")

    def sweep_partials(self) -> list[Path]:
        """Remove what killed jobs left half-written; returns it. Nothing by default."""
        return []
    #: where a sink that cannot work on its own does work ("a Bacula job": its host program
    #: attaches the channel); empty for a sink that works anywhere. A command that cannot be
    #: that host refuses it before contacting the cluster.
    works_only_inside: ClassVar[str] = ""

    @abc.abstractmethod
    async def begin(self, vm: VmInfo, *, backup_id: str, level: str) -> BackupWriter: ...

    @abc.abstractmethod
    async def backups(self, vm: str | None = None) -> list[StoredBackup]:
        """Complete backups, oldest first; `vm` filters by VM name or UUID."""

    async def damaged(self, vm: str | None = None) -> list[DamagedBackup]:
        """Entries that are not complete backups, with the reason (list and verify show
        them). A sink that keeps no entries of its own (Bacula's catalog does) has none."""
        return []

    @abc.abstractmethod
    def open_stream(self, backup: StoredBackup, label: str) -> BinaryIO:
        """A binary file object reading one disk stream from its start."""


# Restore target --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreRequest:
    """One VM to restore, as the target sees it: `vm_name`, the backed-up VM's name (a file
    target makes a folder of it with `safe_name`); `dest`, the folder for local files
    (``--dest``, Bacula's where; a cluster target ignores it); `manifest`, the backup point's
    manifest (the VM's configuration and disks) when it is known before the disks are (a
    Bacula restore hands the disks first); `shape`, what the VM was (CPU, memory, firmware,
    NICs) as the hypervisor driver reads the manifest's recorded configuration
    (`Hypervisor.vm_shape`), None when that is not known."""

    vm_name: str
    dest: Path
    manifest: Manifest | None = None
    shape: VmShape | None = None


@dataclass(frozen=True)
class ClusterAccess:
    """What a target that creates things on a cluster (`RestoreTarget.needs_cluster`) gets:
    the hypervisor session, and the stack every remote resource goes on before it is relied
    on (a killed job's leftovers are then swept by the next run). The job closes the stack
    after `VmRestore.commit` or `abort`."""

    session: HypervisorSession
    stack: ReleaseStack


@dataclass(frozen=True)
class SourceRange:
    """Bytes of a local regular file, already verified, for `DiskWriter.copy`: `length` bytes
    at `offset` of the open descriptor `fd` (valid only until the call returns; do not move
    its file position or close it)."""

    fd: int
    offset: int
    length: int


class DiskWriter(abc.ABC):
    """One disk being restored.

    The job calls `write`, `copy` and `zero` one at a time (each awaited before the next), with
    ranges in ascending offset order that never overlap and lie inside [0, size). A range that
    is never given reads as zeros: a new disk is all zeros, so a target may skip `zero` ranges
    on a disk it created. A `data` view is valid only until the call returns. `copy(offset,
    source)` gives a range whose verified bytes sit in a local file (`SourceRange`), when the
    repository is one; its default reads them and calls `write`, and a file target may
    override it to copy in the kernel (`os.copy_file_range`). Then `finish`."""

    @abc.abstractmethod
    async def write(self, offset: int, data: memoryview) -> None: ...

    async def copy(self, offset: int, source: SourceRange) -> None:
        buf = bytearray(min(source.length, COPY_PIECE))
        done = 0
        while done < source.length:
            view = memoryview(buf)[: min(len(buf), source.length - done)]
            await trio.to_thread.run_sync(_pread_exact, source.fd, view, source.offset + done)
            await self.write(offset + done, view)
            done += len(view)

    @abc.abstractmethod
    async def zero(self, offset: int, length: int) -> None: ...

    @abc.abstractmethod
    async def finish(self) -> str:
        """Every range was given: make the disk durable; returns where it is (a path, or a
        cluster object's id)."""


#: the default `DiskWriter.copy` moves at most this many bytes per `write`
COPY_PIECE = 4 << 20


def _pread_exact(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise OSError(errno.EIO, f"source ended {len(view)} bytes early")
        view, offset = view[n:], offset + n


class VmRestore(abc.ABC):
    """One VM being restored: its disks (opened one or several at a time, each by its own task),
    then `commit` once every disk finished, or `abort`."""

    @abc.abstractmethod
    async def open_disk(self, disk: DiskInfo, *, size: int) -> DiskWriter:
        """A writer for `disk`, restored at `size` bytes."""

    @abc.abstractmethod
    async def commit(self) -> str:
        """Make the restored VM real (files are complete; a VM is created, powered on if asked);
        returns where it is (a folder, a VM's id)."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Remove everything this restore made, at whatever step it failed: no partial file,
        image, volume group or VM is left. Safe to call more than once."""


class RestoreTarget(Driver):
    """Receives restored VMs (raw files, qcow2, vmdk, vhdx, vhd, an AHV cluster)."""

    kind: ClassVar[str] = "target"
    #: creates things on a cluster: the job opens a hypervisor session for `begin_vm`
    needs_cluster: ClassVar[bool] = False

    @abc.abstractmethod
    async def begin_vm(self, request: RestoreRequest, *,
                       cluster: ClusterAccess | None) -> VmRestore:
        """Start restoring one VM. `cluster` is given when `needs_cluster` is true, else None."""


class DrTransport(Driver):
    """The authenticated, encrypted channel between a DR source and its receiver (psk, mtls).

    The source calls `connect`; the receiver calls `serve`. Both sides prove their
    credentials before a byte of payload moves: a peer with wrong credentials is refused on
    both sides with a `TransportError` naming what failed (never a secret). The streams they
    give are ordinary `trio.abc.Stream` objects; a damaged, replayed, reordered or truncated
    stream ends with an error that is a `TransportError` and a `trio.BrokenResourceError`,
    before any of the bad bytes are returned. `ahvbackup.core.testing.check_dr_transport`
    holds a driver to this. `dr_transport_name` says which driver a configuration selects.
    """

    kind: ClassVar[str] = "transport"

    @abc.abstractmethod
    async def connect(self) -> trio.abc.Stream:
        """An authenticated, encrypted byte stream to the receiver at
        config.dr_host:config.dr_port."""

    @abc.abstractmethod
    async def serve(self, handler: Callable[[trio.abc.Stream], Awaitable[None]], *,
                    host: str | None = None,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on config.dr_port (0: any free port) and run `handler` for each peer that
        authenticates; task_status.started(port) once listening. `host` is the address to
        bind (None: every interface; with port 0, give one). Each peer runs in its own task
        and its stream is closed when `handler` returns; a peer that fails to authenticate,
        or whose stream breaks (a `TransportError` or `trio.BrokenResourceError` out of
        `handler`), is logged with its address and the reason, and the listener goes on."""


def dr_transport_name(config: Config) -> str:
    """The DR transport a configuration selects, from the keys it sets: ``psk`` with
    `dr_auth_token`, ``mtls`` with `dr_auth_cert`, `dr_auth_key` and `dr_ca_cert`. Both,
    or neither, is a `ConfigError` naming the keys."""
    tls = [k for k in ("dr_auth_cert", "dr_auth_key", "dr_ca_cert") if getattr(config, k)]
    if config.dr_auth_token and tls:
        raise ConfigError(f"dr_auth_token and {', '.join(tls)} are both set: the DR channel is "
                          "either psk (dr_auth_token) or mtls (certificates); keep one")
    if config.dr_auth_token:
        return "psk"
    if tls:
        return "mtls"
    raise ConfigError("DR channel: no credentials: set dr_auth_token (psk) or dr_auth_cert, "
                      "dr_auth_key and dr_ca_cert (mtls)")
