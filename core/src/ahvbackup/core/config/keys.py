"""Every configuration key: name, field (type and validation), default, section and meaning.

Names, types, defaults and meanings follow section 7 of the reference whitepaper; the keys
marked `ours` are this project's additions. This table is the one place a key is declared:
the schema, the documentation checks and the annotated example all follow it.
"""

from __future__ import annotations

__all__ = [
    "ALIASES",
    "KEYS",
    "MODES",
    "SECRET_KEYS",
    "SECTIONS",
    "Key",
    "build_schema",
    "canonical_key",
    "core_fields",
]

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import marshmallow
from marshmallow import fields as mm_fields

from ..stream.payload import parse_compression
from .fields import (
    Bool,
    Choice,
    ConfigField,
    Csv,
    DriverName,
    HostPortField,
    Int,
    IPv4,
    NetworkMap,
    Number,
    PathField,
    SecretField,
    Text,
    invalid,
)

WORKING = Path("/opt/bacula/working")

#: the whitepaper's mode values (section 7.7), in its order
MODES = (
    "backup",
    "restore",
    "estimate",
    "receiver",
    "seed",
    "bitmap-push",
    "failover-test",
    "failover-planned",
    "failover-unplanned",
    "failover-undo",
    "failover-perm",
)

SECTIONS = {
    "connection": "Connection",
    "selection": "Backup selection",
    "datapath": "Data path",
    "restore": "Restore",
    "dr": "DR replication",
    "logging": "Logging and scratch",
    "ours": "ahvbackup additions",
}


@dataclass(frozen=True)
class Key:
    """One configuration key. `default` is the typed value used when no source sets it."""

    name: str
    field: ConfigField
    default: object
    section: str
    help: str
    default_text: str = ""
    ours: bool = False

    @property
    def kind(self) -> str:
        f = self.field
        if isinstance(f, Choice):
            return "|".join(f.choices)
        if isinstance(f, Int) and f.minimum is not None and f.maximum is not None:
            return f"{f.minimum}-{f.maximum}"
        return f.kind

    @property
    def secret(self) -> bool:
        return isinstance(self.field, SecretField)


def _k(name: str, field: ConfigField, default: object, section: str, help: str, *,
       default_text: str | None = None, ours: bool = False) -> Key:
    if default_text is None:
        if default is None or default == ():
            default_text = ""
        elif isinstance(default, bool):
            default_text = "yes" if default else "no"
        elif isinstance(default, tuple):
            default_text = ",".join(str(d) for d in default)
        else:
            default_text = str(default)
    return Key(name, field, default, section, help, default_text, ours)


class Compression(ConfigField):
    """`auto`, `none`, `zstd` or `zstd:LEVEL`, loaded in that spelling (`zstd` as `zstd:1`)."""

    kind = "none|zstd[:level]|auto"

    def convert(self, text: str) -> Any:
        if text.strip().lower() == "auto":
            return "auto"
        try:
            name, level = parse_compression(text)
        except ValueError as err:
            raise invalid(f"must be auto, none, zstd or zstd:LEVEL: {err}", text) from None
        return name if name == "none" else f"{name}:{level}"


class TenantName(ConfigField):
    """A tenant: one folder name under ``tenants/`` (letters, digits, ``.``, ``_``, ``-``)."""

    kind = "name"
    _pattern = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

    def convert(self, text: str) -> Any:
        if not self._pattern.fullmatch(text):
            raise invalid("must be 1-64 letters, digits, '.', '_' or '-', starting with a "
                          "letter or digit", text)
        return text


_POSITIVE = {"minimum": 1}
_PORT = {"minimum": 1, "maximum": 65535}

KEYS: tuple[Key, ...] = (
    # 7.1 connection
    _k("prism_central", HostPortField(empty=None), None, "connection",
       "Prism Central host name or IP (optionally :port), reachable from this host."),
    _k("prism_port", Int(**_PORT), 9440, "connection",
       "Prism Central HTTPS port (or give it as prism_central = host:port)."),
    _k("prism_api_version", Choice(("auto", "v3", "v4")), "auto", "connection",
       "auto tries v4 first (version discovery) and uses it with data_path=iscsi; with "
       "data_path=auto or rest it uses v3 (v4 reads a disk over REST only through a VM "
       "clone, which a backup user may not make), logging which and why; v4 fails in one "
       "line against a v3-only Prism."),
    _k("user", Text(empty=None), None, "connection",
       "Prism user (must exist in Prism IAM, not only as LDAP pass-through)."),
    _k("password", SecretField(), None, "connection",
       "Inline Prism password; works but warns on every job. Prefer passfile."),
    _k("passfile", PathField(empty=None), None, "connection",
       "File holding 'password = ...'; must be mode 0600 (no group or other access)."),
    _k("prism_insecure", Bool(), False, "connection",
       "Skip TLS certificate verification (lab use only); warns on every job."),
    _k("cluster", Text(empty=None), None, "connection",
       "Cluster name or UUID when Prism Central manages several clusters."),
    # 7.2 selection
    _k("vm", Csv(), ("*",), "selection",
       "VM UUIDs, exact names or glob patterns (prod-*), comma-separated."),
    _k("exclude", Csv(empty=()), (), "selection",
       "Patterns removed after vm= matching, comma-separated."),
    _k("project", Csv(empty=()), (), "selection",
       "Prism Central project names or UUIDs, comma-separated: only their VMs are selected "
       "(vm=, exclude= and cluster= apply within them).", ours=True),
    _k("tenant", TenantName(empty=None), None, "selection",
       "The tenant the job runs for: its own state_dir/tenants/<tenant> and repository/"
       "tenants/<tenant>; other tenants' backups are refused. Default: the project when "
       "project= names exactly one.", ours=True),
    _k("application_consistent",
       Choice(("true", "try", "false"),
              synonyms={"yes": "true", "on": "true", "1": "true",
                        "no": "false", "off": "false", "0": "false"}),
       "try", "selection",
       "try: app-consistent snapshot if possible, else crash-consistent; true: fail without it."),
    # 7.3 data path
    _k("data_path", DriverName(), "auto", "datapath",
       "auto, iscsi or rest (or an installed third-party data path). auto picks iscsi when "
       "the DSIP answers on its iSCSI port, else rest; a disk whose target it does not offer "
       "goes over rest, with a warning."),
    _k("dsip", IPv4(empty=None), None, "datapath",
       "Data Services IP of the cluster; discovered when unset.", default_text="probed"),
    _k("iscsi_initiator", Text(), "auto", "datapath",
       "iSCSI initiator IQN; auto reads /etc/iscsi/initiatorname.iscsi or makes one."),
    _k("concurrent_vms", Int(**_POSITIVE), 2, "datapath",
       "VMs prepared (snapshot, volume group attach) at the same time."),
    _k("concurrent_disks", Int(**_POSITIVE), 4, "datapath",
       "Disks read in parallel per VM."),
    _k("chunk_size_mib", Int(**_POSITIVE), 1, "datapath",
       "Read size in MiB; larger helps sequential throughput."),
    _k("prism_rate_rpm", Int(minimum=0), 30, "datapath",
       "Client-side cap on Prism API requests per minute; 0 = no cap (a lab, not production)."),
    # 7.4 restore
    _k("mode", Choice(MODES), "backup", "restore",
       "What the job does; see the mode table."),
    _k("where", PathField(empty=None), None, "restore",
       "Bacula restore prefix; normally set by the Director."),
    _k("restore_vm_name", Text(empty=None), None, "restore",
       "Name of the restored VM (default: the original name + '-restored').",
       default_text="<orig>-restored"),
    _k("target_cluster", Text(empty=None), None, "restore",
       "Cluster name or UUID to restore to (default: the source cluster).",
       default_text="source"),
    _k("target_container", Text(empty=None), None, "restore",
       "Storage container on the target cluster (default: the source container).",
       default_text="source"),
    _k("network_map", NetworkMap(empty=()), (), "restore",
       "Subnet remapping on restore: src=dst,src2=dst2."),
    _k("power_on", Bool(), False, "restore", "Power the restored VM on once it is created."),
    _k("restore_disks_only", Csv(empty=()), (), "restore",
       "Restore only these disks: disk-0,disk-2."),
    _k("vcpu", Int(empty=None, **_POSITIVE), None, "restore",
       "vCPU count of the restored VM (default: as the source). Also spelled --vcpu.",
       default_text="source"),
    _k("memory_mib", Int(empty=None, **_POSITIVE), None, "restore",
       "Memory (MiB) of the restored VM (default: as the source). Also spelled --memory-mib.",
       default_text="source"),
    _k("cross_restore", Bool(), True, "restore",
       "Accept streams from other hypervisors for restore."),
    # 7.5 DR
    _k("dr_host", HostPortField(empty=None, allow_port=False), None, "dr",
       "DR receiver host name or IP (set on the source side)."),
    _k("dr_port", Int(**_PORT), 9848, "dr", "DR receiver TCP port."),
    _k("dr_auth_token", SecretField(), None, "dr",
       "Pre-shared key of the DR channel; generate with: openssl rand -hex 32."),
    _k("dr_auth_cert", PathField(empty=None), None, "dr", "mTLS client certificate (optional)."),
    _k("dr_auth_key", PathField(empty=None), None, "dr", "mTLS client key."),
    _k("dr_ca_cert", PathField(empty=None), None, "dr",
       "CA certificate that verifies the receiver."),
    _k("dr_restore_points", Int(**_POSITIVE), 7, "dr",
       "Point-in-time images kept on the receiver."),
    _k("max_bandwidth_mbps", Int(minimum=0), 0, "dr",
       "DR bandwidth cap in Mbit/s; 0 = unlimited."),
    _k("push_interval", Int(**_POSITIVE), 300, "dr", "Seconds between delta pushes."),
    _k("push_apply_remote", Bool(), True, "dr",
       "Receiver applies incoming deltas as they arrive (recommended)."),
    # 7.6 logging and scratch
    _k("verbose", Int(minimum=0, maximum=3), 1, "logging",
       "0 errors only, 1 normal, 2 debug, 3 trace."),
    _k("debug_log", PathField(empty=None), WORKING / "ahvbackup.log", "logging",
       "Backend log file (created mode 0600); empty for none."),
    _k("log_format", Choice(("text", "json")), "text", "logging",
       "Lines of debug_log: text, or json (one object per line: time, level, tenant, job, "
       "vm, disk, phase, message).", ours=True),
    _k("working_dir", PathField(), WORKING, "logging", "Scratch root for temporary files."),
    _k("state_dir", PathField(), WORKING / "ahvbackup-state", "logging",
       "Persistent state: change-tracking references, seeds, bitmaps."),
    _k("job_cleanup_on_abort", Bool(), True, "logging",
       "At start, release what a killed run left (sessions, volume groups, snapshots)."),
    # ours
    _k("prism_ca_cert", PathField(empty=None), None, "ours",
       "CA bundle to trust for Prism TLS (e.g. the simulator's generated CA).", ours=True),
    _k("hypervisor", DriverName(), "ahv", "ours", "Hypervisor driver.", ours=True),
    _k("sink", DriverName(), "directory", "ours",
       "Where streams are stored: directory (local repository) or bacula.", ours=True),
    _k("repository", PathField(empty=None), None, "ours",
       "Folder of the directory repository.", default_text="<working_dir>/repository",
       ours=True),
    _k("target", DriverName(), "raw", "ours",
       "Restore target driver: raw, qcow2, vmdk, vhdx, vhd, ahv.", ours=True),
    _k("level", Choice(("full", "incremental", "differential")), "full", "ours",
       "Backup level; Bacula sets it from the Job's Level.", ours=True),
    _k("verify_unchanged_sample", Number(minimum=0, maximum=100), 0.0, "ours",
       "Percent of regions reported unchanged to re-read and compare (trust check of "
       "change tracking); 0 = off.", default_text="0", ours=True),
    _k("keep_fulls", Int(minimum=0), 0, "ours",
       "Full backups (with their incrementals) kept in the repository; 0 = keep all.",
       ours=True),
    _k("keep_days", Int(minimum=0), 0, "ours",
       "Days a backup is kept in the repository; 0 = no age limit.", ours=True),
    _k("compression", Compression(), "auto", "ours",
       "Stream payloads: none, zstd or zstd:LEVEL (1-19); auto = zstd:1 in the directory "
       "repository, none with Bacula (its FileSet compresses).", ours=True),
    _k("encryption_key", PathField(empty=None), None, "ours",
       "Key file (64 hex digits, mode 0600; openssl rand -hex 32) that encrypts new streams "
       "with AES-256-GCM; directory repository only.", ours=True),
    _k("encryption_old_keys", Csv(empty=()), (), "ours",
       "Older key files, comma-separated: streams they encrypted still restore after a key "
       "rotation.", ours=True),
    _k("metrics_textfile", PathField(empty=None), None, "ours",
       "Prometheus textfile (node_exporter format) each job writes at its end, atomically; "
       "needs ahvbackup-metrics (docs/metrics.md).", ours=True),
    _k("metrics_pushgateway", HostPortField(empty=None), None, "ours",
       "Prometheus Pushgateway (host:port, plain HTTP) each job pushes to at its end; needs "
       "ahvbackup-metrics.", ours=True),
    _k("metrics_port", Int(empty=None, **_PORT), None, "ours",
       "Port of the long-running receiver's /metrics endpoint.", ours=True),
)

BY_NAME: dict[str, Key] = {k.name: k for k in KEYS}

#: other spellings accepted for a key (the whitepaper writes these two as options)
ALIASES = {"--vcpu": "vcpu", "--memory-mib": "memory_mib"}

SECRET_KEYS = frozenset(k.name for k in KEYS if k.secret)

_KEY_SYNTAX = re.compile(r"(--)?[A-Za-z_][A-Za-z0-9_-]*")


def canonical_key(written: str) -> str:
    """The key a spelling stands for: ``--memory-mib`` -> ``memory_mib``; others unchanged.

    Option-style spellings (leading ``--``) may use hyphens; plain keys are snake_case.
    """
    if written in ALIASES:
        return ALIASES[written]
    if written.startswith("--"):
        return written[2:].replace("-", "_")
    return written


def core_fields() -> dict[str, mm_fields.Field[object]]:
    return {k.name: k.field for k in KEYS}


def build_schema(
    extra_fields: Mapping[str, mm_fields.Field[object]] | None = None,
) -> marshmallow.Schema:
    """The schema of every core key plus `extra_fields` (keys from plugins and drivers)."""
    all_fields: dict[str, mm_fields.Field[object]] = {**core_fields(), **(extra_fields or {})}
    return marshmallow.Schema.from_dict(all_fields, name="ConfigSchema")()
