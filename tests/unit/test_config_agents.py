"""agents.yaml: settings that would be silently ignored are errors naming the agent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from stickyray.config import TeamConfig, load_config
from stickyray.errors import ConfigError
from tests.e2e.teams import openai_team


def load(tmp_path: Path, data: dict[str, Any]) -> TeamConfig:
    path = tmp_path / "agents.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def team(**specialist: Any) -> dict[str, Any]:
    return {
        "supervisor": {"name": "triage", "description": "Routes."},
        "specialists": [{"name": "bookings", "description": "Bookings.", **specialist}],
    }


@pytest.mark.parametrize(
    ("given", "field"),
    [({"model": "gpt-4o-mini"}, "model"), ({"temperature": 0.2}, "temperature")],
)
def test_a_model_setting_without_a_provider_is_an_error(
    tmp_path: Path, given: dict[str, Any], field: str
) -> None:
    """Offline is the default: it would answer canned replies, uncharged, under the model."""
    data = team(**given)
    data["pricing"] = {"gpt-4o-mini": {"input": 0.15, "output": 0.6}}
    with pytest.raises(ConfigError) as err:
        load(tmp_path, data)
    assert (
        f"specialists.0: {field} is set but provider is offline (the default): add provider: "
        f"openai or anthropic, or remove {field}"
    ) in str(err.value)
    data["specialists"][0]["provider"] = "openai"
    data["specialists"][0].setdefault("model", "gpt-4o-mini")
    assert load(tmp_path, data).agent("bookings").provider == "openai"


def test_an_offline_agent_named_as_such_or_left_bare_loads(tmp_path: Path) -> None:
    assert load(tmp_path, team()).agent("bookings").provider == "offline"
    chosen = load(tmp_path, team(provider="offline", model="m-test"))
    assert chosen.agent("bookings").provider == "offline"


def test_a_misspelt_slot_names_the_agent_the_slot_and_the_intents_slots(tmp_path: Path) -> None:
    intent = {"name": "ReserveTable", "required_slots": ["date", "party_size"]}
    data = team(intents=[intent], slots={"date": "Day", "party_sise": "Number of people"})
    with pytest.raises(ConfigError) as err:
        load(tmp_path, data)
    message = str(err.value)
    assert "agent 'bookings': slots: 'party_sise' is not a slot of its intents" in message
    assert "(they take date, party_size), and party_size has no description" in message
    data["specialists"][0]["slots"] = {"date": "Day", "party_size": "Number of people"}
    assert load(tmp_path, data).agent("bookings").slots["party_size"] == "Number of people"


def test_a_slot_for_routing_only_is_taken_beside_described_intent_slots(tmp_path: Path) -> None:
    """The offline router matches messages on every slot, as in SGD's service schemas."""
    intent = {"name": "ReserveHotel", "required_slots": ["city"]}
    slots = {"city": "Where", "smoking_allowed": "Whether smoking is allowed"}
    assert load(tmp_path, team(intents=[intent], slots=slots)).agent("bookings").slots == slots
    no_slots = team(intents=[{"name": "ReserveHotel"}], slots={"city": "Where"})
    assert load(tmp_path, no_slots).agent("bookings").slots == {"city": "Where"}
    undescribed = team(intents=[intent])  # the slot's name stands for its description
    assert load(tmp_path, undescribed).agent("bookings").slots == {}


def test_a_short_window_larger_than_the_buffer_is_an_error(tmp_path: Path) -> None:
    """The thread never keeps more than buffer_size messages: the window would not fill."""
    data = openai_team()  # buffer_size 60
    data["specialists"][1]["memory"] = {"short_window": 61}
    with pytest.raises(ConfigError) as err:
        load(tmp_path, data)
    assert (
        "agent 'bookings': memory.short_window (61) is larger than threads.buffer_size (60)"
    ) in str(err.value)
    data["specialists"][1]["memory"] = {"short_window": 60}
    assert load(tmp_path, data).buffer_limit("bookings") == 60
    data["threads"]["buffer_size"] = 61
    data["specialists"][1]["memory"] = {"short_window": 61}
    assert load(tmp_path, data).buffer_limit("bookings") == 61
