"""Serve awaits a replica's ``__del__`` on shutdown: it must close what the replica opened."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from memory.postgres import PostgresMemoryStore
from serve_app.deployments import AgentDeployment
from serve_app.tools import ToolError
from stickyray.config import TeamConfig
from stickyray.settings import Settings
from stickyray.testing import FakeLLMServer, FakeReply
from stickyray.turns import AgentRequest
from tests.e2e.teams import memory_team


async def client_backends(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
        )
    finally:
        await conn.close()


async def test_an_agent_replica_closes_its_connections_on_shutdown(
    settings: Settings, postgres_url: str, fake_llm: FakeLLMServer
) -> None:
    async with PostgresMemoryStore.from_url(postgres_url, dimension=384) as store:
        await store.setup()
    before = await client_backends(postgres_url)
    team = TeamConfig.model_validate(memory_team())
    replica = AgentDeployment.__new__(AgentDeployment)
    await AgentDeployment.__init__(replica, "bookings", team, settings, None, "test")
    assert await client_backends(postgres_url) > before  # its memory pool

    fake_llm.on(agent="bookings", reply=FakeReply.text("booked"))
    request = AgentRequest(thread="default/t", turn=1, text="a table for two")
    assert (await replica.run(request)).reply == "booked"

    closing = replica.__del__()
    assert closing is not None  # what Serve awaits
    await closing
    deadline = time.monotonic() + 30
    while await client_backends(postgres_url) > before:
        assert time.monotonic() < deadline, "the memory pool's connections stayed open"
        await asyncio.sleep(0.05)
    assert replica.__del__() is None  # the garbage collector's later call: nothing left to do


async def test_an_agent_replica_closes_its_model_client_on_shutdown(
    settings: Settings, fake_llm: FakeLLMServer
) -> None:
    team = TeamConfig.model_validate(memory_team())
    replica = AgentDeployment.__new__(AgentDeployment)
    await AgentDeployment.__init__(replica, "invoices", team, settings, None, "test")
    fake_llm.on(agent="invoices", reply=FakeReply.text("paid"))
    request = AgentRequest(thread="default/t", turn=1, text="is my bill paid?")
    assert (await replica.run(request)).reply == "paid"
    closing = replica.__del__()
    assert closing is not None
    await closing
    with pytest.raises(RuntimeError, match="client has been closed"):
        await replica.run(request)


async def test_a_replica_that_fails_to_start_closes_what_it_opened(
    settings: Settings, postgres_url: str
) -> None:
    """Serve retries a failed replica; each attempt must not leave a memory pool behind."""
    async with PostgresMemoryStore.from_url(postgres_url, dimension=384) as store:
        await store.setup()
    before = await client_backends(postgres_url)
    data = memory_team()
    bookings = next(a for a in data["specialists"] if a["name"] == "bookings")
    bookings["tools"] = ["tests.unit.no_such_module:lookup"]  # not installed on this node
    team = TeamConfig.model_validate(data)
    replica = AgentDeployment.__new__(AgentDeployment)
    with pytest.raises(ToolError, match="cannot import"):
        await AgentDeployment.__init__(replica, "bookings", team, settings, None, "test")
    deadline = time.monotonic() + 30
    while await client_backends(postgres_url) > before:
        assert time.monotonic() < deadline, "the memory pool's connections stayed open"
        await asyncio.sleep(0.05)
    assert replica.__del__() is None


async def test_the_memory_pool_has_the_configured_size(
    settings: Settings, postgres_url: str
) -> None:
    """Replicas × pool_size must fit the server's max_connections: the size is the team's."""
    from contextlib import AsyncExitStack

    from serve_app.deployments import open_memory

    data = memory_team()
    data["memory"] = {**data.get("memory", {}), "pool_size": 3}
    team = TeamConfig.model_validate(data)
    async with AsyncExitStack() as stack:
        memory = await open_memory(team, settings, None, stack)
        assert memory is not None
        assert memory.store._pool.get_max_size() == 3  # type: ignore[attr-defined]
