"""The offline provider routes with the real all-MiniLM-L6-v2 model, no network."""

from __future__ import annotations

import pytest

from memory.embedders import LocalEmbedder
from providers.model import ChatMessage, ToolSpec
from providers.offline import OfflineProvider
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


async def test_specialist_hands_directly_when_it_may(embedder, team) -> None:
    provider = OfflineProvider(team.agent("invoices"), team, embedder)
    response = await provider.complete(
        agent="invoices",
        model="offline",
        messages=user("I forgot my password and cannot log in to the app"),
        tools=tools("transfer_to_support", "return_to_supervisor"),
        temperature=0,
    )
    assert [c.name for c in response.tool_calls] == ["transfer_to_support"]


def test_embedding_more_texts_than_the_cache_holds(embedder: LocalEmbedder) -> None:
    small = LocalEmbedder(cache_size=2)
    small._model = embedder._load()  # share the loaded model; the cache is what is tested
    texts = [f"sentence number {i}" for i in range(5)] + ["sentence number 0"]
    vectors = small.embed_sync(texts)
    assert vectors.shape == (6, 384)
    assert abs(float(vectors[0] @ vectors[5]) - 1.0) < 1e-5
    again = small.embed_sync(texts[:3])
    assert abs(float(again[2] @ vectors[2]) - 1.0) < 1e-5
