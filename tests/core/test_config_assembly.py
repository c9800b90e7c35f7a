"""The one configuration assembly: plugin keys merged like core keys, typed for drivers, and
plugins that clash or break named in warnings instead of stopping every command."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from ahvbackup.core import hookimpl
from ahvbackup.core.config import (
    ConfigSources,
    ModeView,
    PluginSettings,
    assemble_config,
    plugin_keys,
    setting,
)
from ahvbackup.core.config.fields import Int, Text
from ahvbackup.core.errors import ConfigError
from ahvbackup.core.plugins import Hooks

ANY = ModeView("the test")


@dataclass(frozen=True)
class ProbeKeys(PluginSettings):
    probe_retries: int = setting(Int(minimum=0), 3)
    probe_label: str | None = setting(Text(empty=None), None)


class ProbePlugin:
    """A hook plugin declaring typed keys, one of which clashes with a core key."""

    @hookimpl
    def ahvbackup_config_fields(self) -> dict[str, object]:
        return {**ProbeKeys.fields(), "vm": Text()}


class Exploding:
    @hookimpl
    def ahvbackup_config_fields(self) -> dict[str, object]:
        raise RuntimeError("boom")


def hooks(*plugins: object) -> Hooks:
    return Hooks(autoload=False, plugins=plugins)


def test_a_plugin_key_is_typed_with_its_default_and_from_every_source(tmp_path: Path) -> None:
    conf = tmp_path / "a.conf"
    conf.write_text("probe_label = from-file\n")
    cfg = assemble_config(ConfigSources(files=(conf,), plugin_string="ahvbackup: probe_retries=7"),
                          hooks=hooks(ProbePlugin()), view=ANY)
    keys = cfg.settings(ProbeKeys)
    assert keys == ProbeKeys(probe_retries=7, probe_label="from-file")
    assert cfg.sources["probe_retries"] == "plugin string"
    assert cfg.sources["probe_label"] == f"{conf}:1"
    assert assemble_config(ConfigSources(), hooks=hooks(ProbePlugin()),
                           view=ANY).settings(ProbeKeys).probe_retries == 3


def test_a_bad_plugin_value_is_one_line_naming_key_and_source() -> None:
    with pytest.raises(ConfigError) as err:
        assemble_config(ConfigSources(overrides={"probe_retries": "-1"}),
                        hooks=hooks(ProbePlugin()), view=ANY)
    assert str(err.value) == ("command line: probe_retries: must be a whole number, 0 or more "
                              "(got '-1')")


def test_a_driver_key_is_known_without_the_command_line() -> None:
    # the ahv driver's iscsi_port, from a plugin string, as the Bacula backend passes it
    cfg = assemble_config(ConfigSources(plugin_string="ahvbackup: iscsi_port=3261"),
                          hooks=hooks(), view=ANY)
    assert cfg.extra["iscsi_port"] == 3261
    assert "iscsi_port" in plugin_keys(hooks()).owners


def test_a_clashing_or_exploding_plugin_is_a_warning_not_a_failure() -> None:
    cfg = assemble_config(ConfigSources(overrides={"vm": "a,b"}),
                          hooks=hooks(ProbePlugin(), Exploding()), view=ANY)
    assert cfg.vm == ("a", "b")  # the core key, not the plugin's
    assert any("declares the key 'vm', which ahvbackup already has" in w for w in cfg.warnings)
    assert any("failed to load" in w and "RuntimeError: boom" in w for w in cfg.warnings)


def test_settings_of_keys_nobody_declared_is_a_clear_error() -> None:
    cfg = assemble_config(ConfigSources(), hooks=hooks(), view=ANY)
    with pytest.raises(KeyError, match="probe_retries, probe_label not in this configuration"):
        cfg.settings(ProbeKeys)


def test_a_settings_field_without_setting_is_refused() -> None:
    @dataclass(frozen=True)
    class Sloppy(PluginSettings):
        plain: int = 1

    with pytest.raises(TypeError, match=r"Sloppy\.plain: declare it with setting"):
        Sloppy.fields()
