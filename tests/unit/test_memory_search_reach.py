"""A search whose index candidates do not reach as far as recency and importance could lift
a memory: both stores find the k best by score, and Postgres looks at the index's next
candidates before it scores every row of the user."""

# ruff: noqa: F811 (the tests take the contract's fixtures by name)

from __future__ import annotations

from typing import Any

import asyncpg
import numpy as np
import pytest

from memory.long_term import NewMemory
from tests.unit.test_memory_contract import (  # noqa: F401 (clock and store are fixtures)
    DIM,
    Store,
    clock,
    scope,
    store,
)

ROWS = 300
LIFTED = 60  # its importance lifts it above the 60 more similar memories


def memories() -> tuple[np.ndarray, np.ndarray, list[NewMemory]]:
    """A query in a direction of its own (the session's database holds other tests' axis
    vectors) and ROWS memories at cosine 0.9, 0.899, ... from it, all of importance 0 but
    one of importance 1."""
    rng = np.random.default_rng(5)
    query = rng.normal(size=DIM)
    query /= np.linalg.norm(query)
    rows = []
    for i in range(ROWS):
        aside = rng.normal(size=DIM)
        aside -= (aside @ query) * query
        aside /= np.linalg.norm(aside)
        cos = 0.9 - 0.001 * i
        rows.append(cos * query + np.sqrt(1 - cos**2) * aside)
    news = [NewMemory(content=f"m{i}", importance=1.0 if i == LIFTED else 0.0) for i in range(ROWS)]
    return query.astype(np.float32), np.stack(rows).astype(np.float32), news


async def test_a_memory_lifted_from_beyond_the_candidates_is_found_in_the_next_ones(
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tenant, user = scope()
    query, vectors, news = memories()
    await store.add(tenant, user, news, vectors)
    sql: list[str] = []
    fetch = asyncpg.connection.Connection.fetch

    async def recording(self: Any, statement: str, *args: Any, **kw: Any) -> Any:
        sql.append(statement)
        return await fetch(self, statement, *args, **kw)

    monkeypatch.setattr(asyncpg.connection.Connection, "fetch", recording)
    # k=1: 40 candidates reach cosine 0.861; the k-th score less recency and importance's
    # most is 0.84 + 0.2 + 0.1 - 0.3 = 0.84, so rows down to 0.84 could still win.
    (hit,) = await store.search(tenant, user, query, k=1)
    assert hit.memory.content == f"m{LIFTED}"
    assert hit.similarity == pytest.approx(0.9 - 0.001 * LIFTED, abs=1e-4)
    # The index's next candidates (down to 0.701) reach far enough: no row-by-row scan.
    assert not [s for s in sql if "(embedding <=> $3) <=" in s]
