"""Configuration: every whitepaper key with its default, sources, precedence, errors, secrets."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
from marshmallow import fields as mm_fields

from ahvbackup.core.config import (
    KEYS,
    MODES,
    Config,
    HostPort,
    SecretField,
    check_file_mode,
    load_config,
)
from ahvbackup.core.config import fields as cf
from ahvbackup.core.errors import ConfigError, ExitCode, PluginError
from ahvbackup.core.secret import Secret

REPO = Path(__file__).resolve().parents[2]


def whitepaper() -> str:
    path = Path(os.environ.get("AHVBACKUP_WHITEPAPER",
                               REPO.parent / "shared" / "reference" / "whitepaper.txt"))
    if not path.is_file():
        pytest.fail(f"reference whitepaper not found at {path} (set AHVBACKUP_WHITEPAPER)")
    return path.read_text(encoding="utf-8")


_DEFAULT_TOKEN = re.compile(r"^(\d+|yes|no|\*|/\S+|<\S+|auto|try|backup|source|probed)$")


def whitepaper_keys() -> list[tuple[str, str, str]]:
    """(key, type, default) rows of the whitepaper's tables 7.1 to 7.6."""
    text = whitepaper()
    section = text[text.index("7.1 Connection parameters") : text.index("7.7 Mode values")]
    rows = []
    for line in section.splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[0] == "Key" or re.match(r"7\.\d", line):
            continue
        default = parts[2] if _DEFAULT_TOKEN.match(parts[2]) else ""
        rows.append((parts[0], parts[1], default))
    return rows


def whitepaper_modes() -> list[str]:
    text = whitepaper()
    start = text.index("7.7 Mode values")
    section = text[start : text.index("\n8. FileSet examples", start)]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Value Phase Use"))
    return [line.split()[0] for line in lines[start + 1 :] if line.strip()]


def expected_default(wp_type: str, wp_default: str) -> object:
    """The whitepaper's default as our typed value ('source', 'probed': decided at run time)."""
    if wp_default in {"", "source", "probed", "<orig>-restored"}:
        return () if wp_type.startswith("csv") else None
    if wp_default.isdigit():
        return int(wp_default)
    if wp_default in {"yes", "no"}:
        return wp_default == "yes"
    if wp_default == "*":
        return ("*",)
    if wp_default.startswith("/"):
        # same places, our product name
        return Path(wp_default.replace("podheitor-nutanix-backend", "ahvbackup")
                    .replace("nutanix-repl", "ahvbackup-state"))
    return wp_default


_FIELD_FOR_TYPE: dict[str, type | tuple[type, ...]] = {
    "host[:port]": cf.HostPortField,
    "host": cf.HostPortField,
    "int": cf.Int,
    "bool": cf.Bool,
    "path": cf.PathField,
    "string": (cf.Text, cf.SecretField),
    "csv/glob": cf.Csv,
    "csv": (cf.Csv, cf.NetworkMap),
    "IPv4": cf.IPv4,
    "enum": cf.Choice,
    "0\u20133": cf.Int,  # the whitepaper writes an en dash
}


def test_every_whitepaper_key_exists_with_its_default() -> None:
    rows = whitepaper_keys()
    assert len(rows) >= 40, "the whitepaper table did not parse"
    defaults = load_config()
    by_name = {k.name: k for k in KEYS}
    for wp_key, wp_type, wp_default in rows:
        name = wp_key.removeprefix("--").replace("-", "_")
        assert name in by_name, f"whitepaper key {wp_key} is missing"
        got = getattr(defaults, name)
        assert got == expected_default(wp_type, wp_default), (
            f"{name}: default {got!r}, whitepaper says {wp_default!r}"
        )
        assert defaults.sources[name] == "default"
        field = by_name[name].field
        if "|" in wp_type and name != "data_path":
            assert isinstance(field, cf.Choice)
            assert set(field.choices) == set(wp_type.split("|")), name
        elif name != "data_path":
            assert isinstance(field, _FIELD_FOR_TYPE[wp_type]), f"{name}: {type(field)}"


def test_data_path_accepts_the_whitepaper_values() -> None:
    # an open driver name (third-party data paths), so check the documented three load
    for value in ("auto", "iscsi", "rest"):
        assert load_config(plugin_string=f"data_path={value}").data_path == value


def test_modes_are_the_whitepapers() -> None:
    assert list(MODES) == whitepaper_modes()
    for mode in MODES:
        assert load_config(overrides={"mode": mode}).mode == mode


def test_config_attributes_are_exactly_the_keys() -> None:
    assert set(Config.key_names()) == {k.name for k in KEYS}
    assert len(KEYS) == len({k.name for k in KEYS})


def test_our_defaults() -> None:
    c = load_config()
    assert (c.hypervisor, c.sink, c.target, c.level) == ("ahv", "directory", "raw", "full")
    assert c.repository == Path("/opt/bacula/working/repository")
    assert (c.verify_unchanged_sample, c.keep_fulls, c.keep_days) == (0, 0, 0)
    assert c.prism_ca_cert is None
    assert c.warnings == ()
    assert load_config(overrides={"working_dir": "/scratch"}).repository == Path(
        "/scratch/repository")


def test_config_is_frozen() -> None:
    c = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.vm = ("x",)  # type: ignore[misc]


# files -------------------------------------------------------------------------------------

def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def test_file_values_comments_quotes_and_types(tmp_path: Path) -> None:
    conf = write(tmp_path / "ahvbackup.conf", """
# Prism
prism_central     = pc.example.com
user              = backup-svc
   # indented comment
vm = prod-*, db-01 ,
exclude = prod-test-*
network_map = 10.10.0.0/24=10.20.0.0/24, lab=prod
application_consistent = yes
power_on = On
cross_restore = 0
restore_vm_name = "  spaced name  "
cluster = 'c#1'
state_dir = state
--memory-mib = 8192
chunk_size_mib = 4
verify_unchanged_sample = 2.5
""")
    c = load_config(files=[conf])
    assert c.prism_central == HostPort("pc.example.com", 9440)
    assert c.user == "backup-svc"
    assert c.vm == ("prod-*", "db-01")
    assert c.exclude == ("prod-test-*",)
    assert c.network_map == (("10.10.0.0/24", "10.20.0.0/24"), ("lab", "prod"))
    assert c.network_map_dict == {"10.10.0.0/24": "10.20.0.0/24", "lab": "prod"}
    assert c.application_consistent == "true"
    assert (c.power_on, c.cross_restore) == (True, False)
    assert c.restore_vm_name == "  spaced name  "
    assert c.cluster == "c#1"
    assert c.state_dir == tmp_path / "state"  # relative to the file's folder
    assert c.memory_mib == 8192
    assert c.chunk_size_mib == 4
    assert c.verify_unchanged_sample == 2.5
    assert c.sources["user"] == f"{conf}:4"
    assert c.sources["memory_mib"] == f"{conf}:15"


@pytest.mark.parametrize("spelling", ["yes", "YES", "true", "1", "on", "On"])
def test_true_spellings(spelling: str) -> None:
    assert load_config(plugin_string=f"power_on={spelling}").power_on is True


@pytest.mark.parametrize("spelling", ["no", "false", "0", "off", "OFF"])
def test_false_spellings(spelling: str) -> None:
    assert load_config(plugin_string=f"cross_restore={spelling}").cross_restore is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("pc.example.com", HostPort("pc.example.com", 9440)),
        ("pc.example.com:9441", HostPort("pc.example.com", 9441)),
        ("10.0.0.5", HostPort("10.0.0.5", 9440)),
        ("[fd00::5]:9440", HostPort("fd00::5", 9440)),
        ("fd00::5", HostPort("fd00::5", 9440)),
    ],
)
def test_prism_central_host_port(value: str, expected: HostPort) -> None:
    c = load_config(overrides={"prism_central": value})
    assert c.prism_central == expected
    assert c.prism_port == expected.port


def test_port_in_prism_central_and_prism_port_must_agree() -> None:
    assert load_config(plugin_string="prism_central=pc:9441 prism_port=9441").prism_port == 9441
    with pytest.raises(ConfigError) as exc:
        load_config(plugin_string="prism_central=pc:9441 prism_port=9440")
    assert "prism_port: 9440 disagrees with the port in prism_central (pc:9441" in str(exc.value)


def test_empty_optional_values_unset_keys() -> None:
    c = load_config(plugin_string="exclude= debug_log= user=")
    assert (c.exclude, c.debug_log, c.user) == ((), None, None)


# precedence ------------------------------------------------------------------------------

def test_precedence_defaults_files_plugin_string_command_line(tmp_path: Path) -> None:
    site = write(tmp_path / "site.conf",
                 "concurrent_vms = 3\nconcurrent_disks = 5\nuser = site\nvm = a\n")
    local = write(tmp_path / "local.conf", "concurrent_disks = 6\nuser = local\n")
    c = load_config(
        files=[site, local],
        plugin_string="ahvbackup: user=fileset vm=b",
        overrides={"vm": "c"},
    )
    assert c.prism_rate_rpm == 30
    assert c.sources["prism_rate_rpm"] == "default"
    assert c.concurrent_vms == 3
    assert c.sources["concurrent_vms"] == f"{site}:1"
    assert c.concurrent_disks == 6
    assert c.sources["concurrent_disks"] == f"{local}:1"
    assert c.user == "fileset"
    assert c.sources["user"] == "plugin string"
    assert c.vm == ("c",)
    assert c.sources["vm"] == "command line"


def test_overrides_accept_python_values() -> None:
    c = load_config(overrides={"verbose": 3, "power_on": True, "--vcpu": 2})
    assert (c.verbose, c.power_on, c.vcpu) == (3, True, 2)


# errors ----------------------------------------------------------------------------------

def one_error(**kwargs: object) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(**kwargs)  # type: ignore[arg-type]
    assert exc.value.exit_code == ExitCode.CONFIG
    return str(exc.value)


def test_unknown_key_in_a_file_names_file_line_and_suggests(tmp_path: Path) -> None:
    conf = write(tmp_path / "ahvbackup.conf", "\n" * 11 + "concurent_vms = 3\n")
    assert one_error(files=[conf]) == (
        f"{conf}:12: concurent_vms: unknown key (did you mean 'concurrent_vms'?)"
    )


def test_unknown_key_without_a_close_match() -> None:
    assert one_error(plugin_string="ahvbackup: frobnicate=1") == (
        "plugin string: frobnicate: unknown key"
    )


def test_option_spellings_and_suggestions() -> None:
    assert load_config(plugin_string="--vcpu=4 --memory-mib=8192").vcpu == 4
    assert load_config(plugin_string="--concurrent-vms=3").concurrent_vms == 3
    msg = one_error(plugin_string="--vcpus=4")
    assert msg == "plugin string: --vcpus: unknown key (did you mean 'vcpu'?)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("chunk_size_mib=0", "plugin string: chunk_size_mib: must be a positive whole number "
                             "(got '0')"),
        ("chunk_size_mib=-4", "plugin string: chunk_size_mib: must be a positive whole number "
                              "(got '-4')"),
        ("concurrent_vms=two", "plugin string: concurrent_vms: must be a positive whole number "
                               "(got 'two')"),
        ("verbose=4", "plugin string: verbose: must be a whole number from 0 to 3 (got '4')"),
        ("prism_port=0", "plugin string: prism_port: must be a whole number from 1 to 65535 "
                         "(got '0')"),
        ("power_on=maybe", "plugin string: power_on: must be yes or no (or true/false, "
                           "on/off, 1/0) (got 'maybe')"),
        ("prism_api_version=v5", "plugin string: prism_api_version: must be one of auto, v3, "
                                 "v4 (got 'v5')"),
        ("prism_api_version=auot", "plugin string: prism_api_version: must be one of auto, "
                                   "v3, v4 (got 'auot'; did you mean 'auto'?)"),
        ("level=incremetal", "plugin string: level: must be one of full, incremental, "
                             "differential (got 'incremetal'; did you mean 'incremental'?)"),
        ("prism_central=https://pc:9440", "plugin string: prism_central: must be host or "
                                          "host:port, without a scheme or path "
                                          "(got 'https://pc:9440')"),
        ("prism_central=pc:99999", "plugin string: prism_central: port must be a whole number "
                                   "from 1 to 65535 (got 'pc:99999')"),
        ("dsip=10.0.0.256", "plugin string: dsip: must be an IPv4 address such as 10.0.0.50 "
                            "(got '10.0.0.256')"),
        ("network_map=a=b,c", "plugin string: network_map: each item must be "
                              "source=destination (got 'c')"),
        ("network_map=a=b,a=c", "plugin string: network_map: maps source 'a' twice "
                                "(got 'a=b,a=c')"),
        ("vm=", "plugin string: vm: must not be empty"),
        ("verify_unchanged_sample=101", "plugin string: verify_unchanged_sample: must be a "
                                        "number from 0 to 100 (got '101')"),
        ("keep_days=-1", "plugin string: keep_days: must be a whole number, 0 or more "
                         "(got '-1')"),
        ("sink=no/such", "plugin string: sink: must be a driver name (letters, digits, '-', "
                         "'_', '.') (got 'no/such')"),
        ("dr_host=dr:9848", "plugin string: dr_host: must be a host name or IP address "
                            "without a port (got 'dr:9848')"),
    ],
)
def test_bad_values_read_key_problem_got(text: str, expected: str) -> None:
    assert one_error(plugin_string="ahvbackup: " + text) == expected


def test_several_problems_are_sorted_one_per_line(tmp_path: Path) -> None:
    conf = write(tmp_path / "a.conf", "verbose = 9\nconcurent_vms = 3\n")
    msg = one_error(files=[conf], plugin_string="ahvbackup: power_on=maybe zz=1",
                    overrides={"mode": "bakup"})
    lines = msg.splitlines()
    assert lines == [
        f"{conf}:1: verbose: must be a whole number from 0 to 3 (got '9')",
        f"{conf}:2: concurent_vms: unknown key (did you mean 'concurrent_vms'?)",
        "plugin string: power_on: must be yes or no (or true/false, on/off, 1/0) "
        "(got 'maybe')",
        "plugin string: zz: unknown key",
        "command line: mode: must be one of backup, restore, estimate, receiver, seed, "
        "bitmap-push, failover-test, failover-planned, failover-unplanned, failover-undo, "
        "failover-perm (got 'bakup'; did you mean 'backup'?)",
    ]


def test_a_bad_value_is_reported_even_when_a_later_source_overrides_it(tmp_path: Path) -> None:
    conf = write(tmp_path / "a.conf", "concurrent_vms = 0\n")
    msg = one_error(files=[conf], plugin_string="concurrent_vms=2")
    assert msg.startswith(f"{conf}:1: concurrent_vms: must be a positive whole number")


def test_duplicate_keys_in_one_source(tmp_path: Path) -> None:
    conf = write(tmp_path / "a.conf", "vm = a\nuser = u\nvm = b\n")
    assert one_error(files=[conf]) == f"{conf}:3: vm: set more than once (first set on line 1)"
    assert one_error(plugin_string="ahvbackup: vm=a vm=b") == (
        "plugin string: vm: set more than once"
    )
    assert one_error(plugin_string="vcpu=2 --vcpu=4") == "plugin string: --vcpu: set more than once"


def test_the_same_key_in_different_sources_is_precedence_not_duplication(tmp_path: Path) -> None:
    conf = write(tmp_path / "a.conf", "vm = a\n")
    assert load_config(files=[conf], plugin_string="vm=b").vm == ("b",)


def test_malformed_file_lines(tmp_path: Path) -> None:
    conf = write(tmp_path / "a.conf", "vm = a\nhunter2-is-my-password\n")
    msg = one_error(files=[conf])
    assert msg == f"{conf}:2: not a 'key = value' line"
    conf = write(tmp_path / "b.conf", 'restore_vm_name = "oops\n')
    assert one_error(files=[conf]) == f"{conf}:1: restore_vm_name: quote opened but never closed"


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.conf"
    assert one_error(files=[missing]) == f"config file {missing}: not found"


def test_missing_required_keys_name_key_and_sources(tmp_path: Path) -> None:
    conf = write(tmp_path / "a.conf", "user = u\n")
    msg = one_error(files=[conf], plugin_string="vm=x", require=["prism_central", "user"])
    assert msg == f"{conf}, plugin string: prism_central: required but not set"
    assert one_error(require=["password"]) == (
        "configuration: password: required (or passfile) but not set"
    )


def test_require_rejects_names_that_are_not_keys() -> None:
    with pytest.raises(ValueError, match="prism_centrl"):
        load_config(require=["prism_centrl"])


# passfile, file modes, secrets ---------------------------------------------------------------

SECRET = "Pa55-w0rd#with=specials"


def test_passfile_supplies_the_password(tmp_path: Path) -> None:
    pf = write(tmp_path / "nutanix.secrets", f"# Prism\npassword = {SECRET}\n")
    c = load_config(plugin_string=f"ahvbackup: prism_central=pc passfile={pf}",
                    require=["prism_central", "password"])
    assert isinstance(c.password, Secret)
    assert c.password.reveal() == SECRET
    assert c.sources["password"] == f"{pf}:2"
    assert c.warnings == ()


def test_passfile_relative_to_the_config_file(tmp_path: Path) -> None:
    write(tmp_path / "p.secrets", f"password = {SECRET}\n")
    conf = write(tmp_path / "a.conf", "passfile = p.secrets\n", 0o644)
    c = load_config(files=[conf])
    assert c.password is not None
    assert c.password.reveal() == SECRET


@pytest.mark.parametrize(
    ("mode", "how"),
    [
        (0o644, "mode 0644 is readable by others"),
        (0o604, "mode 0604 is readable by others"),
        (0o640, "mode 0640 is readable by its group"),
        (0o620, "mode 0620 is writable by others"),
        (0o610, "mode 0610 is open to others"),
    ],
)
def test_passfile_open_to_others_is_refused(tmp_path: Path, mode: int, how: str) -> None:
    pf = write(tmp_path / "p.secrets", f"password = {SECRET}\n", mode)
    msg = one_error(plugin_string=f"passfile={pf}")
    assert msg.startswith(f"passfile {pf}: {how}")
    assert msg.endswith(f"; expected 0600 (chmod 600 {pf})")
    assert SECRET not in msg


def test_passfile_content_problems_never_quote_the_password(tmp_path: Path) -> None:
    for body, expected in [
        (f"{SECRET}\n", ":1: not a 'key = value' line"),
        (f"pasword = {SECRET}\n", ":1: pasword: unknown key in a passfile (did you mean "
                                  "'password'?)"),
        (f"password = {SECRET}\npassword = x\n", ":2: password: set more than once"),
        ("# nothing\n", ": no 'password = ...' line"),
    ]:
        pf = write(tmp_path / "p.secrets", body)
        msg = one_error(plugin_string=f"passfile={pf}")
        assert expected in msg
        assert SECRET not in msg


def test_config_file_holding_a_secret_must_be_private(tmp_path: Path) -> None:
    conf = write(tmp_path / "a.conf", f"user = u\npassword = {SECRET}\n", 0o644)
    msg = one_error(files=[conf])
    assert msg.startswith(f"config file with secrets {conf}: mode 0644 is readable by others")
    assert SECRET not in msg
    conf = write(tmp_path / "b.conf", f"dr_auth_token = {SECRET}\n", 0o640)
    assert "mode 0640 is readable by its group" in one_error(files=[conf])
    # no secret in it: any mode is fine
    conf = write(tmp_path / "c.conf", "user = u\n", 0o644)
    assert load_config(files=[conf]).user == "u"


def test_check_file_mode_is_reusable(tmp_path: Path) -> None:
    key = write(tmp_path / "client.key", "x", 0o600)
    check_file_mode(key, what="DR client key")
    key.chmod(0o644)
    with pytest.raises(ConfigError, match=r"^DR client key .*: mode 0644 is readable by others"):
        check_file_mode(key, what="DR client key")
    with pytest.raises(ConfigError, match="not a regular file"):
        check_file_mode(tmp_path, what="passfile")


def test_inline_password_works_and_warns(tmp_path: Path) -> None:
    c = load_config(plugin_string=f"ahvbackup: password='{SECRET}'")
    assert c.password is not None
    assert c.password.reveal() == SECRET
    assert len(c.warnings) == 1
    assert c.warnings[0].startswith("password is set inline (plugin string); put it in a passfile")
    conf = write(tmp_path / "a.conf", f"password = {SECRET}\n")
    assert f"inline ({conf}:1)" in load_config(files=[conf]).warnings[0]


def test_prism_insecure_warns() -> None:
    c = load_config(plugin_string="prism_insecure=yes")
    assert c.warnings == (
        "prism_insecure=yes (plugin string): Prism's TLS certificate is not verified; "
        "use this only in a lab",
    )


def test_dr_token_warnings() -> None:
    strong = "a" * 64
    assert load_config(overrides={"dr_auth_token": strong}).warnings == ()
    c = load_config(plugin_string="dr_auth_token=short")
    assert any("plugin string, which Bacula keeps" in w for w in c.warnings)
    assert any("shorter than 32 characters" in w for w in c.warnings)
    assert all("short " not in w for w in c.warnings)


def test_password_and_passfile_together_is_an_error(tmp_path: Path) -> None:
    pf = write(tmp_path / "p.secrets", f"password = {SECRET}\n")
    msg = one_error(plugin_string=f"password=other passfile={pf}")
    assert msg == ("plugin string: password: set inline while passfile is set "
                   "(plugin string); keep one")


def test_secret_values_are_never_echoed_in_errors() -> None:
    msg = one_error(plugin_string="password=",
                    overrides={"dr_auth_token": "line1\nline2-secret"})
    assert msg.splitlines() == [
        "plugin string: password: must not be empty (value hidden)",
        "command line: dr_auth_token: must be one line (value hidden)",
    ]


def test_secrets_are_masked_in_repr_and_redacted(tmp_path: Path) -> None:
    token = "f" * 64
    pf = write(tmp_path / "p.secrets", f"password = {SECRET}\n")
    c = load_config(plugin_string=f"passfile={pf} dr_auth_token={token}")
    for text in (repr(c), str(c), str(c.redacted())):
        assert SECRET not in text
        assert token not in text
    assert c.redacted()["password"] == "********"
    assert c.redacted()["dr_auth_token"] == "********"
    assert c.redacted()["passfile"] == str(pf)


# keys from plugins -------------------------------------------------------------------------

def test_extra_fields_load_into_extra() -> None:
    extra = {
        "chap_user": cf.Text(empty=None),
        "chap_secret": SecretField(),
        "retries": mm_fields.Integer(load_default=3),
    }
    c = load_config(plugin_string="chap_user=u chap_secret=sekrit-chap", extra_fields=extra)
    assert c.extra["chap_user"] == "u"
    assert isinstance(c.extra["chap_secret"], Secret)
    assert c.extra["retries"] == 3
    assert c.sources["retries"] == "default"
    assert "sekrit-chap" not in repr(c)
    assert c.redacted()["chap_secret"] == "********"
    msg = one_error(plugin_string="retries=many chap_secret=", extra_fields=extra)
    assert msg.splitlines() == [
        "plugin string: retries: not a valid integer",
        "plugin string: chap_secret: must not be empty (value hidden)",
    ]
    assert one_error(plugin_string="chap_usr=x", extra_fields=extra) == (
        "plugin string: chap_usr: unknown key (did you mean 'chap_user'?)"
    )


def test_required_extra_field() -> None:
    extra = {"bucket": mm_fields.String(required=True)}
    assert one_error(extra_fields=extra) == "configuration: bucket: required but not set"


def test_extra_field_may_not_shadow_a_core_key() -> None:
    with pytest.raises(PluginError, match=r"^vm: a plugin declares a configuration key"):
        load_config(extra_fields={"vm": mm_fields.String()})
