"""Configuration: every key of the whitepaper's section 7 plus ours, from files, plugin
strings and the command line, checked and loaded into one frozen `Config`.

Precedence, lowest first: defaults < config files (in order) < plugin string < command-line
overrides. See docs/configuration.md. `assemble_config` is what every job uses: `load_config`
plus the keys of installed plugins, the keys refused until their feature lands
(`not_yet`), and the mode the caller runs (`modes`).
"""

from __future__ import annotations

from .assembly import ConfigSources, PluginKeys, assemble_config, plugin_keys
from .fields import SecretField
from .keys import ALIASES, KEYS, MODES, SECRET_KEYS, Key, canonical_key
from .loader import (
    DEFAULT_CONFIG_FILE,
    MAX_FILE_BYTES,
    check_file_mode,
    load_config,
    read_key_value_file,
)
from .model import Config, HostPort
from .modes import MODE_TABLE, Mode, ModeView, pick_mode, view_of_job
from .not_yet import NOT_YET, NOT_YET_DRIVERS, NotYet, refusals
from .plugin_string import (
    PluginItem,
    PluginString,
    PluginStringError,
    location,
    parse_plugin_string,
)
from .settings import PluginSettings, setting

__all__ = [
    "ALIASES",
    "DEFAULT_CONFIG_FILE",
    "KEYS",
    "MAX_FILE_BYTES",
    "MODES",
    "MODE_TABLE",
    "NOT_YET",
    "NOT_YET_DRIVERS",
    "SECRET_KEYS",
    "Config",
    "ConfigSources",
    "HostPort",
    "Key",
    "Mode",
    "ModeView",
    "NotYet",
    "PluginItem",
    "PluginKeys",
    "PluginSettings",
    "PluginString",
    "PluginStringError",
    "SecretField",
    "assemble_config",
    "canonical_key",
    "check_file_mode",
    "load_config",
    "location",
    "parse_plugin_string",
    "pick_mode",
    "plugin_keys",
    "read_key_value_file",
    "refusals",
    "setting",
    "view_of_job",
]
