"""Reading configuration files: YAML read strictly, and validation errors as messages.

``StrictLoader`` refuses what PyYAML would take silently (a key given twice) or fail on
with a traceback (a date that is no date), each with its line.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from stickyray.errors import ConfigError

if TYPE_CHECKING:
    from stickyray.config import TeamConfig

__all__ = ["StrictLoader", "format_errors", "in_file", "load_team", "read_yaml"]


def in_file(exc: ConfigError, path: Path) -> str:
    """``exc``'s message, naming the file it is about unless it does already."""
    message = str(exc)
    return message if message.startswith(f"{path}") else f"{path}: {message}"


def format_errors(path: Path, exc: ValidationError) -> str:
    """The errors of a configuration read from ``path``, one line each, naming the field."""
    lines = [f"{path}: invalid configuration"]
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "int_parsing":
            msg += _exponent_hint(err.get("input"))
        lines.append(f"  {field}: {msg}")
    return "\n".join(lines)


# YAML reads 1e6 as text (a float needs a dot and a signed exponent: 1.0e+6).
_EXPONENT = re.compile(r"[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE]([-+]?[0-9]+)")


def _exponent_hint(given: Any) -> str:
    found = _EXPONENT.fullmatch(given) if isinstance(given, str) else None
    if found is None:
        return ""
    number = Decimal(given.replace("_", "")) if abs(int(found.group(2))) <= 18 else None
    if number is None or number != number.to_integral_value() or abs(number) >= 10**18:
        return " (write integers without an exponent)"
    return f" (write integers without an exponent: {int(number)} for {given})"


class StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping.

    PyYAML keeps the last one: a second `specialists:` would drop the first list's agents
    without a word.
    """

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return super().construct_object(node, deep=deep)
        try:
            return super().construct_object(node, deep=deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as exc:  # PyYAML's own ValueError, KeyError... for a bad scalar
            raise yaml.constructor.ConstructorError(
                None, None, self._bad_scalar(node, exc), node.start_mark
            ) from None

    def _bad_scalar(self, node: yaml.ScalarNode, exc: Exception) -> str:
        tag = node.tag.rsplit(":", 1)[-1]
        kind = "date" if tag == "timestamp" else tag
        why = f" ({exc})" if isinstance(exc, ValueError | OverflowError) else ""
        what = f"{node.value!r} is not a valid {kind}{why}"
        implicit = node.style is None and self.resolve(yaml.ScalarNode, node.value, (True, False))
        if implicit == node.tag:  # a plain value that looks like a date or a number
            return f"{what}: quote it, as any text that looks like a date or a number"
        return f"{what}: correct the value, or remove its !!{tag} tag"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: keys written next to it override the merged ones
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(
                    None, None, f"a {type(key).__name__} cannot be a key", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(source: Path) -> Any:
    """The YAML document in ``source`` (None if empty), read by ``StrictLoader``; a
    ConfigError naming the file (and the line) says why it cannot be read."""
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read configuration: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 (byte {exc.start}): save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=StrictLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to read") from None


def load_team(given: Path | None, from_env: Path | None) -> tuple[Path, TeamConfig]:
    """The team of ``--config``, else of STICKYRAY_CONFIG, else the shipped sample; an error
    about the file says when its path came from STICKYRAY_CONFIG."""
    from stickyray.config import load_config, sample_config_path

    if given is not None or from_env is None:
        path = given or sample_config_path()
        return path, load_config(path)
    try:
        return from_env, load_config(from_env)
    except ConfigError as exc:
        message = str(exc).replace(f"{from_env}:", f"{from_env} (from STICKYRAY_CONFIG):", 1)
        raise ConfigError(message) from None
