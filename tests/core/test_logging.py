"""Logging: verbosity, the 0600 log file, the stderr-free mode, secret masking, key messages."""

from __future__ import annotations

import logging
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from ahvbackup.core import log
from ahvbackup.core.config import load_config
from ahvbackup.core.errors import ConfigError
from ahvbackup.core.secret import Secret

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    log.reset_logging()


def raise_(err: Exception) -> None:
    raise err


def emit_every_level(name: str = "ahvbackup.test") -> None:
    lg = logging.getLogger(name)
    lg.error("an error")
    lg.warning("a warning")
    lg.info("some info")
    lg.debug("a debug line")
    log.trace(lg, "a trace line")


@pytest.mark.parametrize(
    ("verbose", "shown"),
    [
        (0, ["an error"]),
        (1, ["an error", "a warning", "some info"]),
        (2, ["an error", "a warning", "some info", "a debug line"]),
        (3, ["an error", "a warning", "some info", "a debug line", "a trace line"]),
        (7, ["an error", "a warning", "some info", "a debug line", "a trace line"]),
    ],
)
def test_verbose_levels_on_stderr(
    capsys: pytest.CaptureFixture[str], verbose: int, shown: list[str]
) -> None:
    log.configure_logging(verbose=verbose, debug_log=None)
    emit_every_level()
    err = capsys.readouterr().err
    every = ["an error", "a warning", "some info", "a debug line", "a trace line"]
    for text in every:
        assert (text in err) == (text in shown), text


def test_stderr_lines_read_like_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure_logging(verbose=1, debug_log=None)
    lg = log.get_logger("job")
    assert lg.name == "ahvbackup.job"
    assert log.get_logger("ahvbackup.x").name == "ahvbackup.x"
    lg.info("3 VMs selected for backup")
    lg.warning("prism_insecure=yes")
    assert capsys.readouterr().err.splitlines() == [
        "ahvbackup: 3 VMs selected for backup",
        "ahvbackup: warning: prism_insecure=yes",
    ]


def test_debug_log_is_created_private_and_gets_every_level(tmp_path: Path) -> None:
    path = tmp_path / "ahvbackup.log"
    log.configure_logging(verbose=3, debug_log=path, stderr=False)
    emit_every_level()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "ERROR ahvbackup.test[" in text
    assert "TRACE ahvbackup.test[" in text
    assert "a trace line" in text


def test_an_existing_loose_log_file_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "ahvbackup.log"
    path.write_text("old line\n")
    path.chmod(0o644)
    log.configure_logging(verbose=1, debug_log=path, stderr=False)
    logging.getLogger("ahvbackup.t").info("new line")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("old line\n")


def test_unopenable_log_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "no-such-dir" / "a.log"
    with pytest.raises(ConfigError, match=rf"^debug_log {bad}: cannot open it \("):
        log.configure_logging(verbose=1, debug_log=bad)


def test_no_stderr_mode_never_writes_to_stderr_or_stdout(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "backend.log"
    log.configure_logging(verbose=3, debug_log=path, stderr=False)
    emit_every_level()
    logging.getLogger("httpx").warning("a library warning")
    logging.getLogger("ahvbackup.t").info("%d items", "not a number")  # bad arguments
    try:
        raise_(RuntimeError("boom"))
    except RuntimeError:
        logging.getLogger("ahvbackup.t").exception("with a traceback")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a python warning", UserWarning, stacklevel=1)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    text = path.read_text()
    for expected in ("a trace line", "a library warning", "not a number", "boom",
                     "a python warning"):
        assert expected in text


def test_no_stderr_and_no_file_is_silent(capfd: pytest.CaptureFixture[str]) -> None:
    log.configure_logging(verbose=3, debug_log=None, stderr=False)
    emit_every_level()
    logging.getLogger("ahvbackup.t").critical("even this")
    assert capfd.readouterr() == ("", "")


def test_reconfiguring_replaces_the_previous_setup(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    log.configure_logging(verbose=1, debug_log=None)
    log.configure_logging(verbose=1, debug_log=tmp_path / "a.log")
    logging.getLogger("ahvbackup.t").info("once")
    assert capsys.readouterr().err.count("once") == 1
    log.reset_logging()
    logging.getLogger("ahvbackup.t").info("after reset")
    assert "after reset" not in (tmp_path / "a.log").read_text()


def test_live_secrets_are_masked_in_messages_args_and_tracebacks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = Secret("Tr0ub4dor&3")
    log.configure_logging(verbose=3, debug_log=None)
    lg = logging.getLogger("ahvbackup.t")
    lg.info("url https://u:%s@pc:9440/", secret.reveal())
    lg.info("direct " + secret.reveal())
    lg.info("encoded Tr0ub4dor%263")
    try:
        raise_(ValueError(f"library said {secret.reveal()}"))
    except ValueError:
        lg.exception("failed")
    err = capsys.readouterr().err
    assert "Tr0ub4dor" not in err
    assert err.count("********") == 4
    del secret


def test_verbose_3_config_loading_never_shows_a_secret(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    inline, in_file, token = "inline-Pa55word", "passfile-Pa55word", "d" * 64
    pf = tmp_path / "p.secrets"
    pf.write_text(f"password = {in_file}\n")
    pf.chmod(0o600)
    conf = tmp_path / "a.conf"
    conf.write_text(f"user = u\ndr_auth_token = {token}\n")
    conf.chmod(0o600)
    logfile = tmp_path / "debug.log"
    log.configure_logging(verbose=3, debug_log=logfile)

    with_passfile = load_config(files=[conf], plugin_string=f"passfile={pf}")
    with_inline = load_config(files=[conf], plugin_string=f"password='{inline}'")
    lg = logging.getLogger("ahvbackup.job")
    for cfg in (with_passfile, with_inline):
        lg.info("config: %r", cfg)
        for warning in cfg.warnings:
            lg.warning("%s", warning)
    errors = []
    for bad in (f"password={inline} passfile={pf}", "password=", f"password={inline} zz=1"):
        with pytest.raises(ConfigError) as exc:
            load_config(files=[conf], plugin_string=bad)
        errors.append(str(exc.value))
        lg.error("%s", exc.value)
    conf.chmod(0o644)
    with pytest.raises(ConfigError) as exc:
        load_config(files=[conf])
    errors.append(str(exc.value))

    outputs = {
        "stderr": capsys.readouterr().err,
        "log file": logfile.read_text(),
        "errors": "\n".join(errors),
        "repr": repr(with_passfile) + repr(with_inline) + str(with_inline.redacted()),
    }
    # the trace lines of the loader were really produced
    assert "config password = '********' (" in outputs["log file"]
    assert "password is set inline (plugin string)" in outputs["stderr"]
    for where, text in outputs.items():
        for secret in (inline, in_file, token):
            assert secret not in text, f"a secret reached the {where}"


# key messages --------------------------------------------------------------------------

def test_key_messages() -> None:
    assert log.backend_up("0.1.0", mode="backup", level="incremental", vm=["prod-*", "db"]) == (
        "ahvbackup 0.1.0 started: mode=backup level=incremental vm=prod-*,db"
    )
    assert log.prism_discovery("pc.example.com:9440", "prod-01", "v4") == (
        "Prism reached: central=pc.example.com:9440 cluster=prod-01 api=v4"
    )
    assert log.selected_vms(1) == "1 VM selected for backup"
    assert log.selected_vms(2, ["a", "b"]) == "2 VMs selected for backup: a, b"
    many = log.selected_vms(25, [f"vm{i}" for i in range(25)])
    assert many.endswith("vm19 and 5 more")
    assert log.backup_complete("my vm", 2, 4096, 1024) == (
        'VM backed up: vm="my vm" disks=2 bytes=1024 bytes_read=4096'
    )
    assert log.dr_cycle_complete("db", 7, 123, reconnects=1, lag=4.25) == (
        "DR cycle complete: vm=db point=7 bytes_pushed=123 reconnects=1 lag_seconds=4.2")


def test_key_messages_are_documented() -> None:
    doc = (REPO / "docs" / "logging.md").read_text(encoding="utf-8")
    for template in (log.BACKEND_UP, log.PRISM_DISCOVERY, log.SELECTED_VMS, log.BACKUP_COMPLETE,
                     log.DR_CYCLE_COMPLETE):
        assert template.split("{")[0].strip() in doc
        assert template in doc, f"docs/logging.md does not show {template!r}"
