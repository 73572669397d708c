"""Reading a training config file within fixed limits (size, nesting, expanded values), and
the dotted ``--set key=value`` overrides applied to its raw mapping.

YAML aliases let a few hundred bytes stand for billions of values (an "alias bomb");
``yaml.safe_load`` builds them as shared objects in milliseconds, but any copy or walk
that expands them hangs. ``read_config_file`` measures the expanded size on the parsed,
still shared data and refuses a config above the limits before anything copies it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from opdgeo.errors import ConfigError

__all__ = ["MAX_CONFIG_BYTES", "MAX_CONFIG_DEPTH", "MAX_CONFIG_NODES", "read_config_file", "parse_override",
           "apply_overrides"]

MAX_CONFIG_BYTES = 1_000_000
"""A config file larger than this is refused before parsing."""
MAX_CONFIG_NODES = 100_000
"""Values (mappings, lists and scalars) a config may hold once every YAML alias is
expanded; checked on the parsed data, where an alias is still one shared object, so an
alias bomb (nested lists of aliases: 9 levels of 9 give 9**8 values) is refused in
milliseconds instead of being copied."""
MAX_CONFIG_DEPTH = 32
"""Deepest nesting of mappings and lists a config may have (a self-referencing alias
counts as infinitely deep)."""


def read_config_file(path: Path) -> Mapping[str, Any]:
    """Parse a config file within ``MAX_CONFIG_BYTES``, ``MAX_CONFIG_NODES`` and ``MAX_CONFIG_DEPTH``.

    Raises:
        ConfigError: unreadable, not YAML, too large, too deep, or not a mapping.
    """
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes; a config is at most {MAX_CONFIG_BYTES} bytes")
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply (at most {MAX_CONFIG_DEPTH} levels)") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    sizes: dict[int, int] = {}

    def expanded(node: Any, depth: int) -> int:
        if not isinstance(node, (Mapping, list)):
            return 1
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{path}: nested deeper than {MAX_CONFIG_DEPTH} levels (or an alias refers to itself)")
        if id(node) not in sizes:
            children = list(node.values()) if isinstance(node, Mapping) else node
            total = 1
            for child in children:
                total += expanded(child, depth + 1)
                if total > MAX_CONFIG_NODES:
                    raise ConfigError(f"{path}: more than {MAX_CONFIG_NODES} values once its YAML aliases are "
                                      "expanded (an alias bomb?); a config is far smaller")
            sizes[id(node)] = total
        return sizes[id(node)]

    expanded(data, 0)
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``"a.b=value"`` into ``("a.b", value)``; the value is a YAML scalar/flow value.

    YAML 1.1 reads ``1e-5`` as a string; such numbers are read as floats here.

    Raises:
        ConfigError: no ``=`` or an empty key.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. optim.lr=1e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {str(err).splitlines()[0]}") from None
    if isinstance(value, str):
        try:
            value = float(value) if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value) else value
        except ValueError:
            pass
    return key, value


def apply_overrides(data: Mapping[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of the raw config mapping with dotted ``key=value`` overrides applied.

    Raises:
        ConfigError: every malformed override at once, joined by "; ".
    """
    out = _deep_copy(data)
    parsed, problems = [], []
    for text in overrides:
        try:
            parsed.append(parse_override(text))
        except ConfigError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError("; ".join(problems))
    for key, value in parsed:
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {"name": child} if part == "objective" and isinstance(child, str) else {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
