"""One `qemu-nbd` serving one image on a private unix socket, and our client connected to it.

The image targets write through it (a fresh image, `cache=unsafe` as `qemu-img convert` writes:
the image is fsynced once qemu-nbd has closed it), and `ahvbackup import` reads through it
(`--read-only`, with the allocation map). No root and no kernel nbd device: only a socket, in
the given place or in a private folder when that path is too long for a unix socket.
qemu-nbd's stderr goes to an unlinked file, read only to say why it failed.
"""

from __future__ import annotations

__all__ = ["NbdServer"]

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import IO

import trio

from ahvbackup.core.errors import TargetError
from ahvbackup.core.fsutil import io_failure

from .nbd import NbdClient, NbdError

#: how long qemu-nbd may take to listen, and to close its image and exit once disconnected
START_SECONDS = 15.0
STOP_SECONDS = 60.0
_SUN_PATH = 107  # the longest unix socket path Linux takes


def _last_line(text: bytes) -> str:
    lines = [x.strip() for x in text.decode("utf-8", "replace").splitlines() if x.strip()]
    return lines[-1] if lines else ""


def _private_folder() -> Path:
    """A new folder of our own whose socket path fits a unix socket: in TMPDIR, or in /tmp
    when TMPDIR is too deep for one."""
    for where in (None, "/tmp"):
        folder = Path(tempfile.mkdtemp(prefix="ahvbackup-nbd-", dir=where))
        if len(os.fsencode(folder / "nbd.sock")) <= _SUN_PATH:
            return folder
        folder.rmdir()
    raise TargetError("qemu-nbd: no folder short enough for a unix socket (TMPDIR and /tmp)")


class NbdServer:
    """``server = await NbdServer.start(...)``, then `server.client`; `stop` (clean end, its
    exit checked) or `kill` (abandon), each once. `what` starts every error line."""

    def __init__(self, process: trio.Process, socket: Path, stderr: IO[bytes],
                 private: Path | None, what: str) -> None:
        self.process = process
        self.socket = socket
        self.stderr = stderr
        self.private = private  # a folder made for the socket, removed with it
        self.what = what
        self.client: NbdClient | None = None

    @classmethod
    async def start(cls, qemu_nbd: str, source: list[str], *, socket: Path | None, what: str,
                    read_only: bool = False, depth: int = 8,
                    allocation: bool = False) -> NbdServer:
        """Serve `source` (qemu-nbd's image arguments) at `socket` (None: a private folder)
        and connect with up to `depth` requests in flight (`allocation`: with block status)."""
        private = None
        if socket is None or len(os.fsencode(socket)) > _SUN_PATH:
            private = _private_folder()
            socket = private / "nbd.sock"
        mode = ["--read-only"] if read_only else ["--cache=unsafe"]
        argv = [qemu_nbd, *mode, "--socket", str(socket), *source]
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 - kept open for qemu-nbd's life
        try:
            process = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        except OSError as err:
            stderr.close()
            if private is not None:
                shutil.rmtree(private, ignore_errors=True)
            raise TargetError(f"{what}: cannot run qemu-nbd ({err.strerror or err})") from err
        server = cls(process, socket, stderr, private, what)
        try:
            server.client = await server._connect(depth=depth, allocation=allocation)
        except BaseException:
            with trio.CancelScope(shield=True):
                await server.kill()
            raise
        return server

    async def _connect(self, *, depth: int, allocation: bool) -> NbdClient:
        last = "it made no socket"
        with trio.move_on_after(START_SECONDS):
            while True:
                if self.process.poll() is not None:
                    raise TargetError(f"{self.what}: qemu-nbd did not start: {self.said()}")
                if self.socket.exists():
                    try:
                        return await NbdClient.connect(self.socket, depth=depth,
                                                       allocation=allocation)
                    except NbdError as err:  # not listening yet, or it ended (the loop sees)
                        last = str(err)
                await trio.sleep(0.01)
        raise TargetError(f"{self.what}: qemu-nbd did not listen within {START_SECONDS:.0f} s "
                          f"({last})")

    def said(self) -> str:
        """qemu-nbd's last line of stderr, or how it ended."""
        self.stderr.seek(0)
        text = _last_line(self.stderr.read()[-4096:])
        rc = self.process.returncode
        how = "" if rc is None else (f"killed by signal {-rc}" if rc < 0 else f"exit {rc}")
        return "; ".join(x for x in (text, how) if x) or "no message"

    async def failure(self, err: NbdError, *, during: str, full: Path | None = None
                      ) -> TargetError:
        """What a failed request means, as one line: the destination is full (writing to
        `full`), qemu-nbd ended `during` the work, or it refused the request."""
        if full is not None and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return TargetError(f"{self.what}: "
                               f"{io_failure(full, OSError(err.errno, os.strerror(err.errno)))}")
        if not err.errno:  # the connection ended: did qemu-nbd die?
            with trio.move_on_after(2):
                await self.process.wait()
            if self.process.returncode is not None:
                return TargetError(f"{self.what}: qemu-nbd ended {during} ({self.said()})")
        return TargetError(f"{self.what}: {err}")

    async def stop(self) -> None:
        """Disconnect and wait for qemu-nbd to close the image and exit cleanly."""
        if self.client is not None:
            await self.client.close()
        with trio.move_on_after(STOP_SECONDS):
            await self.process.wait()
        if self.process.returncode is None:
            await self.kill()
            raise TargetError(f"{self.what}: qemu-nbd did not exit within {STOP_SECONDS:.0f} s")
        self._tidy()
        if self.process.returncode != 0:
            raise TargetError(f"{self.what}: qemu-nbd failed: {self.said()}")

    async def kill(self) -> None:
        """Abandon the connection and end qemu-nbd (TERM, then KILL)."""
        if self.client is not None:
            await self.client.abandon()
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(5):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        self._tidy()

    def _tidy(self) -> None:
        self.socket.unlink(missing_ok=True)
        if self.private is not None:
            shutil.rmtree(self.private, ignore_errors=True)
        if not self.stderr.closed:
            self.stderr.close()
