"""stickyray's replay format: one dialogue per JSONL line; agents from YAML or a JSON list.

A dialogue line::

    {"dialogue_id": "1_00000", "services": ["Restaurants_2"],
     "turns": [{"user": "...", "services": ["Restaurants_2"], "intents": [...],
                "reference_reply": "..."}]}

Only ``dialogue_id`` and each turn's ``user`` are required; ``services`` (the agents a turn
addresses) are the labels routing is scored against.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stickyray.config import TeamConfig, load_config, parse_config
from stickyray.errors import ConfigError

__all__ = ["Dialogue", "SkippedLine", "Turn", "load_dialogues", "load_team", "team_from_agents"]


class Turn(BaseModel):
    """One user message, with the agents it addresses when labelled."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    user: str = Field(min_length=1)
    services: list[str] = Field(default_factory=list)
    intents: list[str] = Field(default_factory=list)
    reference_reply: str | None = None


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
    path: Path, limit: int | None = None
) -> tuple[list[Dialogue], list[SkippedLine]]:
    """Read dialogues; a malformed line is reported with its number and skipped."""
    dialogues: list[Dialogue] = []
    skipped: list[SkippedLine] = []
    for number, line in _lines(path):
        if limit is not None and len(dialogues) >= limit:
            break
        try:
            dialogues.append(Dialogue.model_validate_json(line))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "line"
            skipped.append(SkippedLine(line=number, error=f"{where}: {first['msg']}"))
    return dialogues, skipped


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


def team_from_agents(entries: list[dict[str, Any]], source: Path) -> TeamConfig:
    """One offline supervisor plus one offline specialist per entry; intents become tools."""
    specialists = []
    for entry in entries:
        specialists.append(
            {
                "name": _agent_name(str(entry.get("name", ""))),
                "description": entry.get("description") or entry.get("name", ""),
                "instructions": f"You are the {entry.get('name')} agent.",
                "provider": "offline",
                "intents": [
                    {
                        k: v
                        for k, v in intent.items()
                        if k in ("name", "description", "required_slots", "optional_slots")
                    }
                    for intent in entry.get("intents", [])
                ],
                "slots": {s["name"]: s.get("description", "") for s in entry.get("slots", [])},
                "max_ongoing_requests": 1000,
            }
        )
    config = {
        "supervisor": {
            "name": "supervisor",
            "description": "Routes each conversation to the service that can help.",
            "provider": "offline",
            "max_ongoing_requests": 1000,
        },
        "specialists": specialists,
        "threads": {"buffer_size": 20, "idle_timeout_s": 60},
        "ingress": {"max_ongoing_requests": 1000},
    }
    return parse_config(config, source)


def _agent_name(service: str) -> str:
    """Agents are named after services, lower-cased: ``Restaurants_2`` -> ``restaurants_2``."""
    return service.lower()


def load_team(path: Path) -> TeamConfig:
    """An agents.yaml, or a JSON list of services (name, description, intents, slots)."""
    if not path.exists():
        raise ConfigError(f"{path}: agents file not found")
    if path.suffix.lower() == ".json":
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{path}: expected a non-empty JSON list of agents")
        return team_from_agents(entries, path)
    return load_config(path)
