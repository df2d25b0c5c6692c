"""An agents.json list's slots and intents: each mistake named on the user's entry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from replay.dataset import team_from_agents
from replay.job import check_inputs
from stickyray.errors import ConfigError


def fails(entries: list, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        team_from_agents(entries, Path("agents.json"))


def test_a_misspelt_slot_is_named_on_the_users_entry() -> None:
    taxi = {
        "name": "Taxi_1",
        "intents": [{"name": "Book", "required_slots": ["city"]}],
        "slots": [{"name": "citi", "description": "Where from"}],
    }
    fails(
        [{"name": "Hotels_1"}, taxi],
        "agents.json: agents[1]: agent 'taxi_1': slots: 'citi' is not a slot of its intents "
        "(they take city)",
    )


def test_a_slot_or_intent_named_twice_in_one_entry_is_refused() -> None:
    slots = [
        {"name": "city", "description": "Where you stay"},
        {"name": "date"},
        {"name": "city", "description": "Where you start"},
    ]
    fails(
        [{"name": "Hotels_1"}, {"name": "Taxi_1", "slots": slots}],
        "agents.json: agents[1].slots[2].name: 'city' repeats slots[0]",
    )
    intents = [{"name": "Book"}, {"name": "Book", "required_slots": ["city"]}]
    fails([{"name": "Taxi_1", "intents": intents}], "agents[0].intents[1].name: 'Book' repeats")
    # One name in two entries is two agents' own.
    team = team_from_agents(
        [{"name": n, "intents": [{"name": "Book"}], "slots": [{"name": "city"}]} for n in "AB"],
        Path("agents.json"),
    )
    assert [s.slots for s in team.specialists] == [{"city": ""}, {"city": ""}]


def test_an_intent_named_twice_stops_a_replay_for_another_cluster_here(tmp_path: Path) -> None:
    dialogues = tmp_path / "d.jsonl"
    dialogues.write_text(json.dumps({"dialogue_id": "a", "turns": [{"user": "x"}]}) + "\n")
    agents = tmp_path / "agents.json"
    agents.write_text(json.dumps([{"name": "Taxi_1", "intents": [{"name": "Go"}] * 2}]))
    with pytest.raises(ConfigError, match=re.escape("agents[0].intents[1].name: 'Go' repeats")):
        check_inputs(dialogues, agents, tmp_path / "out", 4, None, environment=False)
