"""Driver contracts: the small abstract classes every plugin area implements.

stevedore picks one driver class per kind by the name the configuration gives (see
`ahvbackup.core.plugins`). Each driver class declares its `name` (the entry-point name) and,
when it adds configuration keys of its own, a marshmallow `config_schema`.

The async methods that move data are defined by the job pipeline; the contracts here are the
ones every driver shares, so the conformance checks in `ahvbackup.core.testing` can hold
third-party drivers to them.
"""

from __future__ import annotations

__all__ = [
    "DataPath",
    "Driver",
    "DrTransport",
    "Hypervisor",
    "RestoreTarget",
    "Sink",
]

import abc
from typing import ClassVar

import marshmallow


class Driver(abc.ABC):
    """Base of every driver. Subclasses set `name`; `config_schema` is optional."""

    #: the entry-point name that selects this driver (`data_path=rest` selects `name == "rest"`)
    name: ClassVar[str] = ""
    #: configuration keys this driver adds; loaded and validated with the core keys
    config_schema: ClassVar[type[marshmallow.Schema] | None] = None
    #: one line for `ahvbackup plugins`
    summary: ClassVar[str] = ""


class Hypervisor(Driver):
    """Talks to a hypervisor's management plane (for AHV: Prism)."""

    kind: ClassVar[str] = "hypervisor"


class DataPath(Driver):
    """Moves disk bytes between a snapshot on the cluster and the job (iscsi, rest)."""

    kind: ClassVar[str] = "datapath"


class Sink(Driver):
    """Stores disk streams and manifests (the directory repository, Bacula)."""

    kind: ClassVar[str] = "sink"


class RestoreTarget(Driver):
    """Receives a reconstructed disk (raw file, qcow2, vmdk, vhdx, vhd, an AHV cluster)."""

    kind: ClassVar[str] = "target"


class DrTransport(Driver):
    """The authenticated channel between a DR source and its receiver (psk, mtls)."""

    kind: ClassVar[str] = "transport"
