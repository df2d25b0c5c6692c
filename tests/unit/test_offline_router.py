"""The offline provider routes with the real all-MiniLM-L6-v2 model, no network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from memory.embedders import LocalEmbedder
from providers.model import ChatMessage, ToolSpec
from providers.offline import OfflineProvider, team_profiles
from providers.routing import AgentProfile
from replay.dataset import team_from_agents
from stickyray.config import TeamConfig, load_config


@pytest.fixture(scope="module")
def embedder() -> LocalEmbedder:
    return LocalEmbedder()


@pytest.fixture(scope="module")
def team() -> TeamConfig:
    return load_config(None)


def tools(*names: str) -> list[ToolSpec]:
    return [ToolSpec(name=n, description=n) for n in names]


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="system", content="s"), ChatMessage(role="user", content=text)]


SUPERVISOR_TOOLS = tools("transfer_to_invoices", "transfer_to_bookings", "transfer_to_support")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Can I reserve a table for four on Friday?", "bookings"),
        ("I need to change my flight reservation", "bookings"),
        ("Why was I charged twice on this invoice?", "invoices"),
        ("I can't log in, the app shows an error", "support"),
    ],
)
async def test_supervisor_routes_by_similarity(embedder, team, text: str, expected: str) -> None:
    provider = OfflineProvider(team.supervisor, team, embedder)
    response = await provider.complete(
        agent="triage", model="offline", messages=user(text), tools=SUPERVISOR_TOOLS, temperature=0
    )
    assert [c.name for c in response.tool_calls] == [f"transfer_to_{expected}"]
    assert "offline router" in response.tool_calls[0].arguments["reason"]
    assert response.usage.input_tokens == 0  # no model, no tokens


async def test_specialist_stays_on_follow_ups_and_returns_on_a_new_topic(embedder, team) -> None:
    provider = OfflineProvider(team.agent("bookings"), team, embedder)
    stay = await provider.complete(
        agent="bookings",
        model="offline",
        messages=user("yes, 2 people please"),
        tools=tools("return_to_supervisor"),
        temperature=0,
    )
    assert stay.tool_calls == [] and "bookings" in stay.text and "offline" in stay.text
    leave = await provider.complete(
        agent="bookings",
        model="offline",
        messages=user("My invoice shows a wrong charge, I want a refund"),
        tools=tools("return_to_supervisor"),
        temperature=0,
    )
    assert [c.name for c in leave.tool_calls] == ["return_to_supervisor"]


@pytest.mark.parametrize("choice", ["auto", "none"])
async def test_specialist_hands_directly_when_it_may(embedder, team, choice) -> None:
    provider = OfflineProvider(team.agent("invoices"), team, embedder)
    response = await provider.complete(
        agent="invoices",
        model="offline",
        messages=user("I forgot my password and cannot log in to the app"),
        tools=tools("transfer_to_support", "return_to_supervisor"),
        temperature=0,
        tool_choice=choice,
    )
    if choice == "auto":
        assert [c.name for c in response.tool_calls] == ["transfer_to_support"]
    else:  # a call that allows no tools answers in text, as a model would
        assert response.tool_calls == [] and "invoices" in response.text


def test_embedding_more_texts_than_the_cache_holds(embedder: LocalEmbedder) -> None:
    small = LocalEmbedder(cache_size=2)
    small._model = embedder._load()  # share the loaded model; the cache is what is tested
    texts = [f"sentence number {i}" for i in range(5)] + ["sentence number 0"]
    vectors = small.embed_sync(texts)
    assert vectors.shape == (6, 384)
    assert abs(float(vectors[0] @ vectors[5]) - 1.0) < 1e-5
    again = small.embed_sync(texts[:3])
    assert abs(float(again[2] @ vectors[2]) - 1.0) < 1e-5


def limited(team: TeamConfig) -> TeamConfig:
    """The sample team with a supervisor that may hand only to invoices and support."""
    data = team.model_dump(exclude_none=True)
    data["supervisor"]["handoffs"] = ["invoices", "support"]
    return TeamConfig.model_validate(data)


async def test_a_limited_supervisor_hands_to_the_closest_agent_it_may(embedder, team) -> None:
    team = limited(team)
    provider = OfflineProvider(team.supervisor, team, embedder)
    response = await provider.complete(
        agent="triage",
        model="offline",
        messages=user("I can't open the booking page, the site shows error 500"),
        tools=tools("transfer_to_invoices", "transfer_to_support"),
        temperature=0,
    )
    # Closest is bookings, which it may not reach; support comes next, invoices is listed first.
    assert [c.name for c in response.tool_calls] == ["transfer_to_support"]
    assert "bookings is not a handoff target" in response.tool_calls[0].arguments["reason"]


async def test_no_suggestion_the_supervisor_could_not_follow(embedder, team) -> None:
    team = limited(team)
    provider = OfflineProvider(team.agent("invoices"), team, embedder)
    response = await provider.complete(
        agent="invoices",
        model="offline",
        messages=user("I want to book a table for two tonight"),
        tools=tools("return_to_supervisor"),
        temperature=0,
    )
    # Returning with "suggested: bookings" would bounce back here until the handoff limit.
    assert response.tool_calls == [] and "invoices" in response.text


async def test_the_router_cache_never_loses_the_vectors_of_a_call(embedder, team) -> None:
    import asyncio

    from providers.offline import team_profiles
    from providers.routing import EvidenceRouter

    router = EvidenceRouter(embedder, team_profiles(team))
    router._cache.size = 3
    history = [f"I need help with request number {i}" for i in range(8)]
    decisions = await asyncio.gather(
        router.route(history),
        router.check(["book a table", "for two", "yes, 2 people"], "bookings"),
        router.route(["why was I charged twice?", *history[:2]]),
    )
    assert decisions[0].agent in router.agents and decisions[2].agent in router.agents


async def test_after_supervisor_the_new_request_is_routed_not_the_topic_left(
    embedder, team
) -> None:
    provider = OfflineProvider(team.supervisor, team, embedder)
    earlier = [
        ChatMessage(role="user", content="I want to book a table for Friday"),
        ChatMessage(role="assistant", content="Which time?"),
        ChatMessage(role="user", content="at 8pm please, for 4 people"),
        ChatMessage(role="assistant", content="Booked."),
    ]
    new = ChatMessage(role="user", content="can I pay by bank transfer?")

    async def routed(system: str) -> str:
        messages = [ChatMessage(role="system", content=system), *earlier, new]
        response = await provider.complete(
            agent="triage",
            model="offline",
            messages=messages,
            tools=SUPERVISOR_TOOLS,
            temperature=0,
        )
        return response.tool_calls[0].name

    # A turn that starts at the supervisor (after /supervisor): the new request decides.
    assert await routed("You route conversations.") == "transfer_to_invoices"
    # Handed back within a turn, the thread's recent history still counts.
    handed = "You route. The conversation was handed to you because: moved on"
    assert await routed(handed) == "transfer_to_bookings"


def test_a_slot_without_a_description_is_embedded_as_its_name_in_words() -> None:
    entry: dict[str, Any] = {
        "name": "RentalCars_1",
        "description": "Car rental service",
        "intents": [{"name": "GetCarsAvailable", "required_slots": ["pickup_city"]}],
        "slots": [{"name": "pickup_city"}],  # SGD style: no description
    }
    team = team_from_agents([entry, {"name": "Hotels_1"}], Path("agents.json"))
    texts = team_profiles(team)[0].view_texts()
    # As the routing benchmark embeds the same entry, not "" and ". ".
    assert texts["slot"] == AgentProfile.from_dataset_entry(entry).view_texts()["slot"]
    assert texts["slot"] == ["pickup city"]
    assert texts["intent_slots"] == [". pickup city"]
    # Only spaces is no description either, and a name of no words stays as it is.
    entry["slots"] = [{"name": "pickup_city", "description": "  "}, {"name": "_1"}]
    entry["intents"][0]["optional_slots"] = ["_1"]
    texts = team_profiles(team_from_agents([entry], Path("agents.json")))[0].view_texts()
    assert texts["slot"] == ["pickup city", "_1"]
