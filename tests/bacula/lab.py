"""A private, throw-away Bacula (Director, Storage and File daemons, bconsole) on loopback.

Debian's packages (bacula-director, bacula-director-sqlite3, bacula-sd, bacula-fd,
bacula-console) provide the programs; everything else lives in one folder: configuration
(mode 0600, free loopback ports, a random password), a SQLite catalog built from Debian's
table script, File volumes, logs. The daemons run in the foreground (``-f``) as our children
and are stopped by their PIDs, also when a test fails.

Known traps (docs/bacula.md, Part B): check LISTEN in /proc/net/tcp instead of connecting
(a bare connect makes the daemons log a security alert); ``wait jobid=N`` before reading the
catalog; check JobErrors as well as JobStatus (a failed bpipe reader still ends "T").
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

TABLES_SCRIPT = Path("/usr/share/bacula-director/make_sqlite3_tables")
QUERY_FILE = Path("/etc/bacula/scripts/query.sql")
PLUGIN_DIR = Path("/usr/lib/bacula")


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (all held open while choosing, so none repeats)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def listening(port: int) -> bool:
    """True when something LISTENs on 127.0.0.1:`port` (read from /proc, no connection)."""
    suffix = f":{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(suffix) and fields[3] == "0A":
            return True
    return False


def catalog_sql(script: Path = TABLES_SCRIPT) -> str:
    """The CREATE statements of Debian's make_sqlite3_tables (its here-document)."""
    text = script.read_text()
    m = re.search(r"<<END-OF-DATA\n(.*?)\nEND-OF-DATA", text, re.S)
    if not m:
        raise RuntimeError(f"{script}: no END-OF-DATA here-document found")
    return m.group(1)


@dataclass(frozen=True)
class JobResult:
    job_id: int
    status: str
    errors: int
    files: int
    bytes: int


@dataclass
class BaculaLab:
    """One lab. `filesets` maps a FileSet name to its ``Plugin = "..."`` string (or several);
    each gets a backup Job of the same name. `resources` is more Director configuration (e.g.
    what ``ahvbackup bacula fileset --jobdefs LabDefs`` prints). `file_daemons` > 1 adds clients
    ``lab-fd2``, ``lab-fd3``... on their own ports, and Storage ``LabFile2``, ``LabFile3``...
    (a Job picks them with ``Client =`` and ``Storage =``)."""

    root: Path
    programs: dict[str, str]
    filesets: dict[str, str | list[str]]
    resources: str = ""
    file_daemons: int = 1
    volume_jobs: int = 1  # Maximum Volume Jobs
    password: str = field(default_factory=lambda: secrets.token_hex(16))
    ports: list[int] = field(default_factory=list)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # another Bacula than Debian's (lab15.py): its table script, query file, plugin folder,
    # and the environment of every daemon and bconsole (None: ours); `fd_env` is added to the
    # file daemons' environment only
    tables_script: Path = TABLES_SCRIPT
    query_file: Path = QUERY_FILE
    plugin_dir: Path = PLUGIN_DIR
    env: dict[str, str] | None = None
    fd_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.ports:
            self.ports = free_ports(2 + self.file_daemons)

    def client(self, n: int) -> str:
        """The Director's name for file daemon `n` (0-based)."""
        return "lab-fd" if n == 0 else f"lab-fd{n + 1}"

    def fd_port_of(self, n: int) -> int:
        return self.ports[1] if n == 0 else self.ports[2 + n]

    @property
    def dir_port(self) -> int:
        return self.ports[0]

    @property
    def fd_port(self) -> int:
        return self.ports[1]

    @property
    def sd_port(self) -> int:
        return self.ports[2]

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def catalog(self) -> Path:
        return self.work / "bacula.db"

    # configuration --------------------------------------------------------------------
    def write_configs(self) -> None:
        for d in ("etc", "work", "volumes", "log", "pids", "restore"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        pw, root, work = self.password, self.root, self.work
        jobs = "".join(
            f'FileSet {{\n  Name = "{name}"\n  Include {{\n'
            f"    Options {{ signature = MD5 }}\n"
            + "".join(f'    Plugin = "{p}"\n'
                      for p in ([plugins] if isinstance(plugins, str) else plugins))
            + "  }\n}\n"
            f'Job {{ Name = "{name}"; JobDefs = LabDefs; FileSet = "{name}" }}\n'
            for name, plugins in self.filesets.items()
        ) + self.resources
        first = next(iter(self.filesets))
        clients = "".join(f"""\
Client {{
  Name = {self.client(n)}
  Address = 127.0.0.1
  FDPort = {self.fd_port_of(n)}
  Catalog = LabCatalog
  Password = "{pw}-fd"
  AutoPrune = no
}}
""" for n in range(1, self.file_daemons))
        # one File device (same folder) per file daemon: LabFile, LabFile2, ... so jobs of
        # different clients can write at the same time, each to its own volume
        suffixes = ["" if n == 0 else str(n + 1) for n in range(self.file_daemons)]
        storages = "".join(f"""\
Storage {{
  Name = LabFile{x}
  Address = 127.0.0.1
  SDPort = {self.sd_port}
  Password = "{pw}-sd"
  Device = LabFileDev{x}
  Media Type = File
  Maximum Concurrent Jobs = 5
}}
""" for x in suffixes)
        devices = "".join(f"""\
Device {{
  Name = LabFileDev{x}
  Media Type = File
  Archive Device = "{root}/volumes"
  LabelMedia = yes
  Random Access = yes
  AutomaticMount = yes
  RemovableMedia = no
  AlwaysOpen = no
  Maximum Concurrent Jobs = 5
}}
""" for x in suffixes)
        director = f"""\
Director {{
  Name = lab-dir
  DIRport = {self.dir_port}
  DirAddress = 127.0.0.1
  QueryFile = "{self.query_file}"
  WorkingDirectory = "{work}"
  PidDirectory = "{root}/pids"
  Maximum Concurrent Jobs = 5
  Password = "{pw}-dir"
  Messages = Daemon
}}
Catalog {{
  Name = LabCatalog
  dbname = "bacula"; dbuser = ""; dbpassword = ""
}}
Client {{
  Name = lab-fd
  Address = 127.0.0.1
  FDPort = {self.fd_port}
  Catalog = LabCatalog
  Password = "{pw}-fd"
  AutoPrune = no
}}
{clients}{storages}Pool {{
  Name = LabPool
  Pool Type = Backup
  Recycle = yes
  AutoPrune = yes
  Volume Retention = 1 day
  Maximum Volumes = 100
  Label Format = "LabVol-"
  Maximum Volume Jobs = {self.volume_jobs}
}}
Messages {{
  Name = Standard
  console = all, !skipped, !saved
  append = "{root}/log/jobs.log" = all, !skipped
  catalog = all
}}
Messages {{
  Name = Daemon
  console = all, !skipped, !saved
  append = "{root}/log/dir.log" = all, !skipped
}}
Schedule {{ Name = Never }}
JobDefs {{
  Name = LabDefs
  Type = Backup
  Level = Full
  Client = lab-fd
  Storage = LabFile
  Pool = LabPool
  Messages = Standard
  Priority = 10
  Schedule = Never
  Write Bootstrap = "{work}/%n-%i.bsr"
}}
{jobs}Job {{
  Name = "lab-restore"
  Type = Restore
  Client = lab-fd
  Storage = LabFile
  FileSet = "{first}"
  Pool = LabPool
  Messages = Standard
  Where = "{root}/restore"
}}
"""
        storage = f"""\
Storage {{
  Name = lab-sd
  SDPort = {self.sd_port}
  SDAddress = 127.0.0.1
  WorkingDirectory = "{work}"
  Pid Directory = "{root}/pids"
  Plugin Directory = "{self.plugin_dir}"
  Maximum Concurrent Jobs = 20
}}
Director {{ Name = lab-dir; Password = "{pw}-sd" }}
{devices}Messages {{ Name = Standard; director = lab-dir = all }}
"""
        filedaemons = [f"""\
FileDaemon {{
  Name = {self.client(n)}
  FDport = {self.fd_port_of(n)}
  FDAddress = 127.0.0.1
  WorkingDirectory = "{work}"
  Pid Directory = "{root}/pids"
  Plugin Directory = "{self.plugin_dir}"
  Maximum Concurrent Jobs = 20
}}
Director {{ Name = lab-dir; Password = "{pw}-fd" }}
Messages {{ Name = Standard; director = lab-dir = all, !skipped, !restored }}
""" for n in range(self.file_daemons)]
        console = (f'Director {{ Name = lab-dir; DIRport = {self.dir_port}; '
                   f'address = 127.0.0.1; Password = "{pw}-dir" }}\n')
        confs = [("bacula-dir.conf", director), ("bacula-sd.conf", storage),
                 ("bconsole.conf", console)]
        confs += [(f"bacula-{self._fd(n)}.conf", text) for n, text in enumerate(filedaemons)]
        for name, text in confs:
            path = self.etc / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)

    def make_catalog(self) -> None:
        with sqlite3.connect(self.catalog) as db:
            db.executescript(catalog_sql(self.tables_script))
        db.close()

    # daemons --------------------------------------------------------------------------
    def start(self, *, timeout: float = 20.0) -> None:
        self.write_configs()
        self.make_catalog()
        daemons = {"sd": self.sd_port,
                   **{self._fd(n): self.fd_port_of(n) for n in range(self.file_daemons)},
                   "dir": self.dir_port}
        for d in daemons:
            exe = self.programs["bacula-fd" if d.startswith("fd") else f"bacula-{d}"]
            conf = self.etc / f"bacula-{d}.conf"
            test = subprocess.run([exe, "-t", "-c", str(conf)], capture_output=True,
                                  text=True, timeout=60, check=False, env=self._env(d))
            if test.returncode != 0:
                raise RuntimeError(f"bacula-{d} -t refused {conf}: {test.stdout}{test.stderr}")
        for d in daemons:
            exe = self.programs["bacula-fd" if d.startswith("fd") else f"bacula-{d}"]
            conf = self.etc / f"bacula-{d}.conf"
            with (self.root / "log" / f"{d}.out").open("wb") as out:
                self.procs[d] = subprocess.Popen(
                    [exe, "-f", "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True, env=self._env(d))
        deadline = time.monotonic() + timeout
        for d, port in daemons.items():
            while not listening(port):
                if self.procs[d].poll() is not None:
                    raise RuntimeError(f"bacula-{d} exited ({self.procs[d].returncode}): "
                                       f"{self.daemon_output(d)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bacula-{d} does not listen on {port}")
                time.sleep(0.05)

    def _env(self, daemon: str) -> dict[str, str] | None:
        if self.env is None and not (self.fd_env and daemon.startswith("fd")):
            return None
        env = dict(os.environ if self.env is None else self.env)
        if daemon.startswith("fd"):
            env.update(self.fd_env)
        return env

    @staticmethod
    def _fd(n: int) -> str:
        return "fd" if n == 0 else f"fd{n + 1}"

    def daemon_output(self, d: str) -> str:
        path = self.root / "log" / f"{d}.out"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        """Stop every daemon we started, by PID: TERM, then KILL after 10 s."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> BaculaLab:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # console and catalog ----------------------------------------------------------------
    def bconsole(self, commands: str, *, timeout: float = 120.0) -> str:
        done = subprocess.run(
            [self.programs["bconsole"], "-n", "-c", str(self.etc / "bconsole.conf")],
            input=commands if commands.endswith("\n") else commands + "\n",
            capture_output=True, text=True, timeout=timeout, check=False, env=self.env)
        return done.stdout + done.stderr

    def run_job(self, command: str, *, timeout: float = 120.0) -> JobResult:
        """Queue a job with a bconsole `run`/`restore` line, wait for it, read the catalog."""
        out = self.bconsole(command, timeout=timeout)
        ids = re.findall(r"Job queued\. JobId=(\d+)", out)
        if not ids:
            raise RuntimeError(f"no JobId from {command!r}: {out}")
        job_id = int(ids[-1])
        self.bconsole(f"wait jobid={job_id}", timeout=timeout)
        return self.job(job_id)

    def job(self, job_id: int) -> JobResult:
        with sqlite3.connect(f"file:{self.catalog}?mode=ro", uri=True) as db:
            row = db.execute("select JobStatus, JobErrors, JobFiles, JobBytes from Job "
                             "where JobId = ?", (job_id,)).fetchone()
        db.close()
        if row is None:
            raise RuntimeError(f"job {job_id} is not in the catalog")
        return JobResult(job_id, row[0], int(row[1]), int(row[2]), int(row[3]))

    def restore_objects(self, job_id: int) -> int:
        """How many restore objects the job stored (counted in JobFiles: Bacula 13+ saves the
        plugin's restore options with each plugin line of a Full; 9.6 none)."""
        with sqlite3.connect(f"file:{self.catalog}?mode=ro", uri=True) as db:
            (n,) = db.execute("select count(*) from RestoreObject where JobId = ?",
                              (job_id,)).fetchone()
        db.close()
        return int(n)

    def job_row(self, job_id: int) -> dict[str, object]:
        """The catalog's Job row with the client's name (``Client``)."""
        with sqlite3.connect(f"file:{self.catalog}?mode=ro", uri=True) as db:
            db.row_factory = sqlite3.Row
            row = db.execute("select Job.*, Client.Name as Client from Job join Client "
                             "using (ClientId) where JobId = ?", (job_id,)).fetchone()
        db.close()
        if row is None:
            raise RuntimeError(f"job {job_id} is not in the catalog")
        return dict(row)

    def job_log(self) -> str:
        path = self.root / "log" / "jobs.log"
        return path.read_text(errors="replace") if path.exists() else ""
