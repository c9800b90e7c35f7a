"""Pre-flight health checks: the result of one check, and the checks core runs itself.

`ahvbackup health-check` (and ``ahvbackup-bacula-backend --standalone health-check``) runs, in
order, the checks of the hypervisor driver (`Hypervisor.health_checks`: for AHV, TLS,
authentication, clusters, RBAC, DSIP and iSCSI) and then `local_checks` here: the repository and
state directory writable, and the passfile's mode. Each check is a `HealthCheck`; `exit_code`
of a report is 0 when nothing failed, else the code of the first failure (2 for configuration,
3 for something that could not be reached or refused us). See docs/cli.md.
"""

from __future__ import annotations

__all__ = ["FAIL", "OK", "SKIP", "WARN", "HealthCheck", "StepTimer", "exit_code",
           "local_checks", "skipped"]

import contextlib
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ExitCode

if TYPE_CHECKING:
    from .config import Config

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"


@dataclass(frozen=True)
class HealthCheck:
    """One check's outcome.

    `step` is a short stable identifier (``tls``, ``auth``, ...), `title` what was checked,
    `status` one of ``ok``/``warn``/``fail``/``skip``, `detail` what was found, `hint` how to
    fix a failure (or a warning), `exit_code` what a failure means (2 configuration,
    3 unreachable or refused), `data` machine-readable details for ``--json``. Nothing in a
    check may hold a secret.
    """

    step: str
    title: str
    status: str
    seconds: float = 0.0
    detail: str = ""
    hint: str = ""
    exit_code: ExitCode = ExitCode.UNAVAILABLE
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "title": self.title, "status": self.status,
                "seconds": round(self.seconds, 3), "detail": self.detail,
                "hint": self.hint or None,
                "exit_code": int(self.exit_code) if self.failed else 0,
                "data": dict(self.data)}


def skipped(step: str, title: str, why: str) -> HealthCheck:
    return HealthCheck(step, title, SKIP, detail=why, exit_code=ExitCode.OK)


class StepTimer:
    """``with StepTimer() as t: ...; t.seconds``: the wall time of one check."""

    def __enter__(self) -> StepTimer:
        self._t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._t0


def exit_code(checks: Iterable[HealthCheck]) -> ExitCode:
    """0 when no check failed, else the exit code of the first failure."""
    for check in checks:
        if check.failed:
            return check.exit_code
    return ExitCode.OK


# local checks ------------------------------------------------------------------------------------


def _writable_dir(path: Path) -> tuple[str, ExitCode] | None:
    """None when a job can write in `path` (creating it if missing), else why not and what
    that means: 2 when the path is not a folder (configuration), 3 when the folder refuses
    writes (read-only, permissions, full). Nothing is left behind: a probe file is created and
    removed, a missing folder is not created."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return f"{path}: no existing parent folder", ExitCode.CONFIG
        probe = probe.parent
    if not probe.is_dir():
        kind = "a file" if probe.is_file() else "not a file or folder"
        on_way = "" if probe == path else f" (it is on the way to {path})"
        return f"{probe} is {kind}, not a folder{on_way}", ExitCode.CONFIG
    try:
        fd, name = tempfile.mkstemp(prefix=".ahvbackup-health-", dir=probe)
    except OSError as err:
        return (f"{probe}: cannot create a file there ({err.strerror or err})",
                ExitCode.UNAVAILABLE)
    try:
        os.write(fd, b"x")
        os.fsync(fd)
    except OSError as err:
        return f"{probe}: cannot write a file there ({err.strerror or err})", ExitCode.UNAVAILABLE
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name)
    return None


def _path_check(step: str, title: str, path: Path, key: str) -> HealthCheck:
    with StepTimer() as t:
        problem = _writable_dir(path)
        exists = path.exists()
    if problem is None:
        detail = f"{path} is writable" if exists else \
            f"{path} does not exist yet; a job creates it (its parent folder is writable)"
        return HealthCheck(step, title, OK, t.seconds, detail=detail, exit_code=ExitCode.OK,
                           data={"path": str(path), "exists": exists})
    why, code = problem
    hint = (f"set {key}= to a folder (it names something else now)" if code == ExitCode.CONFIG
            else f"make {path} writable for this user ({_whoami()}): a read-write mount, "
                 f"its owner or mode, free space; or set {key}= to another folder")
    return HealthCheck(step, title, FAIL, t.seconds, detail=why, hint=hint, exit_code=code,
                       data={"path": str(path), "exists": exists})


def _whoami() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())


def _passfile_check(config: Config) -> HealthCheck:
    from .config.loader import check_file_mode
    from .errors import ConfigError

    title = "passfile mode"
    passfile = config.passfile
    if passfile is None:
        if config.password is not None:
            return HealthCheck(
                "passfile", title, WARN, detail="the password is set inline, not in a passfile",
                hint="put it in a passfile (mode 0600) and set passfile= instead",
                exit_code=ExitCode.OK)
        return skipped("passfile", title, "no passfile configured")
    with StepTimer() as t:
        try:
            check_file_mode(Path(passfile), what="passfile")
            st = Path(passfile).stat()
        except ConfigError as err:
            return HealthCheck("passfile", title, FAIL, t.elapsed, detail=str(err),
                               hint=f"chmod 600 {passfile}", exit_code=ExitCode.CONFIG,
                               data={"path": str(passfile)})
    mode = stat.S_IMODE(st.st_mode)
    return HealthCheck("passfile", title, OK, t.seconds,
                       detail=f"{passfile}: mode {mode:04o}, owner uid {st.st_uid}",
                       exit_code=ExitCode.OK,
                       data={"path": str(passfile), "mode": f"{mode:04o}", "uid": st.st_uid})


def local_checks(config: Config, *, repository: bool = True) -> list[HealthCheck]:
    """Step 6: the repository (when the sink keeps one here) and state_dir writable, and the
    passfile's mode."""
    out = []
    if repository and config.repository is not None:
        out.append(_path_check("repository", "repository writable", Path(config.repository),
                               "repository"))
    else:
        out.append(skipped("repository", "repository writable",
                           f"sink={config.sink} keeps no local repository"))
    out.append(_path_check("state_dir", "state directory writable", Path(config.state_dir),
                           "state_dir"))
    out.append(_passfile_check(config))
    return out
