"""Conformance harness: plays the file daemon's metaplugin side against the backend program.

It runs the real ``ahvbackup-bacula-backend`` as a subprocess over pipes, the way the Bacula
metaplugin does (docs/bacula.md, Part A1), and checks every packet the backend sends with its
own parser (it shares no code with the backend): header shape, packet types allowed at each
step, and that nothing ever appears on stderr, which also stays open for the whole session
(the file daemon polls it and reads its end-of-file as a backend error).

Messages (W I S N R P O V Q) are collected while the harness waits for the next C/D/F
packet, as the plugin does; E and A are returned to the caller, who decides whether they
are the expected answer.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BACKEND = Path(sys.executable).with_name("ahvbackup-bacula-backend")
HANDLERS = "demo_handlers:DemoHandlers"

_HEADER = re.compile(rb"([CDFTEAWISNRPOVQ])([0-9]{6})\n\Z")
_TRANSPARENT = frozenset("WISNRPOVQ")


class HarnessError(AssertionError):
    """The backend broke the protocol, timed out, or wrote to stderr."""


@dataclass
class Packet:
    kind: str
    payload: bytes

    @property
    def text(self) -> str:
        assert self.kind != "D", "a data packet has no text"
        return self.payload.decode("utf-8", "surrogateescape").removesuffix("\n")

    def __repr__(self) -> str:
        body = self.payload[:60] if self.kind == "D" else self.text
        return f"{self.kind}({body!r}{'...' if len(self.payload) > 60 else ''})"


@dataclass
class BackupFile:
    fname: str
    stat: str
    tstamp: str
    data: bytes | None  # None: estimate/listing (no DATA)
    error: str | None = None  # the E packet that failed it half way


@dataclass
class Backend:
    """One backend process and the conversation with it."""

    proc: subprocess.Popen[bytes]
    started: float
    timeout: float = 20.0
    received: list[Packet] = field(default_factory=list)
    messages: list[Packet] = field(default_factory=list)

    # --- spawning ---------------------------------------------------------------------
    @classmethod
    def spawn(cls, *, env: dict[str, str] | None = None, handlers: str | None = HANDLERS,
              config_files: Sequence[Path] = (), argv: Sequence[str] | None = None) -> Backend:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("AHVBACKUP_")}
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
        full_env["AHVBACKUP_CONFIG"] = os.pathsep.join(str(p) for p in config_files)
        if handlers:
            full_env["AHVBACKUP_BACULA_HANDLERS"] = handlers
        full_env.update(env or {})
        started = time.monotonic()
        proc = subprocess.Popen(list(argv or [str(BACKEND)]), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env)
        return cls(proc=proc, started=started)

    # --- raw packets ----------------------------------------------------------------
    def send(self, kind: str, payload: bytes = b"") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"%c%06d\n" % (ord(kind), len(payload)) + payload)
        self.proc.stdin.flush()

    def command(self, text: str) -> None:
        self.send("C", text.encode() + b"\n")

    def eod(self) -> None:
        self.send("F")

    def _read_exactly(self, n: int, deadline: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        out = bytearray()
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise HarnessError(f"timed out waiting for the backend ({len(out)} of {n} "
                                   f"bytes); last packets: {self.received[-5:]}")
            chunk = os.read(fd, n - len(out))
            if not chunk:
                raise HarnessError(f"backend closed stdout ({len(out)} of {n} bytes); "
                                   f"stderr={self._stderr_now()!r}; last: {self.received[-5:]}")
            out += chunk
        return bytes(out)

    def receive_raw(self) -> Packet:
        """The next packet, whatever its type; the header is checked strictly."""
        self.check_stderr_open()
        deadline = time.monotonic() + self.timeout
        head = self._read_exactly(8, deadline)
        m = _HEADER.match(head)
        if not m:
            raise HarnessError(f"malformed packet header from the backend: {head!r}")
        kind, length = m.group(1).decode(), int(m.group(2))
        if kind in "FT" and length:
            raise HarnessError(f"{kind} packet with a payload: {head!r}")
        payload = self._read_exactly(length, deadline) if length else b""
        if kind not in "DFT" and not payload.endswith(b"\n"):
            raise HarnessError(f"{kind} packet not ending in a newline: {payload!r}")
        if kind == "D" and not payload:
            raise HarnessError("empty D packet (the plugin would read it as end of data)")
        packet = Packet(kind, payload)
        self.received.append(packet)
        return packet

    def receive(self) -> Packet:
        """The next C, D, F, T, E or A packet; messages are collected on the way."""
        while True:
            packet = self.receive_raw()
            if packet.kind in _TRANSPARENT:
                self.messages.append(packet)
                continue
            return packet

    def expect(self, kind: str, text: str | None = None) -> Packet:
        packet = self.receive()
        if packet.kind != kind or (text is not None and packet.text != text):
            want = f"{kind}({text!r})" if text is not None else kind
            raise HarnessError(f"expected {want}, got {packet!r}; messages={self.messages}")
        return packet

    def expect_ack(self) -> None:
        self.expect("F")

    # --- protocol steps ---------------------------------------------------------------
    def hello(self, plugin: str = "ahvbackup", api: str = "3") -> float:
        """Handshake; returns the seconds from spawn to the answer."""
        self.command(f"Hello {plugin} {api}")
        self.expect("C", "Hello Bacula")
        return time.monotonic() - self.started

    def job(self, **fields: str | int) -> None:
        self.command("Job")
        for key, value in fields.items():
            self.command(f"{key}={value}")
        self.eod()
        self.expect_ack()

    def params(self, items: Iterable[str]) -> Packet:
        """Send a Params block; returns the answer (F when accepted, E/A when refused)."""
        self.command("Params")
        for item in items:
            self.command(item)
        self.eod()
        return self.receive()

    def start(self, command: str) -> None:
        self.command(command)
        self.expect_ack()

    def files(self, *, data: bool) -> list[BackupFile]:
        """Read the backup/estimate/listing loop up to its final end of data."""
        out: list[BackupFile] = []
        while True:
            packet = self.receive()
            if packet.kind == "F":
                return out
            if packet.kind == "E":  # an error between files: the plugin logs it, reads on
                self.messages.append(packet)
                continue
            if packet.kind != "C" or not packet.text.startswith("FNAME:"):
                raise HarnessError(f"expected FNAME or end of files, got {packet!r}")
            fname = packet.text.removeprefix("FNAME:")
            stat = self.expect("C").text
            tstamp = self.expect("C").text
            if not stat.startswith("STAT:") or not tstamp.startswith("TSTAMP:"):
                raise HarnessError(f"{fname}: expected STAT and TSTAMP, got {stat!r} {tstamp!r}")
            self.expect_ack()
            f = BackupFile(fname, stat.removeprefix("STAT:"), tstamp.removeprefix("TSTAMP:"),
                           None)
            out.append(f)
            if not data:
                continue
            if f.stat.startswith("D "):
                self.expect_ack()  # a directory has no data
                continue
            self.expect("C", "DATA")
            buf = bytearray()
            while True:
                packet = self.receive()
                if packet.kind == "D":
                    buf += packet.payload
                elif packet.kind == "F":
                    break
                elif packet.kind == "E":
                    f.error = packet.text
                    break
                else:
                    raise HarnessError(f"{fname}: expected data, got {packet!r}")
            f.data = bytes(buf)

    def restore(self, fname: str, data: bytes | None, *, size: int | None = None,
                block: int = 65_536) -> Packet:
        """Offer one file; returns the backend's final answer (OK C packet, SKIP, or E)."""
        size = len(data or b"") if size is None else size
        self.command(f"FNAME:{fname}")
        self.command(f"STAT:F {size} 0 0 100640 1 0")
        self.command(f"TSTAMP:{1_700_000_000} {1_700_000_000} {1_700_000_000}")
        self.eod()
        answer = self.receive()
        if answer.kind != "C" or answer.text not in {"OK", "SKIP"}:
            raise HarnessError(f"{fname}: expected OK or SKIP, got {answer!r}")
        if answer.text == "SKIP" or not data:
            return answer
        self.command("DATA")
        for start in range(0, len(data), block):
            self.send("D", data[start : start + block])
        self.eod()
        return self.receive()

    def end(self) -> int:
        """END, its ack, T; returns the exit status (checking stderr stayed empty)."""
        self.command("END")
        self.expect_ack()
        return self.terminate()

    def terminate(self, *, linger: float = 0.3) -> int:
        """T, then keep the pipe open a moment as the file daemon does: the backend must
        still be reading (an exit before end-of-file is logged as a backend error)."""
        self.send("T")
        deadline = time.monotonic() + linger
        while time.monotonic() < deadline:
            self.check_stderr_open()
            if self.proc.poll() is not None:
                raise HarnessError(f"backend exited ({self.proc.returncode}) after T without "
                                   "reading its input to the end")
            time.sleep(0.02)
        return self.close()

    def hang_up(self) -> int:
        """What a 13.x/15.x file daemon does at the end of a restore with job errors: no END,
        no T, it closes the pipe."""
        return self.close()

    # --- the end ------------------------------------------------------------------------
    def _stderr_now(self) -> bytes:
        if self.proc.poll() is None or self.proc.stderr is None:
            return b"(still running)"
        return self.proc.stderr.read()

    def signal(self, signum: int = signal.SIGUSR1) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise HarnessError(f"backend still running after {timeout} s") from None

    def close(self, *, timeout: float = 10.0) -> int:
        """Close our end like the plugin does, wait, and check nothing was left unsaid."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        if not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        self.check_stderr_open()
        code = self.wait(timeout)
        rest = self.proc.stdout.read()
        self.check_stderr()
        if rest:
            raise HarnessError(f"backend sent bytes after the session ended: {rest[:200]!r}")
        return code

    def check_stderr_open(self) -> None:
        """Fail when the running backend has written to or closed its stderr."""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        if self.proc.returncode is not None or not select.select([fd], [], [], 0)[0]:
            return
        chunk = os.read(fd, 4096)
        if chunk:
            raise HarnessError(f"backend wrote to stderr: {chunk[:2000]!r}")
        try:  # end-of-file: fine only if the backend is exiting right now
            self.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            raise HarnessError("backend closed its stderr while still running (the file "
                               f"daemon reads that as an error); last: {self.received[-3:]}"
                               ) from None

    def check_stderr(self) -> None:
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        if err:
            raise HarnessError(f"backend wrote to stderr: {err[:2000]!r}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def job_fields(kind: str = "B", *, level: str = "F", where: str | None = None,
               job_id: int = 7, bacula: str = "13") -> dict[str, str | int]:
    """The Job block the 13.x metaplugin sends (docs/bacula.md Part C); ``bacula="15"``: the
    15.0.3 one, which ends with the file daemon's WorkingDir, SysconfigPath and ExePath."""
    fields: dict[str, str | int] = {"Name": f"demo-{kind}", "JobID": job_id, "Type": kind}
    if kind in "BE":
        fields.update(Level=level, Since=0)
    if where is not None:
        fields.update(Where=where, Replace="a")
    fields["Namespace"] = "@ahvbackup"
    if bacula == "15":
        fields.update(WorkingDir="/var/lib/bacula", SysconfigPath="/etc/bacula",
                      ExePath="/usr/sbin")
    return fields
