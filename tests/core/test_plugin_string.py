"""Plugin strings as a FileSet's Plugin = "..." line hands them over: names, quoting, lines."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ahvbackup.core.config import PluginStringError, parse_plugin_string
from ahvbackup.core.errors import ConfigError, ExitCode


def pairs(text: str) -> list[tuple[str, str]]:
    return [(i.key, i.value) for i in parse_plugin_string(text).items]


def test_name_and_items_in_order() -> None:
    ps = parse_plugin_string("ahvbackup: prism_central=pc.example.com vm=prod-* exclude=x")
    assert ps.name == "ahvbackup"
    assert ps.keys() == ["prism_central", "vm", "exclude"]
    assert pairs(ps.text)[1] == ("vm", "prod-*")


def test_any_plugin_name_is_kept_and_none_is_fine() -> None:
    assert parse_plugin_string("podheitor-nutanix: vm=a").name == "podheitor-nutanix"
    assert parse_plugin_string("vm=a user=b").name == ""
    # a ':' inside a value is not a plugin name
    assert parse_plugin_string("prism_central=pc:9440").name == ""
    assert pairs("prism_central=pc:9440") == [("prism_central", "pc:9440")]


def test_whitepaper_multiline_fileset_string() -> None:
    text = """podheitor-nutanix: prism_central=pc.prod.example.com
             passfile=/opt/bacula/etc/nutanix.secrets
             vm=prod-* exclude=prod-test-*
             application_consistent=true
             concurrent_vms=4 concurrent_disks=8
             cluster=prod-cluster-01"""
    assert dict(pairs(text)) == {
        "prism_central": "pc.prod.example.com",
        "passfile": "/opt/bacula/etc/nutanix.secrets",
        "vm": "prod-*",
        "exclude": "prod-test-*",
        "application_consistent": "true",
        "concurrent_vms": "4",
        "concurrent_disks": "8",
        "cluster": "prod-cluster-01",
    }


def test_backslash_newline_continues_and_crlf_too() -> None:
    assert pairs("ahvbackup: vm=a \\\n  user=b \\\r\n mode=restore") == [
        ("vm", "a"), ("user", "b"), ("mode", "restore")
    ]
    # inside a value it joins, as in a shell
    assert pairs("vm=pro\\\nd-*") == [("vm", "prod-*")]


def test_quoting() -> None:
    assert pairs('restore_vm_name="my restored vm" cluster=\'c 1\'') == [
        ("restore_vm_name", "my restored vm"), ("cluster", "c 1")
    ]
    assert pairs(r'password="a\"b\\c\d"') == [("password", 'a"b\\c\\d')]
    assert pairs("password='a\\\"b'") == [("password", 'a\\"b')]
    assert pairs('vm=a"b c"d') == [("vm", "ab cd")]
    assert pairs('user= vm=""') == [("user", ""), ("vm", "")]
    assert pairs('where="/tmp/a\\\nb"') == [("where", "/tmp/ab")]
    # an unquoted backslash elsewhere is kept (Windows-ish values, regex-like globs)
    assert pairs(r"vm=a\b") == [("vm", r"a\b")]


def test_option_style_keys_are_kept_as_written() -> None:
    assert pairs("ahvbackup: mode=restore --vcpu=4 --memory-mib=8192") == [
        ("mode", "restore"), ("--vcpu", "4"), ("--memory-mib", "8192")
    ]


def test_positions_point_at_keys() -> None:
    ps = parse_plugin_string("ahvbackup: vm=a\n  user=b")
    assert [ps.where(i.position) for i in ps.items] == ["line 1, column 12", "line 2, column 3"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('ahvbackup: vm=a user="bob', 'plugin string: column 22: double quote opened'),
        ("ahvbackup: vm=a\n cluster='x", "plugin string: line 2, column 10: single quote opened"),
        ("ahvbackup: vm=a hunter2", "plugin string: column 17: expected key=value"),
        ("ahvbackup: =a", "plugin string: column 12: expected key=value"),
        ('ahvbackup: "vm"=a', "plugin string: column 12: expected key=value"),
    ],
)
def test_bad_strings_name_the_position(text: str, expected: str) -> None:
    with pytest.raises(PluginStringError) as exc:
        parse_plugin_string(text)
    assert str(exc.value).startswith(expected)
    assert isinstance(exc.value, ConfigError)
    assert exc.value.exit_code == ExitCode.CONFIG
    assert "\n" not in str(exc.value)


def test_errors_and_repr_never_quote_values() -> None:
    with pytest.raises(PluginStringError) as exc:
        parse_plugin_string("ahvbackup: password=s3cret-value oops")
    assert "s3cret" not in str(exc.value)
    ps = parse_plugin_string("ahvbackup: password=s3cret-value")
    assert "s3cret" not in repr(ps)
    assert "password" in repr(ps)


_value = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=30
)


@given(st.lists(st.tuples(st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True), _value),
                max_size=5))
def test_double_quoted_values_round_trip(items: list[tuple[str, str]]) -> None:
    def quote(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'

    text = "ahvbackup: " + " \\\n ".join(f"{k}={quote(v)}" for k, v in items)
    assert pairs(text) == items
