"""LongTermMemory over the in-memory store with real embedders (OpenAI SDK on the fake)."""

from __future__ import annotations

import openai
import pytest
from pydantic import ValidationError

from memory.buffer import BufferEntry
from memory.embedders import OpenAIEmbedder
from memory.in_memory import InMemoryMemoryStore
from memory.long_term import NewMemory
from memory.service import LongTermMemory, extractive_summary
from stickyray.testing import FakeLLMServer


def embedder(fake: FakeLLMServer, dimension: int = 64) -> OpenAIEmbedder:
    client = openai.AsyncOpenAI(base_url=fake.openai_base_url, api_key="k", max_retries=0)
    return OpenAIEmbedder(client, dimension=dimension)


async def test_remember_and_recall_through_the_openai_sdk(fake_llm: FakeLLMServer) -> None:
    memory = LongTermMemory(InMemoryMemoryStore(dimension=64), embedder(fake_llm))
    await memory.remember("t", "u", NewMemory(content="The user's tax id is B-123"))
    await memory.remember("t", "u", NewMemory(content="Prefers morning appointments"))
    await memory.remember("t", "other", NewMemory(content="The other user's tax id is Z-9"))
    hits = await memory.recall("t", "u", "what is my tax id", k=1)
    assert [h.memory.content for h in hits] == ["The user's tax id is B-123"]
    calls = fake_llm.embedding_requests
    await memory.recall("t", "u", "what is my tax id", k=1)
    assert fake_llm.embedding_requests == calls, "repeated texts come from the LRU cache"


def test_dimension_mismatch_is_a_clear_error(fake_llm: FakeLLMServer) -> None:
    with pytest.raises(ValueError, match="384-dimensional.*gives 64"):
        LongTermMemory(InMemoryMemoryStore(dimension=384), embedder(fake_llm, 64))


def test_extractive_summary_keeps_the_users_words() -> None:
    entries = [
        BufferEntry(role="user", text="my tax id is B-123", turn=2),
        BufferEntry(role="assistant", text="noted " * 100, turn=2, agent="invoices"),
    ]
    summary = extractive_summary(entries)
    assert "turns 2-2" in summary and "user: my tax id is B-123" in summary
    assert "invoices: noted" in summary and len(summary) < 400


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"content": "a\x00b"}, "content"),
        ({"content": "lone \ud800"}, "content"),
        ({"content": "x", "metadata": {"n": float("nan")}}, "metadata"),
        ({"content": "x", "metadata": {"deep": [{"s": "\x00"}]}}, "metadata"),
    ],
)
def test_memories_postgres_cannot_store_are_refused(fields: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        NewMemory(**fields)


async def test_a_core_block_postgres_cannot_store_is_refused(fake_llm: FakeLLMServer) -> None:
    memory = LongTermMemory(InMemoryMemoryStore(dimension=64), embedder(fake_llm))
    with pytest.raises(ValueError, match="NUL"):
        await memory.set_core("t", "u", "persona", "a\x00b", 100)
