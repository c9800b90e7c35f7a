"""A throw-away tgtd (the Linux userspace iSCSI target) for tests and benchmarks.

Shipped with the package, like trio's testing helpers, so our tests, `bench/` and third parties
prove an initiator against the same real peer. Needs the Debian package `tgt` and root (tgtd's
control socket lives in /var/run/tgtd). One tgtd per port, its control port equal to the iSCSI
port, so several coexist; it is stopped by its own PID only.
"""

from __future__ import annotations

__all__ = ["TgtdTarget", "free_port"]

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    """A free TCP port that tgtd also accepts as its control port (-C takes at most 32767)."""
    for _ in range(200):
        port = random.randint(20000, 32767)
        if os.path.exists(f"/var/run/tgtd/socket.{port}"):
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


def _which(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if not found:
        raise FileNotFoundError(f"{name} not found (apt-get install tgt)")
    return found


@dataclass
class TgtdTarget:
    """One tgtd on 127.0.0.1:`port` with target tid 1 and LUN 1 backed by `image`.

    `chap` is the incoming account the initiator must log in with, `mutual` the outgoing
    account the target answers with; `params` are target parameters (e.g.
    {"MaxRecvDataSegmentLength": "262144"}).
    """

    image: Path
    port: int = field(default_factory=free_port)
    iqn: str = ""
    chap: tuple[str, str] | None = None
    mutual: tuple[str, str] | None = None
    params: dict[str, str] = field(default_factory=dict)
    blocksize: int | None = None
    log_path: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.iqn:
            self.iqn = f"iqn.2024-01.test.ahvbackup:lun-{self.port}"

    @property
    def portal(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def tgtadm(self, *args: str, check: bool = True) -> str:
        cmd = [_which("tgtadm"), "-C", str(self.port), "--lld", "iscsi", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        if check and done.returncode != 0:
            # tgtadm echoes no secrets in errors, but the command line may hold one: leave it out
            raise RuntimeError(f"tgtadm {args[:4]} failed ({done.returncode}): "
                               f"{done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def start(self) -> TgtdTarget:
        if self._proc is not None and self._proc.poll() is None:
            return self
        log = open(self.log_path or os.devnull, "ab")  # noqa: SIM115 - owned by the child
        try:
            self._proc = subprocess.Popen(
                [_which("tgtd"), "-f", "--iscsi", f"portal=127.0.0.1:{self.port}",
                 "-C", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + 15
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tgtd on port {self.port} exited at start "
                                   f"(rc {self._proc.returncode}; log {self.log_path})")
            ok = subprocess.run([_which("tgtadm"), "-C", str(self.port), "--mode", "sys",
                                 "--op", "show"], capture_output=True, check=False).returncode
            if ok == 0 and self._listening():
                break
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"tgtd did not start listening on port {self.port}")
            time.sleep(0.05)
        self._configure()
        return self

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def _configure(self) -> None:
        self.tgtadm("--mode", "target", "--op", "new", "--tid", "1", "--targetname", self.iqn)
        lu = ["--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1",
              "--backing-store", str(self.image)]
        if self.blocksize:
            lu += ["--blocksize", str(self.blocksize)]
        self.tgtadm(*lu)
        self.tgtadm("--mode", "target", "--op", "bind", "--tid", "1",
                    "--initiator-address", "ALL")
        if self.chap:
            self.tgtadm("--mode", "account", "--op", "new", "--user", self.chap[0],
                        "--password", self.chap[1])
            self.tgtadm("--mode", "account", "--op", "bind", "--tid", "1", "--user",
                        self.chap[0])
        if self.mutual:
            self.tgtadm("--mode", "account", "--op", "new", "--user", self.mutual[0],
                        "--password", self.mutual[1])
            self.tgtadm("--mode", "account", "--op", "bind", "--tid", "1", "--user",
                        self.mutual[0], "--outgoing")
        for name, value in self.params.items():
            self.set_param(name, value)

    def set_param(self, name: str, value: str) -> None:
        self.tgtadm("--mode", "target", "--op", "update", "--tid", "1", "--name", name,
                    "--value", value)

    def connections(self) -> list[tuple[int, int]]:
        """(session id, connection id) of every logged-in connection."""
        out = self.tgtadm("--mode", "target", "--op", "show")
        found: list[tuple[int, int]] = []
        sid = None
        for line in out.splitlines():
            m = re.match(r"\s*I_T nexus: (\d+)", line)
            if m:
                sid = int(m.group(1))
                continue
            m = re.match(r"\s*Connection: (\d+)", line)
            if m and sid is not None:
                found.append((sid, int(m.group(1))))
        return found

    def drop_connections(self) -> int:
        """Close every initiator connection from the target side; returns how many."""
        conns = self.connections()
        for sid, cid in conns:
            self.tgtadm("--mode", "conn", "--op", "delete", "--tid", "1", "--sid", str(sid),
                        "--cid", str(cid), check=False)
        return len(conns)

    def kill(self) -> None:
        """SIGKILL our tgtd (a crashed target): connections reset, the port closes."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGKILL)
        self._proc.wait(timeout=10)
        self._proc = None
        self._cleanup_ipc()

    def stop(self) -> None:
        """Graceful stop, then SIGTERM, then SIGKILL (tgtd ignores TERM while sessions exist)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self.tgtadm("--mode", "target", "--op", "delete", "--force", "--tid", "1",
                        check=False)
            subprocess.run([_which("tgtadm"), "-C", str(self.port), "--mode", "sys", "--op",
                            "delete"], capture_output=True, check=False, timeout=30)
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None and self._proc.poll() is None:
                    os.kill(self._proc.pid, sig)
                try:
                    self._proc.wait(timeout=2)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._proc.wait(timeout=10)
        self._proc = None
        self._cleanup_ipc()

    def _cleanup_ipc(self) -> None:
        for suffix in ("", ".lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/var/run/tgtd/socket.{self.port}{suffix}")

