"""`ahvbackup health-check`: is this host ready to run backup jobs?

The hypervisor driver's checks (`Hypervisor.health_checks`; for AHV: TLS, authentication,
clusters, RBAC, DSIP and iSCSI), then the local ones (`ahvbackup.core.health.local_checks`:
repository and state directory writable, the passfile's mode), each timed, each failure with a
fix hint. Exit 0 when ready, else the code of the first failure (2 configuration, 3 something
unreachable or refusing us). ``ahvbackup-bacula-backend --standalone health-check`` runs the
same through `standalone_main`. Output and the ``--json`` shape: docs/cli.md.
"""

from __future__ import annotations

__all__ = ["health_check", "run_health_check", "standalone_main"]

import functools
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from ..drivers import Hypervisor
from ..errors import AhvBackupError, ConfigError, ExitCode, Interrupted
from ..health import FAIL, HealthCheck, exit_code, local_checks
from ..plugins import Hooks, load_driver
from ..repository import DirectorySink
from .context import Context
from .options import config_options, load_job_config, run_trio

#: what the report calls the local checks (step 6 of the AHV sequence)
LOCAL_STEPS = ("repository", "state_dir", "passfile")


def _config_failure(err: ConfigError) -> HealthCheck:
    text = str(err)
    hint = "fix each line above; every job would refuse this configuration the same way"
    if "chmod 600" in text:
        hint = ("a file holding a secret is open to other users: chmod 600 it (and chown it "
                "to the user that runs the jobs); " + hint)
    return HealthCheck("config", "configuration", FAIL, detail=text, hint=hint,
                       exit_code=ExitCode.CONFIG)


def run_health_check(
    *, configs: Iterable[Path], sets: Iterable[str], plugin_string: str | None, hooks: Hooks,
    verbose: int | None = None, timeout: float = 10.0,
    overrides: Mapping[str, object] | None = None,
) -> dict[str, Any]:
    """Every check, in order, as the report `--json` prints (see docs/cli.md)."""
    started = time.perf_counter()
    about: dict[str, Any] = {}
    try:
        cfg = load_job_config(
            configs=configs, sets=sets, plugin_string=plugin_string, hooks=hooks,
            verbose=verbose, require=("prism_central", "user", "password"),
            overrides=dict(overrides or {}),
        )
    except ConfigError as err:
        checks = [_config_failure(err)]
    else:
        about = {"hypervisor": cfg.hypervisor, "prism_central": str(cfg.prism_central),
                 "user": cfg.user, "cluster": cfg.cluster, "data_path": cfg.data_path,
                 "sink": cfg.sink}
        try:
            driver = load_driver("hypervisor", cfg.hypervisor, base=Hypervisor)(cfg)
            checks = run_trio(functools.partial(driver.health_checks, timeout=timeout))
        except Interrupted:
            raise
        except AhvBackupError as err:
            checks = [HealthCheck("hypervisor", f"{cfg.hypervisor} checks", FAIL,
                                  detail=str(err), hint="see the error above",
                                  exit_code=err.exit_code)]
        checks = [*checks, *local_checks(cfg, repository=cfg.sink == DirectorySink.name)]
    code = exit_code(checks)
    numbered: list[dict[str, Any]] = []
    number = 0
    for check in checks:
        if check.step == "config":
            numbered.append({"number": 0, **check.to_json()})
            continue
        if check.step not in LOCAL_STEPS or not numbered or \
                numbered[-1]["step"] not in LOCAL_STEPS:
            number += 1
        numbered.append({"number": number, **check.to_json()})
    return {
        "ready": code == ExitCode.OK,
        "exit_code": int(code),
        "seconds": round(time.perf_counter() - started, 3),
        **about,
        "checks": numbered,
    }


def render_text(report: Mapping[str, Any]) -> str:
    lines = []
    if report.get("prism_central"):
        lines.append(f"health-check of {report['hypervisor']} at {report['prism_central']} "
                     f"as {report['user']}")
    pad = " " * 30  # under the detail column
    for c in report["checks"]:
        status = c["status"].upper() if c["status"] != "ok" else "ok"
        detail = (c["detail"] or "").splitlines() or [""]
        lines.append(f"{c['number']:>2} {c['step']:<11} {status:<5} {c['seconds']:6.3f}s  "
                     f"{detail[0]}")
        lines += [f"{pad}{more}" for more in detail[1:]]
        if c["hint"] and c["status"] in ("fail", "warn"):
            lines.append(f"{pad}fix: {c['hint']}")
    failed = [c["step"] for c in report["checks"] if c["status"] == "fail"]
    warned = [c["step"] for c in report["checks"] if c["status"] == "warn"]
    tail = f" ({len(warned)} warning(s): {', '.join(warned)})" if warned else ""
    if report["ready"]:
        lines.append(f"ready{tail}: every check passed in {report['seconds']:.2f} s")
    else:
        lines.append(f"NOT READY: {len(failed)} check(s) failed ({', '.join(failed)}){tail}; "
                     f"exit {report['exit_code']} after {report['seconds']:.2f} s")
    return "\n".join(lines)


def _timeout_option(f: Any) -> Any:
    return click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0,
                        show_default=True, metavar="SECONDS",
                        help="Give up on a network step after this long.")(f)


def _emit_and_exit(report: Mapping[str, Any], as_json: bool) -> None:
    import json

    click.echo(json.dumps(report, indent=2, sort_keys=True, default=str) if as_json
               else render_text(report))
    click.get_current_context().exit(int(report["exit_code"]))


@click.command("health-check")
@config_options
@_timeout_option
@click.option("--json", "local_json", is_flag=True, help="Machine-readable JSON output.")
@click.pass_context
def health_check(click_ctx: click.Context, configs: tuple[Path, ...], sets: tuple[str, ...],
                 plugin_string: str | None, timeout: float, local_json: bool) -> None:
    """Check this host is ready to run jobs: Prism TLS, login, clusters, RBAC, DSIP and iSCSI,
    repository and state directory, passfile (exit 0 ready, 2 configuration, 3 unreachable)."""
    ctx = click_ctx.find_object(Context) or Context()
    report = run_health_check(configs=configs, sets=sets, plugin_string=plugin_string,
                              hooks=ctx.hooks, verbose=ctx.verbose, timeout=timeout)
    _emit_and_exit(report, ctx.json or local_json)


def standalone_main(argv: Sequence[str], *, prog: str, default_configs: Sequence[Path] = (),
                    ) -> int:
    """``<prog> health-check [--config FILE]... [-o KEY=VALUE]... [--json] [-v]``: the same
    check for a program other than `ahvbackup` (the Bacula backend's ``--standalone``);
    without ``--config``, `default_configs` are read. Returns the exit status."""

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    def group() -> None:
        """Standalone commands."""

    @group.command("health-check")
    @config_options
    @_timeout_option
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
    @click.option("-v", "--verbose", count=True, help="More detail on stderr (up to 3).")
    def standalone(configs: tuple[Path, ...], sets: tuple[str, ...],
                   plugin_string: str | None, timeout: float, as_json: bool,
                   verbose: int) -> None:
        """Check this host is ready to run jobs (see `ahvbackup health-check --help`)."""
        report = run_health_check(configs=configs or tuple(default_configs), sets=sets,
                                  plugin_string=plugin_string, hooks=Hooks(),
                                  verbose=verbose or None, timeout=timeout)
        _emit_and_exit(report, as_json)

    try:
        rv = group.main(args=list(argv), prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as done:
        return int(done.exit_code)
    except click.ClickException as err:
        err.show()
        return int(ExitCode.CONFIG)
    except click.exceptions.Abort:
        return int(ExitCode.INTERRUPTED)
    except AhvBackupError as err:  # interrupted (SIGINT, SIGTERM)
        click.echo(f"{prog}: error: {err}", err=True)
        return int(err.exit_code)
    return rv if isinstance(rv, int) else 0
