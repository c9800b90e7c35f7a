"""Write the annotated configuration example from the key table, so it never drifts.

    python packaging/conf_example.py            # print it
    python packaging/conf_example.py --write    # rewrite packaging/ahvbackup.conf
    python packaging/conf_example.py --check    # exit 1 when the shipped file differs

Every key of `ahvbackup.core.config.KEYS` appears once, commented out, in its section, with
its meaning, its state (works, or refused by this version and the issue that will make it
work: `not_yet.py`, the mode table and the drivers not installable yet) and its default, or
an example from `EXAMPLES` when the default is empty or only known at run time. The Debian
package installs the result as /etc/ahvbackup/ahvbackup.conf.example.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

from ahvbackup.core.config import KEYS, Key
from ahvbackup.core.config.assembly import VM_RESTORE_KEYS
from ahvbackup.core.config.keys import SECTIONS
from ahvbackup.core.config.modes import MODE_TABLE
from ahvbackup.core.config.not_yet import NOT_YET, NOT_YET_DRIVERS

SHIPPED = Path(__file__).resolve().parent / "ahvbackup.conf"
WIDTH = 94

#: defaults that a job works out at run time; the example shows a value and names these
RUNTIME_DEFAULTS = frozenset({"source", "probed", "<orig>-restored", "<working_dir>/repository"})

#: a valid value to show for each key whose default is empty or only known at run time
EXAMPLES: dict[str, str] = {
    "prism_central": "pc.example.com",
    "user": "backup-svc",
    "password": "inline-password-warns-on-every-job",
    "passfile": "/opt/bacula/etc/ahvbackup.secrets",
    "cluster": "prod-cluster-01",
    "exclude": "prod-test-*",
    "project": "customer-a",
    "tenant": "customer-a",
    "dsip": "10.0.0.50",
    "where": "/tmp/bacula-restores",
    "restore_vm_name": "prod-vm-restored",
    "target_cluster": "dr-cluster-01",
    "target_container": "default-container",
    "network_map": "10.10.0.0/24=10.20.0.0/24",
    "restore_disks_only": "disk-0,disk-2",
    "vcpu": "4",
    "memory_mib": "8192",
    "dr_host": "dr-receiver.example.com",
    "dr_auth_token": "output-of-openssl-rand-hex-32",
    "dr_auth_cert": "/opt/bacula/etc/dr-client.pem",
    "dr_auth_key": "/opt/bacula/etc/dr-client.key",
    "dr_ca_cert": "/opt/bacula/etc/dr-ca.pem",
    "prism_ca_cert": "/opt/bacula/etc/prism-ca.pem",
    "repository": "/opt/bacula/working/repository",
    "encryption_key": "/opt/bacula/etc/ahvbackup-stream.key",
    "encryption_old_keys": "/opt/bacula/etc/ahvbackup-stream-2025.key",
    "metrics_textfile": "/var/lib/prometheus/node-exporter/ahvbackup.prom",
    "metrics_pushgateway": "pushgateway.example.com:9091",
    "metrics_port": "9849",
}

HEADER = """\
# ahvbackup configuration: every key, annotated. Copy to /opt/bacula/etc/ahvbackup.conf (the
# file read when no -c is given).
#
# Generated from the key table by packaging/conf_example.py; do not edit by hand.
#
# Format: one "key = value" per line; lines starting with '#' are comments ('#' elsewhere is
# part of the value); "..." or '...' keep blanks at a value's ends; relative paths are
# relative to this file's folder. The FileSet plugin string overrides these keys, and
# command-line options override both. Reference: docs/configuration.md.
#
# Each key below is commented out and shows its default, or an example when it has none.
# Its "State" line says whether it works. A key refused in this version is not done yet:
# setting it stops the job with one line saying so (nothing is accepted and then ignored).
# Minimum for backups: prism_central, user and passfile.
#
# Secrets: keep the Prism password in a passfile (one line "password = ..."), mode 0600.
# If this file holds password or dr_auth_token it must be mode 0600 too, else it is refused.
"""


class MissingExample(Exception):
    """A key has no default to show and no entry in `EXAMPLES`."""


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, width=WIDTH, initial_indent="# ", subsequent_indent="# ")


def _issues(names: list[str], issue: int) -> str:
    return f"{', '.join(names)} (issue {issue})"


def state_of(key: Key) -> str:
    """The key's state in one sentence, from the tables that refuse keys and values."""
    if key.name == "mode":
        works = [m.name for m in MODE_TABLE.values() if m.works]
        later: dict[int, list[str]] = {}
        for m in MODE_TABLE.values():
            if m.issue is not None:
                later.setdefault(m.issue, []).append(m.name)
        refused = "; ".join(_issues(v, i) for i, v in sorted(later.items()))
        return f"{', '.join(works)} work" + (f"; refused: {refused}" if refused else "") + "."
    drivers: dict[int, list[str]] = {}
    for (kind, name), issue in NOT_YET_DRIVERS.items():
        if kind == key.name:
            drivers.setdefault(issue, []).append(name)
    entry = next((n for n in NOT_YET if n.key == key.name), None)
    if entry is not None and not entry.values:
        return f"refused in this version when set (issue {entry.issue}): {entry.purpose}."
    refused = [_issues(list(entry.values), entry.issue)] if entry is not None else []
    refused += [_issues(v, i) for i, v in sorted(drivers.items())]
    if refused:
        return f"works; refused in this version: {'; '.join(refused)}."
    if key.name in VM_RESTORE_KEYS:
        return ("works with target=ahv (a restore that creates a VM on the cluster); "
                "refused with a target that writes disk images.")
    return "works."


def shown_value(key: Key) -> str:
    if key.default_text and key.default_text not in RUNTIME_DEFAULTS:
        return key.default_text
    try:
        return EXAMPLES[key.name]
    except KeyError:
        raise MissingExample(f"{key.name}: no default to show; add an example to EXAMPLES in "
                             f"{Path(__file__).name}") from None


def key_block(key: Key) -> Iterator[str]:
    value = shown_value(key)
    help_text = key.help
    if key.default_text and value != key.default_text:
        help_text += f" Default: {key.default_text}."
    yield from _comment(help_text)
    yield from _comment(f"State: {state_of(key)}")
    yield f"#{key.name} = {value}"


def render() -> str:
    lines = HEADER.splitlines()
    for section, title in SECTIONS.items():
        lines += ["", "", f"# ---- {title} ".ljust(WIDTH, "-")]
        for n, key in enumerate(k for k in KEYS if k.section == section):
            lines += [""] * (n > 0) + list(key_block(key))
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"rewrite {SHIPPED}")
    group.add_argument("--check", action="store_true", help=f"exit 1 when {SHIPPED} differs")
    args = parser.parse_args(argv)
    try:
        text = render()
    except MissingExample as err:
        print(f"conf_example: {err}", file=sys.stderr)
        return 2
    if args.write:
        SHIPPED.write_text(text, encoding="utf-8")
    elif args.check:
        if SHIPPED.read_text(encoding="utf-8") != text:
            print(f"conf_example: {SHIPPED} is stale; run: python packaging/conf_example.py "
                  "--write", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
