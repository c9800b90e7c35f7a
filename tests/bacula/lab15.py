"""A private Bacula 15.0.3 lab: Debian's bookworm-backports packages unpacked into a prefix, and
our ``ahvbackup-fd.so`` built against Debian's 15.0.3 source, both prepared by
``bacula/fd-plugin/ci-prepare.sh`` (default prefix /opt/ahvbackup-ci/bacula15, or
``$AHVBACKUP_BACULA15``). Debian stable's 9.6.7 stays installed for the other lab tests.

The lab is `lab.BaculaLab` with the 15.0.3 programs, table script, query file and plugin folder,
``LD_LIBRARY_PATH`` pointing at the prefix's libraries, and a ``bin/`` folder of its own: the
metaplugin runs ``<directory of bacula-fd>/ahvbackup-bacula-backend`` (the real path of the
program: a link to bacula-fd does not move it), so the lab runs a copy of bacula-fd from
``bin/`` and puts a link to this checkout's backend beside it (what an operator does next to
the installed bacula-fd).

The backend reads its configuration from ``AHVBACKUP_CONFIG`` in the file daemon's environment
(`LabConfig`, rewritten by each test for its own simulator) and from the plugin string.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lab import BaculaLab, JobResult
from tests.conftest import REPO, peers_required

PREFIX = Path(os.environ.get("AHVBACKUP_BACULA15", "/opt/ahvbackup-ci/bacula15")) / "root"
SBIN = PREFIX / "usr" / "sbin"
LIBDIR = PREFIX / "usr" / "lib" / "bacula"
PLUGIN = LIBDIR / "ahvbackup-fd.so"
PLUGIN_SOURCE = REPO / "bacula" / "fd-plugin"
PREPARE = "bacula/fd-plugin/ci-prepare.sh"
BACKEND = Path(sys.executable).with_name("ahvbackup-bacula-backend")
AHVBACKUP = Path(sys.executable).with_name("ahvbackup")
VERSION = "15.0.3"


def _missing() -> str | None:
    programs = [SBIN / p for p in ("bacula-dir", "bacula-sd", "bacula-fd", "bconsole")]
    gone = [str(p) for p in [*programs, PLUGIN, LIBDIR / "bpipe-fd.so"] if not p.exists()]
    if gone:
        return f"Bacula {VERSION} is not prepared ({', '.join(gone)} missing): run {PREPARE}"
    stamp = hashlib.sha256((PLUGIN_SOURCE / "ahvbackup-fd.cpp").read_bytes()
                           + (PLUGIN_SOURCE / "build.sh").read_bytes()).hexdigest()
    built = PLUGIN.with_name("ahvbackup-fd.so.source")
    if not built.exists() or built.read_text().strip() != stamp:
        return f"{PLUGIN} was built from another ahvbackup-fd.cpp or build.sh: run {PREPARE}"
    if not BACKEND.exists():
        return f"{BACKEND} is missing: install the bacula area (make dev)"
    return None


def require_bacula15() -> None:
    """Skip (fail under CI, and always when the plugin is stale) unless 15.0.3 is prepared."""
    why = _missing()
    if why is None:
        return
    if peers_required() or "another" in why:
        pytest.fail(why)
    pytest.skip(why)


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(LIBDIR), env.get("LD_LIBRARY_PATH")]))
    return env


def lab15(root: Path, *, filesets: dict[str, str | list[str]], config: Path | None = None,
          **kw: Any) -> BaculaLab:
    """A 15.0.3 lab under `root`; the backend reads `config` (AHVBACKUP_CONFIG) if given."""
    require_bacula15()
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    fd = bin_dir / "bacula-fd"
    link = bin_dir / "ahvbackup-bacula-backend"
    for p in (fd, link):
        if p.is_symlink() or p.exists():
            p.unlink()
    shutil.copy2(SBIN / "bacula-fd", fd)
    link.symlink_to(BACKEND)
    programs = {"bacula-dir": str(SBIN / "bacula-dir"), "bacula-sd": str(SBIN / "bacula-sd"),
                "bacula-fd": str(bin_dir / "bacula-fd"), "bconsole": str(SBIN / "bconsole")}
    fd_env = {"AHVBACKUP_CONFIG": str(config)} if config else {}
    return BaculaLab(root=root, programs=programs, filesets=filesets,
                     tables_script=PREFIX / "usr/share/bacula-director/make_sqlite3_tables",
                     query_file=PREFIX / "etc/bacula/scripts/query.sql", plugin_dir=LIBDIR,
                     env=environment(), fd_env=fd_env, **kw)


@dataclass
class LabConfig:
    """The backend's configuration file (``AHVBACKUP_CONFIG``) of a module's lab: each test
    writes it for its own simulator with `write`."""

    path: Path

    def write(self, keys: dict[str, str]) -> None:
        text = "".join(f'{k} = "{v}"\n' for k, v in keys.items())
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)


def job_lines(lab: BaculaLab, job_id: int) -> list[str]:
    """The job-log lines of one job (``<name> JobId <id>: <text>``), its report included."""
    out, inside = [], False
    for line in lab.job_log().splitlines():
        m = re.match(r"^\d\d-\w{3} \d\d:\d\d \S+ JobId (\d+): ", line)
        if m:
            inside = int(m.group(1)) == job_id
            out.append(line) if inside else None
        elif inside and line.strip():
            out.append(line)
    return out


def describe(lab: BaculaLab, job: JobResult) -> str:
    """For assertion messages: the job's catalog row and its log lines."""
    return f"{job}\n" + "\n".join(job_lines(lab, job.job_id))
