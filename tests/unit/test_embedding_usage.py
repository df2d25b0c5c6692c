"""Paid embedding calls made for a turn count in its usage, as its chat calls do."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx2
import openai
import pytest

from memory.buffer import BufferEntry
from memory.embedders import LocalEmbedder, OpenAIEmbedder
from memory.postgres import PostgresMemoryStore
from serve_app import deployments
from serve_app.deployments import AgentDeployment
from stickyray.config import ModelPrice, TeamConfig
from stickyray.errors import CompressionNotStored, StoreUnavailable
from stickyray.settings import Settings
from stickyray.testing import FakeLLMServer, FakeReply
from stickyray.turns import AgentRequest, CompressRequest, Usage
from tests.e2e.teams import memory_team

EMBEDDING_MODEL = "text-embedding-3-small"

Counted = list[tuple[str, Usage]]


def priced_team(bookings_provider: str = "openai", embedder: str = "openai") -> TeamConfig:
    """The memory team with prices for its models (OpenAI embeddings, unless told)."""
    data: dict[str, Any] = memory_team()
    data["pricing"] = {
        "gpt-test": {"input": 1, "output": 2},
        EMBEDDING_MODEL: {"input": 0.5, "output": 0},
    }
    data["specialists"][1]["provider"] = bookings_provider
    data["memory"]["embedder"] = embedder
    return TeamConfig.model_validate(data)


class LocalHandle:
    """The local embedding model behind the call shape of the embedder deployment's handle."""

    def __init__(self) -> None:
        self.embed = SimpleNamespace(remote=LocalEmbedder().embed)


async def start(
    settings: Settings, team: TeamConfig, monkeypatch: pytest.MonkeyPatch, embedder: Any = None
) -> tuple[AgentDeployment, Counted]:
    """The bookings replica of ``team``, and what its metrics get."""
    assert settings.database_url is not None
    async with PostgresMemoryStore.from_url(settings.database_url, dimension=384) as store:
        await store.setup()
    counted: Counted = []

    def count(app: str, agent: str, model: str, usage: Usage, failed: bool = False) -> None:
        counted.append((model, usage))

    monkeypatch.setattr(deployments, "record_model_calls", count)
    agent = AgentDeployment.__new__(AgentDeployment)
    await AgentDeployment.__init__(agent, "bookings", team, settings, embedder, "test")
    return agent, counted


@pytest.fixture
async def replica(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[AgentDeployment, Counted]]:
    agent, counted = await start(settings, priced_team(), monkeypatch)
    yield agent, counted
    closing = agent.__del__()
    assert closing is not None
    await closing


def by_model(counted: Counted) -> dict[str, Usage]:
    spent: dict[str, Usage] = {}
    for model, usage in counted:
        spent[model] = spent.get(model, Usage()) + usage
    return spent


async def test_a_turns_usage_has_its_memory_searches(
    replica: tuple[AgentDeployment, Counted], fake_llm: FakeLLMServer
) -> None:
    agent, counted = replica
    fake_llm.on(agent="bookings", reply=FakeReply.text("booked"))
    request = AgentRequest(thread="default/t", turn=1, text="a table for two", user_id="u1")
    before = fake_llm.embedding_requests
    result = await agent.run(request)
    assert result.reply == "booked"
    assert fake_llm.embedding_requests == before + 1  # the memory search for the prompt

    spent = by_model(counted)
    chat, embedding = spent["gpt-test"], spent[EMBEDDING_MODEL]
    # Each model's metrics get its own calls; the turn gets both.
    assert chat.requests == 1 and embedding.requests == 1
    assert embedding.input_tokens == len("a table for two".split())
    assert embedding.cost_usd == pytest.approx(embedding.input_tokens * 0.5 / 1e6)
    assert result.usage == chat + embedding
    assert result.usage.cost_usd == pytest.approx(chat.cost_usd + embedding.cost_usd)  # type: ignore[operator]
    assert result.llm_calls == 1  # chat calls only


def leaving(text: str) -> CompressRequest:
    entry = BufferEntry(role="user", text=text, turn=1, user_id="u2")
    return CompressRequest(thread="default/t", tenant="default", user_id="u2", messages=[entry])


async def test_a_compression_counts_the_embedding_of_its_summary(
    replica: tuple[AgentDeployment, Counted], fake_llm: FakeLLMServer
) -> None:
    agent, counted = replica
    fake_llm.on(agent="bookings", reply=FakeReply.text("Booked a table for two at nine."))
    result = await agent.compress(leaving("a table for two at nine"))
    assert result.memory_id is not None
    spent = by_model(counted)
    assert spent[EMBEDDING_MODEL].input_tokens == len("Booked a table for two at nine.".split())
    assert result.usage == spent["gpt-test"] + spent[EMBEDDING_MODEL]


def store_down(
    agent: AgentDeployment, monkeypatch: pytest.MonkeyPatch, operation: str = "add"
) -> None:
    """Text is embedded, then the store refuses the ``operation`` that uses it."""

    async def down(*args: object, **kwargs: object) -> None:
        raise StoreUnavailable("postgres", "down")

    store = agent._agent._memory._memory.store  # type: ignore[union-attr]
    monkeypatch.setattr(store, operation, down)


async def test_a_summary_not_stored_carries_its_embedding_too(
    replica: tuple[AgentDeployment, Counted],
    fake_llm: FakeLLMServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The thread's turn gets the whole cost: the summary and its embedding."""
    agent, counted = replica
    store_down(agent, monkeypatch)
    fake_llm.on(agent="bookings", reply=FakeReply.text("Booked a table."))
    with pytest.raises(CompressionNotStored, match="StoreUnavailable") as failed:
        await agent.compress(leaving("a table"))
    spent = by_model(counted)
    assert spent["gpt-test"].requests == spent[EMBEDDING_MODEL].requests == 1
    assert Usage.model_validate(failed.value.usage) == spent["gpt-test"] + spent[EMBEDDING_MODEL]


@pytest.mark.parametrize("embedder", ["openai", "local"])
async def test_an_extractive_summary_not_stored_carries_what_its_embedding_cost(
    embedder: str, settings: Settings, fake_llm: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An offline agent's summary costs nothing; embedding it may have."""
    team = priced_team("offline", embedder)
    agent, counted = await start(settings, team, monkeypatch, LocalHandle())
    try:
        store_down(agent, monkeypatch)
        if embedder == "local":  # nothing paid, nothing to carry: the store's own error
            with pytest.raises(StoreUnavailable):
                await agent.compress(leaving("a table"))
            assert counted == []
            return
        with pytest.raises(CompressionNotStored, match="StoreUnavailable") as failed:
            await agent.compress(leaving("a table"))
        ((model, embedding),) = counted
        assert model == EMBEDDING_MODEL and embedding.requests == 1
        assert embedding.cost_usd is not None and embedding.cost_usd > 0
        assert Usage.model_validate(failed.value.usage) == embedding
    finally:
        closing = agent.__del__()
        assert closing is not None
        await closing


async def test_a_turn_whose_memory_search_fails_keeps_what_its_embedding_cost(
    replica: tuple[AgentDeployment, Counted],
    fake_llm: FakeLLMServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The query was embedded (paid), then the store failed: the turn fails with the cost."""
    agent, counted = replica
    store_down(agent, monkeypatch, "search")
    flagged: list[bool] = []
    counting = deployments.record_model_calls

    def count(app: str, agent: str, model: str, usage: Usage, failed: bool = False) -> None:
        flagged.append(failed)
        counting(app, agent, model, usage, failed)

    monkeypatch.setattr(deployments, "record_model_calls", count)
    request = AgentRequest(thread="default/t", turn=1, text="a table for two", user_id="u3")
    result = await agent.run(request)
    assert result.failed and result.error is not None and "StoreUnavailable" in result.error
    assert flagged and not any(flagged)  # memory failed, not the model's provider
    spent = by_model(counted)
    assert spent[EMBEDDING_MODEL].requests == 1
    assert result.usage == spent[EMBEDDING_MODEL]


@pytest.mark.parametrize(
    ("usage", "counted"),
    [
        (None, Usage(requests=1, unmeasured_requests=1)),
        ({"prompt_tokens": None, "total_tokens": None}, Usage(requests=1, unmeasured_requests=1)),
        ({"prompt_tokens": 7, "total_tokens": 7}, Usage(input_tokens=7, requests=1)),
    ],
    ids=["no-usage", "null-tokens", "measured"],
)
async def test_an_embedding_reply_without_usage_is_unmeasured_not_free(
    usage: dict[str, Any] | None, counted: Usage
) -> None:
    """A compatible embeddings server may report no usage: taken as 0 tokens, its request
    would be priced at $0 and the turn's cost too low instead of unknown."""
    body: dict[str, Any] = {
        "object": "list",
        "model": EMBEDDING_MODEL,
        "data": [{"object": "embedding", "index": 0, "embedding": [0.6, 0.8]}],
    }
    if usage is not None:
        body["usage"] = usage

    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, json=body)

    told: list[Usage] = []
    client = openai.AsyncOpenAI(
        api_key="k",
        base_url="http://x/v1",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(answer)),
    )
    try:
        embedder = OpenAIEmbedder(client, EMBEDDING_MODEL, dimension=2, on_usage=told.append)
        await embedder.embed(["hello"])
    finally:
        await client.close()
    assert told == [counted]
    assert ModelPrice(input=0.5, output=0).charge(told[0]).cost_usd == (
        None if counted.unmeasured_requests else 7 * 0.5 / 1_000_000
    )
