"""One contract for every long-term memory store: in-memory and Postgres (pgvector, pgserver).

The Postgres store shares the session's database with every other test, so each test works
in a tenant of its own; the Postgres-only tests at the end cover setup and outages.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import numpy as np
import pytest

from memory.embedded_postgres import EmbeddedPostgres
from memory.in_memory import InMemoryMemoryStore
from memory.long_term import MemoryStore, NewMemory, SearchWeights
from memory.migrations import MIGRATIONS
from memory.postgres import PostgresMemoryStore, init_connection
from stickyray.errors import CoreBlocksFull, StoreUnavailable

DIM = 384
Store = InMemoryMemoryStore | PostgresMemoryStore


class Clock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = datetime(2025, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["memory", "postgres"])
async def store(request: pytest.FixtureRequest, clock: Clock) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield InMemoryMemoryStore(DIM, clock=clock)
        return
    url = request.getfixturevalue("postgres_url")
    async with PostgresMemoryStore.from_url(url, DIM, pool_size=2, clock=clock) as pg:
        await pg.setup()
        yield pg


def scope() -> tuple[str, str]:
    """A tenant no other test uses, and a user."""
    return f"tenant-{uuid.uuid4().hex[:10]}", "user-1"


def axis(i: int) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[i] = 1.0
    return v


def tilted(cos: float, j: int) -> np.ndarray:
    """A unit vector at cosine ``cos`` from axis 0, leaning towards axis ``j``."""
    return (cos * axis(0) + np.sqrt(1.0 - cos**2) * axis(j)).astype(np.float32)


def stack(vectors: list[np.ndarray]) -> np.ndarray:
    return np.stack(vectors).astype(np.float32)


def contents(hits: list) -> list[str]:
    return [hit.memory.content for hit in hits]


async def test_store_satisfies_the_protocol(store: Store) -> None:
    assert isinstance(store, MemoryStore)
    assert store.dimension == DIM


async def test_add_returns_records_that_search_finds(store: Store, clock: Clock) -> None:
    tenant, user = scope()
    new = [
        NewMemory(content="likes tea", kind="episodic", agent="bookings", importance=0.3),
        NewMemory(content="is vegan", metadata={"source": "chat", "turn": 2}),
    ]
    records = await store.add(tenant, user, new, stack([axis(0), axis(1)]) * 3.0)
    assert [(r.tenant, r.user_id, r.content, r.kind) for r in records] == [
        (tenant, user, "likes tea", "episodic"),
        (tenant, user, "is vegan", "semantic"),
    ]
    assert records[0].agent == "bookings" and records[0].importance == 0.3
    assert records[1].metadata == {"source": "chat", "turn": 2}
    assert {r.created_at for r in records} == {clock.now} == {r.last_accessed_at for r in records}
    assert [r.access_count for r in records] == [0, 0] and records[0].id != records[1].id

    (hit,) = await store.search(tenant, user, axis(1), k=1)
    assert hit.similarity == pytest.approx(1.0, abs=1e-5)  # stored rows were normalised
    assert hit.memory.model_copy(update={"access_count": 0}) == records[1]


async def test_a_memory_id_is_stored_once(store: Store, clock: Clock) -> None:
    tenant, user = scope()
    key = str(uuid.uuid4())
    (first,) = await store.add(tenant, user, [NewMemory(id=key, content="first")], stack([axis(0)]))
    assert first.id == key
    clock.advance(hours=1)
    # Stored again (a retried write): the first is kept, and returned, beside a new one.
    again, other = await store.add(
        tenant,
        user,
        [NewMemory(id=key.upper(), content="second"), NewMemory(content="other")],
        stack([axis(1), axis(2)]),
    )
    assert again == first and other.content == "other"
    assert contents(await store.search(tenant, user, axis(0), k=5)) == ["first", "other"]
    for t, u in [(scope()[0], user), (tenant, "user-2")]:
        with pytest.raises(ValueError, match="taken by another tenant or user"):
            await store.add(t, u, [NewMemory(id=key, content="theirs")], stack([axis(0)]))
        assert await store.search(t, u, axis(0), k=5) == []
    with pytest.raises(ValueError):
        NewMemory(id="not-a-uuid", content="x")


async def test_search_returns_exactly_k_best_first(store: Store) -> None:
    tenant, user = scope()
    cosines = [0.99 - 0.015 * i for i in range(60)]
    await store.add(
        tenant,
        user,
        [NewMemory(content=f"m{i}") for i in range(60)],
        stack([tilted(c, i + 1) for i, c in enumerate(cosines)]),
    )
    hits = await store.search(tenant, user, axis(0), k=10)
    assert contents(hits) == [f"m{i}" for i in range(10)]
    assert [h.similarity for h in hits] == pytest.approx(cosines[:10], abs=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    for k in (1, 25, 60):
        assert len(await store.search(tenant, user, axis(0), k=k)) == k
    assert len(await store.search(tenant, user, axis(0), k=100)) == 60
    # More candidates than one HNSW scan may yield (pgvector allows ef_search up to 1000).
    assert len(await store.search(tenant, user, axis(0), k=300)) == 60
    assert await store.search(tenant, user, axis(0), k=0) == []
    assert await store.search(tenant, "nobody", axis(0), k=5) == []


async def test_the_k_best_are_by_score_not_only_by_similarity(store: Store, clock: Clock) -> None:
    tenant, user = scope()
    # Sixty old, unimportant chats close to the query fill every index pass...
    old = [NewMemory(content=f"old chat {i}", kind="episodic", importance=0.0) for i in range(60)]
    await store.add(tenant, user, old, stack([tilted(0.80 + i * 0.001, i + 1) for i in range(60)]))
    clock.advance(days=365)
    # ...and a less similar fact, which never decays and matters, scores above them all.
    fact = [NewMemory(content="is vegetarian", kind="semantic", importance=1.0)]
    await store.add(tenant, user, fact, stack([tilted(0.70, 100)]))
    hits = await store.search(tenant, user, axis(0), k=3)
    assert contents(hits)[0] == "is vegetarian"
    assert contents(hits)[1:] == ["old chat 59", "old chat 58"]


async def test_the_best_score_is_found_among_thousands_more_similar(store: Store) -> None:
    tenant, user = scope()
    # More close, unimportant chats than any pass over the most similar rows would read...
    chats = [NewMemory(content=f"chat {i}", importance=0.0) for i in range(2100)]
    await store.add(tenant, user, chats, stack([tilted(0.90, 1 + i % 300) for i in range(2100)]))
    # ...and a fact a little less similar, which importance lifts above every one of them.
    fact = [NewMemory(content="is vegetarian", kind="semantic", importance=1.0)]
    await store.add(tenant, user, fact, stack([tilted(0.85, 350)]))
    assert contents(await store.search(tenant, user, axis(0), k=1)) == ["is vegetarian"]


async def test_similarity_weight_zero_ranks_by_the_other_weights(store: Store) -> None:
    tenant, user = scope()
    near = [NewMemory(content=f"near {i}", importance=0.0) for i in range(50)]
    await store.add(tenant, user, near, stack([tilted(0.95, i + 1) for i in range(50)]))
    far = [NewMemory(content=f"far {i}", importance=1.0) for i in range(3)]
    await store.add(tenant, user, far, stack([tilted(0.10, 100 + i) for i in range(3)]))
    weights = SearchWeights(similarity=0.0, recency=0.2, importance=1.0)
    hits = await store.search(tenant, user, axis(0), k=3, weights=weights)
    assert sorted(contents(hits)) == ["far 0", "far 1", "far 2"]
    assert [h.similarity for h in hits] == pytest.approx([0.10] * 3, abs=1e-4)


async def test_kind_filter_still_returns_k(store: Store) -> None:
    tenant, user = scope()
    # Sixty near semantic memories crowd the few far episodic ones out of any index pass.
    near = [NewMemory(content=f"fact {i}") for i in range(60)]
    far = [NewMemory(content=f"event {i}", kind="episodic") for i in range(12)]
    vectors = [tilted(0.95 - 0.001 * i, i + 1) for i in range(60)]
    vectors += [tilted(0.2 - 0.01 * i, 100 + i) for i in range(12)]
    await store.add(tenant, user, near + far, stack(vectors))

    episodic = await store.search(tenant, user, axis(0), k=10, kinds=["episodic"])
    assert contents(episodic) == [f"event {i}" for i in range(10)]
    semantic = await store.search(tenant, user, axis(0), k=10, kinds=["semantic"])
    assert {h.memory.kind for h in semantic} == {"semantic"} and len(semantic) == 10
    both = await store.search(tenant, user, axis(0), k=72, kinds=["episodic", "semantic"])
    assert len(both) == 72


async def test_agent_filter_keeps_that_agent_and_agentless(store: Store) -> None:
    tenant, user = scope()
    new, vectors = [], []
    for n, (agent, cos) in enumerate([("billing", 0.95), ("bookings", 0.6), (None, 0.3)]):
        for i in range(5):
            new.append(NewMemory(content=f"{agent}-{i}", agent=agent))
            vectors.append(tilted(cos - 0.01 * i, 10 * n + i + 1))
    await store.add(tenant, user, new, stack(vectors))

    hits = await store.search(tenant, user, axis(0), k=10, agent="bookings")
    assert contents(hits) == [f"bookings-{i}" for i in range(5)] + [f"None-{i}" for i in range(5)]
    assert len(await store.search(tenant, user, axis(0), k=15)) == 15
    assert len(await store.search(tenant, user, axis(0), k=15, agent="bookings")) == 10


async def test_tenants_and_users_see_only_their_own(store: Store) -> None:
    tenant, user = scope()
    other_tenant, _ = scope()
    scopes = [(tenant, user), (tenant, "user-2"), (other_tenant, user)]
    for t, u in scopes:
        await store.add(t, u, [NewMemory(content=f"{t}/{u}")], stack([axis(0)]))
    for t, u in scopes:
        hits = await store.search(t, u, axis(0), k=10)
        assert contents(hits) == [f"{t}/{u}"]
        assert (hits[0].memory.tenant, hits[0].memory.user_id) == (t, u)

    await store.put_core(tenant, user, "persona", "mine", 100)
    assert await store.get_core(other_tenant, user) == []
    assert await store.get_core(tenant, "user-2") == []


@pytest.mark.parametrize("kind", ["episodic", "semantic"])
async def test_only_episodic_memories_decay(store: Store, clock: Clock, kind: str) -> None:
    tenant, user = scope()
    await store.add(tenant, user, [NewMemory(content="old", kind=kind)], stack([tilted(0.8, 1)]))
    clock.advance(days=30)  # one default half-life
    await store.add(tenant, user, [NewMemory(content="new", kind=kind)], stack([tilted(0.8, 2)]))

    hits = await store.search(tenant, user, axis(0), k=2)
    by_content = {h.memory.content: h.score for h in hits}
    if kind == "episodic":
        assert contents(hits) == ["new", "old"]
        # 0.8 similarity + 0.2 * recency + 0.1 * 0.5 importance; recency halves in 30 days.
        assert by_content == pytest.approx({"new": 1.05, "old": 0.95}, abs=1e-4)
    else:
        assert by_content == pytest.approx({"new": 1.05, "old": 1.05}, abs=1e-4)


async def test_importance_weighs_in(store: Store) -> None:
    tenant, user = scope()
    new = [
        NewMemory(content="important", importance=0.9),
        NewMemory(content="trivial", importance=0.1),
    ]
    await store.add(tenant, user, new, stack([tilted(0.80, 1), tilted(0.82, 2)]))
    assert contents(await store.search(tenant, user, axis(0), k=2)) == ["important", "trivial"]
    unweighted = SearchWeights(importance=0.0)
    hits = await store.search(tenant, user, axis(0), k=2, weights=unweighted)
    assert contents(hits) == ["trivial", "important"]


async def test_delete(store: Store) -> None:
    tenant, user = scope()
    other, _ = scope()
    kept, gone = await store.add(
        tenant, user, [NewMemory(content="kept"), NewMemory(content="gone")], stack([axis(0)] * 2)
    )
    assert await store.delete(tenant, user, gone.id) is True
    assert await store.delete(tenant, user, gone.id) is False
    assert contents(await store.search(tenant, user, axis(0), k=5)) == ["kept"]
    assert await store.delete(other, user, kept.id) is False  # another tenant's id
    assert await store.delete(tenant, "user-2", kept.id) is False  # another user's id
    assert await store.delete(tenant, user, "not-a-uuid") is False
    assert await store.delete(tenant, user, str(uuid.uuid4())) is False
    assert contents(await store.search(tenant, user, axis(0), k=5)) == ["kept"]


async def test_delete_takes_any_form_of_the_id(store: Store) -> None:
    tenant, user = scope()
    records = await store.add(
        tenant, user, [NewMemory(content=f"m{i}") for i in range(3)], stack([axis(0)] * 3)
    )
    forms = [
        records[0].id.upper(),
        "{" + records[1].id + "}",
        records[2].id.replace("-", ""),
    ]
    assert [await store.delete(tenant, user, form) for form in forms] == [True] * 3
    assert await store.search(tenant, user, axis(0), k=5) == []


async def test_core_blocks(store: Store, clock: Clock) -> None:
    tenant, user = scope()
    assert await store.get_core(tenant, user) == []
    await store.put_core(tenant, user, "user_profile", "Name: Ana", 50)
    persona = await store.put_core(tenant, user, "persona", "helpful", 100)
    assert (persona.label, persona.value, persona.limit, persona.updated_at) == (
        "persona",
        "helpful",
        100,
        clock.now,
    )
    clock.advance(minutes=5)
    replaced = await store.put_core(tenant, user, "user_profile", "Name: Ana Lopez", 60)
    assert await store.get_core(tenant, user) == [persona, replaced]
    assert (replaced.limit, replaced.updated_at) == (60, clock.now)

    with pytest.raises(ValueError, match=r"'persona'.*limit of 100"):
        await store.put_core(tenant, user, "persona", "x" * 101, 100)
    with pytest.raises(ValueError):
        await store.put_core(tenant, user, "Not A Label", "x", 100)
    assert await store.get_core(tenant, user) == [persona, replaced]

    assert await store.delete_core(tenant, "user-2", "persona") is False  # another user's
    assert await store.delete_core(tenant, user, "persona") is True
    assert await store.delete_core(tenant, user, "persona") is False
    assert await store.get_core(tenant, user) == [replaced]


async def test_at_most_max_blocks_core_blocks_even_when_written_at_once(store: Store) -> None:
    """Two replicas' turns adding a block each for one user must not both pass the count."""
    tenant, user = scope()
    labels = [f"note_{i}" for i in range(6)]
    # Every pooled connection open first, so that the writes below really overlap.
    await asyncio.gather(*(store.get_core(tenant, user) for _ in labels))
    results = await asyncio.gather(
        *(store.put_core(tenant, user, label, "x", 10, max_blocks=1) for label in labels),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    full = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, CoreBlocksFull) for r in full), full
    (kept,) = await store.get_core(tenant, user)
    assert "replace one of: " + kept.label in str(full[0])

    replaced = await store.put_core(tenant, user, kept.label, "y", 10, max_blocks=1)
    assert await store.get_core(tenant, user) == [replaced]  # replacing is not one more
    await store.put_core(tenant, "user-2", "note_0", "z", 10, max_blocks=1)  # per user


async def test_hits_count_as_accesses(store: Store, clock: Clock) -> None:
    tenant, user = scope()
    created = clock.now
    await store.add(
        tenant, user, [NewMemory(content="a"), NewMemory(content="b")], stack([axis(0), axis(1)])
    )
    clock.advance(hours=1)
    await store.search(tenant, user, axis(0), k=1)
    clock.advance(hours=1)
    (hit,) = await store.search(tenant, user, axis(0), k=1)
    assert (hit.memory.content, hit.memory.access_count) == ("a", 2)
    assert (hit.memory.created_at, hit.memory.last_accessed_at) == (created, clock.now)
    (hit,) = await store.search(tenant, user, axis(1), k=1)
    assert (hit.memory.content, hit.memory.access_count) == ("b", 1)  # misses did not count


async def test_embeddings_must_have_the_store_width(store: Store) -> None:
    tenant, user = scope()
    one = [NewMemory(content="x")]
    with pytest.raises(ValueError, match="384-dimensional"):
        await store.add(tenant, user, one, np.ones((1, 16), dtype=np.float32))
    with pytest.raises(ValueError, match="1 memories but 2 embeddings"):
        await store.add(tenant, user, one, stack([axis(0), axis(1)]))
    with pytest.raises(ValueError, match="zero"):
        await store.add(tenant, user, one, np.zeros((1, DIM), dtype=np.float32))
    with pytest.raises(ValueError, match="384-dimensional"):
        await store.search(tenant, user, np.ones(16, dtype=np.float32), k=1)


# Postgres only: setup and outages.


async def test_setup_refuses_another_dimension(postgres_url: str) -> None:
    async with PostgresMemoryStore.from_url(postgres_url, DIM) as store:
        await store.setup()
    async with PostgresMemoryStore.from_url(postgres_url, 1536) as store:
        with pytest.raises(ValueError, match="store holds 384-dimensional embeddings, embedder"):
            await store.setup()


async def test_concurrent_setups_apply_each_migration_once(postgres_url: str) -> None:
    schema = f"setup_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(postgres_url)
    await admin.execute(f"CREATE SCHEMA {schema}")
    try:
        # Unqualified names resolve to the empty schema first; `vector` still lives in public.
        pool = await asyncpg.create_pool(
            postgres_url,
            min_size=4,
            max_size=4,
            init=init_connection,
            server_settings={"search_path": f"{schema}, public"},
        )
        try:
            stores = [PostgresMemoryStore(pool, 8) for _ in range(4)]
            await asyncio.gather(*(s.setup() for s in stores))
            versions = await pool.fetch(f"SELECT version FROM {schema}.stickyray_migrations")
            assert sorted(r["version"] for r in versions) == [m.version for m in MIGRATIONS]
            tenant, user = scope()
            await stores[0].add(tenant, user, [NewMemory(content="x")], np.ones((1, 8)))
            assert len(await stores[1].search(tenant, user, np.ones(8), k=1)) == 1
        finally:
            await pool.close()
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


async def test_unreachable_postgres_is_store_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="postgres is unavailable"):
        async with PostgresMemoryStore.from_url(f"postgresql://x@/db?host={tmp_path}"):
            pass


async def test_postgres_going_away_is_store_unavailable(tmp_path: Path) -> None:
    pytest.importorskip("pgserver")
    server = EmbeddedPostgres(tmp_path / "pg")
    try:
        async with PostgresMemoryStore.from_url(server.start(), DIM) as store:
            await store.setup()
            tenant, user = scope()
            await store.add(tenant, user, [NewMemory(content="x")], stack([axis(0)]))
            server.stop()
            with pytest.raises(StoreUnavailable):
                await store.search(tenant, user, axis(0), k=1)
    finally:
        server.stop()


async def test_a_memory_deleted_during_a_search_is_left_out(postgres_url: str) -> None:
    tenant, user = scope()
    doomed: list[str] = []

    class DeletingClock(Clock):
        """Commits a delete from another connection when the search reads the time, which
        is between its SELECT and its access-count UPDATE."""

        def __call__(self) -> datetime:
            if doomed:
                memory_id = doomed.pop()

                async def delete() -> None:
                    async with PostgresMemoryStore.from_url(postgres_url, DIM) as other:
                        assert await other.delete(tenant, user, memory_id)

                worker = threading.Thread(target=asyncio.run, args=(delete(),))
                worker.start()
                worker.join()
            return self.now

    async with PostgresMemoryStore.from_url(postgres_url, DIM, clock=DeletingClock()) as pg:
        await pg.setup()
        both = [NewMemory(content="kept"), NewMemory(content="gone")]
        _, gone = await pg.add(tenant, user, both, stack([axis(0), axis(0)]))
        doomed.append(gone.id)
        hits = await pg.search(tenant, user, axis(0), k=2)
    assert contents(hits) == ["kept"]


def on_database(url: str, database: str) -> str:
    """``url`` with another database name."""
    return urlsplit(url)._replace(path=f"/{database}").geturl()


async def test_pgvector_installed_in_its_own_schema_works(
    embedded_postgres: EmbeddedPostgres,
) -> None:
    """As managed Postgres services do: the extension in an `extensions` schema."""
    database = f"ext_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(embedded_postgres.admin_url)
    try:
        await admin.execute(f"CREATE DATABASE {database} OWNER stickyray")
    finally:
        await admin.close()
    setup = await asyncpg.connect(on_database(embedded_postgres.admin_url, database))
    try:
        await setup.execute(
            "CREATE SCHEMA extensions; CREATE EXTENSION vector SCHEMA extensions;"
            " GRANT USAGE ON SCHEMA extensions TO stickyray;"
            f' ALTER DATABASE {database} SET search_path = "$user", public, extensions'
        )
    finally:
        await setup.close()
    url = on_database(embedded_postgres.url, database)
    async with PostgresMemoryStore.from_url(url, 4) as pg:
        await pg.setup()
        tenant, user = scope()
        await pg.add(tenant, user, [NewMemory(content="x")], np.eye(4, dtype=np.float32)[:1])
        (hit,) = await pg.search(tenant, user, np.eye(4, dtype=np.float32)[0], k=1)
    assert hit.memory.content == "x"


async def test_a_pool_without_the_vector_codec_fails_setup_clearly(postgres_url: str) -> None:
    from stickyray.errors import ConfigError

    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
    try:
        with pytest.raises(ConfigError, match="init=memory.postgres.init_connection"):
            await PostgresMemoryStore(pool, DIM).setup()
    finally:
        await pool.close()
