"""The replay's baselines around commands: which ones end a stretch, as they do in the thread."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from replay.baselines import _replayed, sticky
from replay.dataset import Dialogue


class _ByValue:
    """Routes on the first vector given: 0.0 is hotels_1, 1.0 is taxi_1."""

    def route_vectors(self, vectors: np.ndarray) -> Any:
        return SimpleNamespace(agent=["hotels_1", "taxi_1"][int(vectors[0][0])])


ROUTER: Any = _ByValue()
HOTEL = {"user": "I need a hotel room", "services": ["Hotels_1"]}
# Routed on its own it would go to taxi_1: only a fresh stretch routes it.
NEAR = {"user": "two nights, near the cab rank", "services": ["Hotels_1"]}
VECTORS = np.array([[0.0], [1.0]])


def dialogue(*turns: dict[str, Any]) -> Dialogue:
    return Dialogue.model_validate({"dialogue_id": "d", "turns": list(turns)})


@pytest.mark.parametrize(
    "command", ["/help", "/status", "/agents", "/supervisor please", "/reset my password", "/x"]
)
def test_a_command_that_only_reads_the_thread_keeps_the_sticky_agent(command: str) -> None:
    agents, decisions = _replayed(sticky, ROUTER, dialogue(HOTEL, {"user": command}, NEAR), VECTORS)
    assert (agents, decisions) == (["hotels_1", "hotels_1", "hotels_1"], 1)
    # Several in a row pass the agent along.
    two = dialogue(HOTEL, {"user": command}, {"user": "/status"}, NEAR)
    assert _replayed(sticky, ROUTER, two, VECTORS) == (["hotels_1"] * 4, 1)


@pytest.mark.parametrize("command", ["/supervisor", "/reset", "/Supervisor."])
def test_supervisor_or_reset_on_its_own_routes_the_next_message_again(command: str) -> None:
    agents, decisions = _replayed(sticky, ROUTER, dialogue(HOTEL, {"user": command}, NEAR), VECTORS)
    assert (agents, decisions) == (["hotels_1", None, "taxi_1"], 2)


def test_a_command_before_any_message_has_no_agent() -> None:
    agents, decisions = _replayed(sticky, ROUTER, dialogue({"user": "/help"}, HOTEL), VECTORS[:1])
    assert (agents, decisions) == ([None, "hotels_1"], 1)
