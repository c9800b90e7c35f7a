"""An OVF descriptor read into what an import into AHV takes from it (sans-I/O).

From the one virtual system an OVF describes (DMTF DSP0243 1.x, the form vSphere exports and
`ova.py` writes): CPU (``VirtualQuantity`` and VMware's ``CoresPerSocket``), memory with its
allocation units, firmware (VMware's ``firmware=efi``), the NICs in order with the network
each is connected to, and the disks in boot order (controllers in the order they are
declared, then each disk's address on its controller) with their capacities and the file
(``References``) that holds each, or none for a blank disk. Elements and attributes are
matched by local name, so the namespace prefixes an exporter chose do not matter.
"""

from __future__ import annotations

__all__ = ["OvfDisk", "OvfVm", "read_ovf"]

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from ahvbackup.core.errors import ConfigError

#: RASD resource types
CPU, MEMORY, NIC, DISK = "3", "4", "10", "17"
CONTROLLERS = {"5", "6", "20"}  # IDE, parallel SCSI, other storage (SATA, NVMe)
_UNITS = re.compile(r"^\s*byte(?:\s*\*\s*2\s*\^\s*(\d+))?\s*$", re.IGNORECASE)
_NAMED_UNITS = {"kilobytes": 10, "megabytes": 20, "gigabytes": 30, "terabytes": 40,
                "kb": 10, "mb": 20, "gb": 30, "tb": 40}


@dataclass(frozen=True)
class OvfDisk:
    """One disk: the OVF's `disk_id`, its `capacity` in bytes, and `href`, the file that
    holds it (None: a blank disk)."""

    disk_id: str
    capacity: int
    href: str | None


@dataclass(frozen=True)
class OvfVm:
    """The virtual system: `name`, `vcpus` (`cores_per_socket` each socket), `memory_mib`,
    `uefi`, `networks` (the network of each NIC, in order) and `disks` in boot order."""

    name: str
    vcpus: int
    cores_per_socket: int
    memory_mib: int
    uefi: bool
    networks: tuple[str, ...]
    disks: tuple[OvfDisk, ...]


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _attr(el: ET.Element, name: str) -> str | None:
    for key, value in el.attrib.items():
        if _local(key) == name:
            return value
    return None


def _children(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el if _local(c.tag) == name]


def _find(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el.iter() if _local(c.tag) == name]


def _text(el: ET.Element, name: str) -> str:
    found = _children(el, name)
    return (found[0].text or "").strip() if found else ""


def _shift(units: str | None, where: str, *, default: int) -> int:
    """log2 of a byte unit (``byte * 2^20``, ``MegaBytes``)."""
    if not units:
        return default
    m = _UNITS.match(units)
    if m:
        return int(m.group(1) or 0)
    named = _NAMED_UNITS.get(units.strip().lower())
    if named is None:
        raise ConfigError(f"ovf: {where}: unknown allocation units {units!r}")
    return named


def _int(text: str | None, where: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ConfigError(f"ovf: {where}: not a whole number (got {text!r})") from None
    if value <= 0:
        raise ConfigError(f"ovf: {where}: must be positive (got {value})")
    return value


def _system(root: ET.Element) -> ET.Element:
    systems = _find(root, "VirtualSystem")
    if len(systems) != 1:
        raise ConfigError(f"ovf: describes {len(systems)} virtual systems; an import takes an "
                          "OVF of one VM")
    return systems[0]


def _disks(root: ET.Element, items: list[ET.Element]) -> tuple[OvfDisk, ...]:
    files = {_attr(f, "id"): _attr(f, "href") for f in _find(root, "File")}
    declared: dict[str, OvfDisk] = {}
    for d in _find(root, "Disk"):
        disk_id = _attr(d, "diskId") or ""
        shift = _shift(_attr(d, "capacityAllocationUnits"), f"disk {disk_id}", default=0)
        capacity = _int(_attr(d, "capacity"), f"disk {disk_id} capacity") << shift
        ref = _attr(d, "fileRef")
        if ref is not None and ref not in files:
            raise ConfigError(f"ovf: disk {disk_id} refers to file {ref!r}, which References "
                              "does not list")
        declared[disk_id] = OvfDisk(disk_id, capacity, files.get(ref) if ref else None)
    controllers = [_text(i, "InstanceID") for i in items if _text(i, "ResourceType")
                   in CONTROLLERS]
    placed: list[tuple[int, int, str]] = []
    for item in items:
        if _text(item, "ResourceType") != DISK:
            continue
        host = _text(item, "HostResource")
        disk_id = host.rsplit("/", 1)[-1]
        if disk_id not in declared:
            raise ConfigError(f"ovf: a disk item names {host!r}, which DiskSection does not "
                              "declare")
        parent = _text(item, "Parent")
        order = controllers.index(parent) if parent in controllers else len(controllers)
        address = _text(item, "AddressOnParent")
        placed.append((order, int(address) if address.isdigit() else 0, disk_id))
    ordered = [declared[d] for _, _, d in sorted(placed)]
    ordered += [d for d in declared.values() if d not in ordered]
    return tuple(ordered)


def read_ovf(text: str | bytes) -> OvfVm:
    """The VM an OVF describes; a `ConfigError` names what is missing or malformed."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as err:
        raise ConfigError(f"ovf: not an OVF descriptor ({err})") from None
    if _local(root.tag) != "Envelope":
        raise ConfigError(f"ovf: not an OVF descriptor (its root is {_local(root.tag)!r})")
    system = _system(root)
    items = _find(system, "Item")
    vcpus, cores, memory = 1, 1, 1024
    networks: list[str] = []
    for item in items:
        kind = _text(item, "ResourceType")
        if kind == CPU:
            vcpus = _int(_text(item, "VirtualQuantity"), "CPU VirtualQuantity")
            per = _text(item, "CoresPerSocket")
            cores = _int(per, "CoresPerSocket") if per else 1
            if vcpus % cores:
                cores = 1
        elif kind == MEMORY:
            shift = _shift(_text(item, "AllocationUnits"), "memory", default=20)
            amount = _int(_text(item, "VirtualQuantity"), "memory VirtualQuantity") << shift
            memory = max(1, amount >> 20)
        elif kind == NIC:
            network = _text(item, "Connection")
            if not network:
                raise ConfigError(f"ovf: NIC {len(networks)} names no network (Connection)")
            networks.append(network)
    uefi = any((_attr(c, "key") or "") == "firmware" and (_attr(c, "value") or "") == "efi"
               for c in _find(system, "Config"))
    name = _text(system, "Name") or _attr(system, "id") or ""
    return OvfVm(name=name, vcpus=vcpus, cores_per_socket=cores, memory_mib=memory, uefi=uefi,
                 networks=tuple(networks), disks=_disks(root, items))
