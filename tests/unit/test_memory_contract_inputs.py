"""The memory store contract at the edges of its inputs: both stores take, give back and
refuse the same things (huge vectors, numbers in metadata, names Postgres cannot hold)."""

# ruff: noqa: F811 (the tests take the contract's fixtures by name)

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from memory.long_term import NewMemory
from tests.unit.test_memory_contract import (  # noqa: F401 (clock and store are fixtures)
    DIM,
    Store,
    axis,
    clock,
    scope,
    stack,
    store,
)


async def test_embeddings_of_any_finite_size_are_normalised(store: Store) -> None:
    tenant, user = scope()
    huge = axis(2) * np.float32(1e20)  # its squares overflow float32
    await store.add(
        tenant, user, [NewMemory(content="a"), NewMemory(content="huge")], stack([axis(0), huge])
    )
    vast = axis(3).astype(np.float64) * 1e300  # its squares overflow float64
    await store.add(tenant, user, [NewMemory(content="vast")], vast)
    for query, content in ((huge, "huge"), (vast, "vast"), (axis(0), "a")):
        hits = await store.search(tenant, user, query, k=3)
        assert hits[0].memory.content == content
        assert hits[0].similarity == pytest.approx(1.0, abs=1e-5)
        assert [hit.similarity for hit in hits[1:]] == pytest.approx([0.0, 0.0], abs=1e-5)


async def test_metadata_numbers_come_back_as_jsonb_keeps_them(store: Store) -> None:
    """jsonb keeps decimals: 1e16 has no digits after the point, so it is an integer."""
    tenant, user = scope()
    given: dict[str, Any] = {
        "big": 1e16,
        "huge": 1.5e300,
        "zero": -0.0,
        "tenth": 0.1,
        "one": 1.0,
        "tiny": 1e-7,
        "nested": [2.5e20, {"half": 12.5, "count": 3}],
    }
    kept = given | {"big": 10**16, "huge": 15 * 10**299, "zero": 0.0}
    kept["nested"] = [25 * 10**19, {"half": 12.5, "count": 3}]
    (added,) = await store.add(tenant, user, [NewMemory(content="m", metadata=given)], axis(0))
    (hit,) = await store.search(tenant, user, axis(0), k=1)

    def exactly(value: dict[str, Any]) -> str:  # an int is not a float here, nor 0.0 -0.0
        return json.dumps(value, sort_keys=True)

    assert exactly(added.metadata) == exactly(hit.memory.metadata) == exactly(kept)


@pytest.mark.parametrize("field", ["tenant", "user_id", "agent"])
async def test_names_postgres_cannot_hold_are_refused_by_both(store: Store, field: str) -> None:
    tenant, user = scope()
    names = {"tenant": tenant, "user_id": user, "agent": "bookings"}
    names[field] = "bo\x00ok"
    t, u, a = names["tenant"], names["user_id"], names["agent"]
    calls: list[Callable[[], Any]] = [
        lambda: store.add(t, u, [NewMemory(content="x", agent=a)], axis(0)),
        lambda: store.search(t, u, axis(0), k=1, agent=a),
    ]
    if field != "agent":
        calls += [
            lambda: store.delete(t, u, "00000000-0000-0000-0000-000000000000"),
            lambda: store.get_core(t, u),
            lambda: store.put_core(t, u, "notes", "x", 10),
            lambda: store.delete_core(t, u, "notes"),
        ]
    for call in calls:
        with pytest.raises(ValueError, match=f"^{field} must not contain NUL"):
            await call()
    with pytest.raises(ValueError, match="^label must not contain NUL"):
        await store.delete_core(tenant, user, "no\x00tes")


async def test_a_k_or_a_core_limit_past_what_postgres_counts(store: Store) -> None:
    tenant, user = scope()
    await store.add(
        tenant, user, [NewMemory(content="a"), NewMemory(content="b")], stack([axis(0), axis(1)])
    )
    assert len(await store.search(tenant, user, axis(0), k=2**62)) == 2
    block = await store.put_core(tenant, user, "notes", "x", 2**31 - 1)
    assert block.limit == 2**31 - 1
    with pytest.raises(ValueError, match="limit must be from 1 to 2147483647, got 2147483648"):
        await store.put_core(tenant, user, "notes", "x", 2**31)
