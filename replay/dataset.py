"""stickyray's replay format: one dialogue per JSONL line; agents from YAML or a JSON list.

A dialogue line::

    {"dialogue_id": "1_00000", "services": ["Restaurants_2"],
     "turns": [{"user": "...", "services": ["Restaurants_2"], "intents": [...],
                "reference_reply": "..."}]}

Only ``dialogue_id`` and each turn's ``user`` are required; ``services`` (the agents a turn
addresses) are the labels routing is scored against. A dialogue id is any non-empty string,
unique in the file.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from actors.commands import parse_command
from stickyray.agent_config import (
    AGENT_NAME_PATTERN,
    INTENT_NAME_PATTERN,
    AgentConfig,
    SlotName,
    check_slots_once,
)
from stickyray.config import TeamConfig, load_config, parse_config
from stickyray.config_files import read_yaml
from stickyray.errors import ConfigError
from stickyray.turns import message_text

__all__ = ["Dialogue", "SkippedLine", "Turn", "load_dialogues", "load_team", "team_from_agents"]


class Turn(BaseModel):
    """One user message, with the agents it addresses when labelled."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    user: str = Field(min_length=1)
    services: list[str] = Field(default_factory=list)
    intents: list[str] = Field(default_factory=list)
    reference_reply: str | None = None

    @property
    def labels(self) -> list[str]:
        """The agents the turn is scored against; none for a command, which is not routed."""
        if parse_command(self.user) is not None:
            return []
        # Once each: a label written twice is still one agent to have answered. A blank one
        # names no agent and would only be scored as wrong: the turn is unlabelled instead.
        names = (service.strip().lower() for service in self.services)
        return list(dict.fromkeys(name for name in names if name))

    @field_validator("user")
    @classmethod
    def _sendable(cls, value: str) -> str:
        # The ingress's own rule: a turn it would refuse is a data problem, reported as
        # one, not a routing error in the report.
        return message_text(value)


class Dialogue(BaseModel):
    """A recorded conversation."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    dialogue_id: str = Field(min_length=1)
    services: list[str] = Field(default_factory=list)
    turns: list[Turn] = Field(min_length=1)


class SkippedLine(BaseModel):
    """A line that could not be read, and why."""

    line: int
    error: str


def load_dialogues(
    path: Path, limit: int | None = None, max_message_bytes: int | None = None
) -> tuple[list[Dialogue], list[SkippedLine]]:
    """Read dialogues; a malformed line is reported with its number and skipped.

    ``max_message_bytes`` is the team's ``threads.max_message_bytes``: a dialogue with a
    longer turn is skipped too, since the ingress would refuse that turn.
    """
    dialogues: list[Dialogue] = []
    skipped: list[SkippedLine] = []
    first_seen: dict[str, int] = {}
    for position, (number, raw) in enumerate(_lines(path)):
        if position == 0 and raw.removeprefix(_BOM).lstrip().startswith(b"["):
            # Read as lines, a JSON array written one object per line would lose all but
            # one dialogue to "invalid JSON" and still replay: refused, with the fix.
            raise ConfigError(_array_not_lines(path))
        if limit is not None and len(dialogues) >= limit:
            break
        try:
            # Decoded line by line, so one bad byte costs its line and not the file. A byte
            # order mark is dropped wherever it is (files joined with cat carry several).
            line = raw.decode("utf-8-sig")
            dialogue = Dialogue.model_validate_json(line)
        except UnicodeDecodeError as exc:
            skipped.append(SkippedLine(line=number, error=f"line: not UTF-8 ({exc.reason})"))
            continue
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "line"
            what = first["msg"]
            if first["type"] == "model_type" and not first["loc"]:
                what = "expected one dialogue object per line (JSON Lines)"
            skipped.append(SkippedLine(line=number, error=f"{where}: {what}"))
            continue
        too_long = next(
            (
                (i, size)
                for i, turn in enumerate(dialogue.turns)
                if max_message_bytes is not None
                and (size := len(turn.user.encode("utf-8"))) > max_message_bytes
            ),
            None,
        )
        if too_long is not None:
            error = (
                f"turns.{too_long[0]}.user: {too_long[1]} bytes, over the team's "
                f"threads.max_message_bytes ({max_message_bytes})"
            )
            skipped.append(SkippedLine(line=number, error=error))
            continue
        if dialogue.dialogue_id in first_seen:
            # Its turns would be scored against another dialogue's thread and message ids.
            seen = first_seen[dialogue.dialogue_id]
            error = f"dialogue_id: {dialogue.dialogue_id!r} repeats the dialogue on line {seen}"
            skipped.append(SkippedLine(line=number, error=error))
            continue
        first_seen[dialogue.dialogue_id] = number
        dialogues.append(dialogue)
    return dialogues, skipped


def _array_not_lines(path: Path) -> str:
    """What to do with a dialogues file that holds a JSON array."""
    converted = path.with_suffix(".jsonl")
    if converted.name == path.name:  # jq's output must not overwrite its input
        converted = path.with_name(f"{path.stem}-lines.jsonl")
    command = f"jq -c '.[]' {shlex.quote(path.name)} > {shlex.quote(converted.name)}"
    return (
        f"{path}: holds a JSON array, but the dialogues file is JSON Lines, one dialogue "
        f"object per line; convert it, e.g. `{command}`"
    )


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if line.removeprefix(_BOM).strip():
                yield number, line


_BOM = "\ufeff".encode()


class _Named(BaseModel):
    """A slot, and the fields intents and services share with it."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1)
    description: str = ""


class _Intent(_Named):
    # Checked as the config checks them, so an error names the user's entry
    # (agents[0].intents[1]...) and not the generated config.
    name: str = Field(pattern=INTENT_NAME_PATTERN)  # it becomes a tool name
    required_slots: list[SlotName] = Field(default_factory=list)
    optional_slots: list[SlotName] = Field(default_factory=list)

    @model_validator(mode="after")
    def _slots_once(self) -> _Intent:
        check_slots_once(self.required_slots, self.optional_slots)
        return self


class _Service(_Named):
    """One entry of an agents.json list (the SGD schema's fields; others are ignored)."""

    intents: list[_Intent] = Field(default_factory=list)
    slots: list[_Named] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _agent_name_rule(cls, value: str) -> str:
        # Checked here, so the error points at the user's entry and not the generated config.
        if not re.fullmatch(AGENT_NAME_PATTERN, _agent_name(value)):
            raise ValueError(
                "lower-cased, it is the agent's name: a letter, then up to 39 letters, digits or _"
            )
        return value


_SERVICES = TypeAdapter(list[_Service])


def team_from_agents(entries: list[Any], source: Path) -> TeamConfig:
    """One offline supervisor plus one offline specialist per entry; intents become tools."""
    try:
        services = _SERVICES.validate_python(entries)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
        what = "expected a JSON object" if first["type"] == "model_type" else first["msg"]
        raise ConfigError(f"{source}: agents{where}: {what}") from None
    first_named: dict[str, int] = {}
    for index, service in enumerate(services):
        # Agents are named after services lower-cased: Hotels_1 and HOTELS_1 would be one.
        seen = first_named.setdefault(_agent_name(service.name), index)
        if seen != index:
            raise ConfigError(
                f"{source}: agents[{index}].name: {service.name!r} names the same agent as "
                f"agents[{seen}] ({services[seen].name!r}): agent names ignore case"
            )
        # Both become one mapping (slots) or one namespace (tools): the last of two would
        # silently replace the first.
        for field, names in (
            ("slots", [slot.name for slot in service.slots]),
            ("intents", [intent.name for intent in service.intents]),
        ):
            repeated = _repeated(names)
            if repeated is not None:
                before, again = repeated
                raise ConfigError(
                    f"{source}: agents[{index}].{field}[{again}].name: {names[again]!r} "
                    f"repeats {field}[{before}]"
                )
    specialists = [
        {
            "name": _agent_name(service.name),
            "description": service.description or service.name,
            "instructions": f"You are the {service.name} agent.",
            "provider": "offline",
            "intents": [intent.model_dump() for intent in service.intents],
            "slots": {slot.name: slot.description for slot in service.slots},
            "max_ongoing_requests": 1000,
        }
        for service in services
    ]
    for index, specialist in enumerate(specialists):
        # What the config checks of one agent (an intent slot beside a misspelt one), checked
        # here, so the error names the user's entry and not the generated config.
        try:
            AgentConfig.model_validate(specialist)
        except ValidationError as exc:
            what = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError(f"{source}: agents[{index}]: {what}") from None
    taken = {specialist["name"] for specialist in specialists}
    supervisor = next(n for n in _supervisor_names() if n not in taken)
    config = {
        "supervisor": {
            "name": supervisor,
            "description": "Routes each conversation to the service that can help.",
            "provider": "offline",
            "max_ongoing_requests": 1000,
        },
        "specialists": specialists,
        "threads": {"buffer_size": 20, "idle_timeout_s": 60},
        "ingress": {"max_ongoing_requests": 1000},
    }
    return parse_config(config, source)


def _repeated(names: list[str]) -> tuple[int, int] | None:
    """The positions of the first name given before and of its first use, or None."""
    first: dict[str, int] = {}
    for position, name in enumerate(names):
        seen = first.setdefault(name, position)
        if seen != position:
            return seen, position
    return None


def _supervisor_names() -> Iterator[str]:
    """``supervisor``, or ``supervisor_2``, ... when a service already has that name."""
    yield "supervisor"
    yield from (f"supervisor_{n}" for n in itertools.count(2))


def _agent_name(service: str) -> str:
    """Agents are named after services, lower-cased: ``Restaurants_2`` -> ``restaurants_2``."""
    return service.lower()


def load_team(path: Path) -> TeamConfig:
    """An agents.yaml, or a JSON list of services (name, description, intents, slots)."""
    if not path.exists():
        raise ConfigError(f"{path}: agents file not found")
    if path.suffix.lower() == ".json":
        try:
            entries = json.loads(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the agents file: {exc.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to read") from None
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{path}: expected a non-empty JSON list of agents")
        return team_from_agents(entries, path)
    if isinstance(read_yaml(path), list):
        # YAML reads a JSON list too: say how to use it, not that agents.yaml needs a mapping.
        raise ConfigError(
            f"{path}: holds a list of services, which is read from a .json file: rename it "
            "to end in .json, or write an agents.yaml (a supervisor and specialists)"
        )
    return load_config(path)
