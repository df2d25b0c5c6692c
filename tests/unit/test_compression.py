"""Compression: the messages leaving a thread's buffer kept as one episodic memory."""

from __future__ import annotations

import pickle
from collections.abc import AsyncIterator

import openai
import pytest

from memory.buffer import BufferEntry
from memory.embedders import OpenAIEmbedder
from memory.in_memory import InMemoryMemoryStore
from memory.long_term import MAX_CONTENT_CHARS, MemoryRecord
from memory.service import LongTermMemory
from providers.openai_provider import OpenAIProvider
from serve_app import deployments
from serve_app.agent import Agent
from serve_app.agent_memory import AgentMemory, SummaryNotStored
from stickyray.config import ModelPrice, load_config
from stickyray.errors import CompressionNotStored, StoreUnavailable
from stickyray.testing import FakeLLMServer, FakeReply
from stickyray.turns import CompressRequest, Usage


@pytest.fixture
async def provider(fake_llm: FakeLLMServer) -> AsyncIterator[OpenAIProvider]:
    provider = OpenAIProvider.from_settings("k", fake_llm.openai_base_url, 10, 0)
    yield provider
    await provider.aclose()


@pytest.fixture
def memory(fake_llm: FakeLLMServer) -> LongTermMemory:
    client = openai.AsyncOpenAI(base_url=fake_llm.openai_base_url, api_key="k", max_retries=0)
    return LongTermMemory(InMemoryMemoryStore(dimension=64), OpenAIEmbedder(client, dimension=64))


def request(*texts: str, turn: int = 1) -> CompressRequest:
    entries = [BufferEntry(role="user", text=text, turn=turn, user_id="u") for text in texts]
    return CompressRequest(thread="default/t", tenant="default", user_id="u", messages=entries)


async def contents(memory: LongTermMemory) -> list[str]:
    return sorted(h.memory.content for h in await memory.recall("default", "u", "table", k=10))


async def test_compressing_the_same_messages_again_keeps_one_memory(
    fake_llm: FakeLLMServer, provider: OpenAIProvider, memory: LongTermMemory
) -> None:
    bookings = AgentMemory(load_config(None).agent("bookings"), memory)
    fake_llm.on(agent="bookings", reply=FakeReply.text("Booked a table for two."), times=1)
    fake_llm.on(agent="bookings", reply=FakeReply.text("A table for two is booked."))
    first = await bookings.compress(request("a table for two"), provider)
    # Asked again, as when the turn's checkpoint failed or the reply was lost: the model
    # words it differently, but the messages are the same.
    again = await bookings.compress(request("a table for two"), provider)
    assert again.memory_id == first.memory_id is not None
    assert await contents(memory) == ["Booked a table for two."]

    other = await bookings.compress(request("a table for two", turn=2), provider)
    assert other.memory_id != first.memory_id
    assert await contents(memory) == ["A table for two is booked.", "Booked a table for two."]


async def test_a_summary_longer_than_a_memory_holds_is_cut_at_a_word(
    fake_llm: FakeLLMServer, provider: OpenAIProvider, memory: LongTermMemory
) -> None:
    bookings = AgentMemory(load_config(None).agent("bookings"), memory)
    summary = "A table for two. " + "Then more words. " * 600  # over 10,000 characters
    fake_llm.on(agent="bookings", reply=FakeReply.text(summary))
    result = await bookings.compress(request("a table for two"), provider)
    assert result.memory_id is not None
    (kept,) = await contents(memory)
    assert len(kept) <= MAX_CONTENT_CHARS
    start = kept.removesuffix("...")
    assert summary.startswith(start) and summary[len(start)] == " "  # cut between words


async def test_a_summary_with_a_lone_surrogate_is_stored_without_it(
    fake_llm: FakeLLMServer, provider: OpenAIProvider, memory: LongTermMemory
) -> None:
    """Postgres cannot store one: refused, every later turn would pay for a summary again."""
    bookings = AgentMemory(load_config(None).agent("bookings"), memory)
    fake_llm.on(agent="bookings", reply=FakeReply.text("Booked \ud800 a table."))
    result = await bookings.compress(request("a table for two"), provider)
    assert result.memory_id is not None
    assert await contents(memory) == ["Booked ? a table."]


@pytest.mark.parametrize(
    "reply",
    [
        FakeReply(content="I can't summarise this.", stop="refusal"),
        FakeReply(stop="content_filter"),
        FakeReply.text("\x00\x00"),
        # Cut off by the token limit: the rest of the summary, and what it kept, are gone.
        FakeReply(content="The user asked about", stop="max_tokens"),
    ],
    ids=["refusal", "filtered", "nul-only", "cut-off"],
)
async def test_no_usable_summary_keeps_the_messages_themselves(
    reply: FakeReply,
    fake_llm: FakeLLMServer,
    provider: OpenAIProvider,
    memory: LongTermMemory,
) -> None:
    bookings = AgentMemory(load_config(None).agent("bookings"), memory)
    fake_llm.on(agent="bookings", reply=reply)
    result = await bookings.compress(request("a table for two"), provider)
    assert result.memory_id is not None
    (kept,) = await contents(memory)
    assert kept.startswith("Conversation excerpt") and "user: a table for two" in kept


async def test_replies_no_memory_can_hold_are_kept_without_what_it_cannot(
    fake_llm: FakeLLMServer, provider: OpenAIProvider, memory: LongTermMemory
) -> None:
    """No summary, so the messages themselves are kept, and a model's reply had a NUL."""
    bookings = AgentMemory(load_config(None).agent("bookings"), memory)
    fake_llm.on(agent="bookings", reply=FakeReply(stop="content_filter"))
    said = BufferEntry(role="assistant", agent="bookings", text="Booked.\x00", turn=1)
    messages = [*request("a table for two").messages, said]
    compress = request().model_copy(update={"messages": messages})
    result = await bookings.compress(compress, provider)
    assert result.memory_id is not None
    (kept,) = await contents(memory)
    assert "bookings: Booked." in kept and "\x00" not in kept


async def test_a_summary_that_cannot_be_stored_keeps_its_cost_for_the_replica(
    fake_llm: FakeLLMServer,
    provider: OpenAIProvider,
    memory: LongTermMemory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Down(InMemoryMemoryStore):
        async def add(self, *args: object, **kwargs: object) -> list[MemoryRecord]:
            raise StoreUnavailable("postgres", "down")

    broken = LongTermMemory(Down(dimension=64), memory._embedder)
    team = load_config(None).model_copy(update={"pricing": {"m": ModelPrice(input=1, output=2)}})
    bookings = team.agent("bookings").model_copy(update={"provider": "openai", "model": "m"})
    team = team.model_copy(update={"specialists": [bookings]})
    fake_llm.on(agent="bookings", reply=FakeReply.text("Booked a table for two."))
    with pytest.raises(SummaryNotStored) as caught:
        await AgentMemory(bookings, broken).compress(request("a table for two"), provider)
    assert caught.value.usage.requests == 1
    assert isinstance(caught.value.__cause__, StoreUnavailable)

    # The replica counts what the summary cost, and fails with that cost for the thread's
    # turn: the thread keeps the messages.
    counted: list[tuple[str, str, str, Usage]] = []

    def count(app: str, agent: str, model: str, usage: Usage, failed: bool = False) -> None:
        counted.append((app, agent, model, usage))

    monkeypatch.setattr(deployments, "record_model_calls", count)
    replica = deployments.AgentDeployment.__new__(deployments.AgentDeployment)
    replica._agent = Agent(bookings, team, provider, [], AgentMemory(bookings, broken), None)
    replica._metric_labels = ("app", "bookings", "m")
    replica._price = team.price_of("bookings")
    with pytest.raises(CompressionNotStored, match="StoreUnavailable") as failed:
        await replica.compress(request("a table for two"))
    ((app, agent, model, usage),) = counted
    assert Usage.model_validate(failed.value.usage) == usage
    # It crosses Ray's process boundary intact.
    assert pickle.loads(pickle.dumps(failed.value)).usage == failed.value.usage
    assert (app, agent, model, usage.requests) == ("app", "bookings", "m", 1)
    assert usage.cost_usd == pytest.approx((usage.input_tokens + 2 * usage.output_tokens) / 1e6)
    assert usage.cost_usd is not None and usage.cost_usd > 0


def test_the_unstored_summarys_cost_crosses_ray() -> None:
    """The thread reads the cost from the error Ray hands it, which wraps the replica's."""
    from ray.exceptions import RayTaskError

    spent = Usage(input_tokens=7, output_tokens=3, requests=1)
    raised = CompressionNotStored("StoreUnavailable: down", spent.model_dump())
    wrapped = RayTaskError("compress", "traceback", raised).as_instanceof_cause()
    assert isinstance(wrapped, CompressionNotStored)
    assert Usage.model_validate(wrapped.usage) == spent
