"""The store knows which model embedded its memories, and `reembed` moves them to another.

Each test gets a database of its own on the session's Postgres, since the record is one per
database. Two "models" here are seeded text hashes: what the mechanics need is two embedders
whose vectors differ for the same text (the CLI test uses the real models).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import numpy as np
import openai
import pytest

from memory.embedded_postgres import EmbeddedPostgres, prepare_database
from memory.embedders import LocalEmbedder, OpenAIEmbedder
from memory.long_term import NewMemory
from memory.postgres import PostgresMemoryStore, init_connection
from memory.reembed import reembed
from memory.service import LongTermMemory
from stickyray.cli import main
from stickyray.config import load_config
from stickyray.errors import ConfigError
from stickyray.testing import FakeLLMServer


class HashEmbedder:
    """Deterministic unit vectors from (seed, text): one seed, one "model"."""

    def __init__(self, seed: str, dimension: int) -> None:
        self.seed = seed
        self._dimension = dimension

    @property
    def dimension(self) -> int:
        return self._dimension

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for text in texts:
            digest = hashlib.sha256(f"{self.seed}:{text}".encode()).digest()
            v = np.random.default_rng(int.from_bytes(digest[:8], "big")).normal(
                size=self._dimension
            )
            rows.append(v / np.linalg.norm(v))
        return np.asarray(rows, dtype=np.float32)


def on_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


@dataclass
class Database:
    url: str  # the application role
    admin_url: str  # the superuser


@pytest.fixture
async def database(embedded_postgres: EmbeddedPostgres) -> AsyncIterator[Database]:
    name = f"reembed_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(embedded_postgres.admin_url)
    try:
        await admin.execute(f"CREATE DATABASE {name} OWNER stickyray")
        db = Database(
            on_database(embedded_postgres.url, name), on_database(embedded_postgres.admin_url, name)
        )
        # pgvector 0.6 is not trusted: only a superuser creates it (as the embedded one does).
        setup = await asyncpg.connect(db.admin_url)
        await setup.execute("CREATE EXTENSION vector")
        await setup.close()
        yield db
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def set_up(url: str, model: str, dimension: int) -> None:
    async with PostgresMemoryStore.from_url(url, dimension, embedder_id=model) as store:
        await store.setup()


async def remember(url: str, embedder: HashEmbedder, tenant: str, texts: list[str]) -> None:
    async with PostgresMemoryStore.from_url(url, embedder.dimension) as store:
        await store.add(
            tenant, "u", [NewMemory(content=t) for t in texts], await embedder.embed(texts)
        )


async def top_hit(url: str, embedder: HashEmbedder, tenant: str, text: str) -> tuple[str, float]:
    async with PostgresMemoryStore.from_url(url, embedder.dimension) as store:
        (vector,) = await embedder.embed([text])
        hit = (await store.search(tenant, "u", vector, k=1))[0]
    return hit.memory.content, hit.similarity


async def admin_reembed(
    db: Database,
    embedder: HashEmbedder,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> int | None:
    conn = await asyncpg.connect(db.admin_url)
    try:
        return await reembed(conn, embedder, f"test/{embedder.seed}", batch_size, progress)
    finally:
        await conn.close()


async def test_setup_records_its_model_and_refuses_another(database: Database) -> None:
    await set_up(database.url, "test/a", 8)
    await set_up(database.url, "test/a", 8)  # the same model again: fine
    with pytest.raises(ConfigError, match=r"embedded by test/a \(8 dimensions\).*test/b \(8\)"):
        await set_up(database.url, "test/b", 8)
    with pytest.raises(ConfigError, match="stickyray memory reembed"):
        await set_up(database.url, "test/a", 16)


async def test_a_store_from_before_the_record_is_taken_as_the_model_of_its_width(
    database: Database,
) -> None:
    async with PostgresMemoryStore.from_url(database.url, 8) as store:
        await store.setup()  # no model named: what a store of the previous release has
    with pytest.raises(ConfigError, match=r"were embedded \(8 dimensions\).*test/b \(16\)"):
        await set_up(database.url, "test/b", 16)
    await set_up(database.url, "test/a", 8)  # recorded now
    with pytest.raises(ConfigError, match="embedded by test/a"):
        await set_up(database.url, "test/b", 8)


async def test_reembed_moves_every_tenant_resumes_and_rebuilds_the_index(
    database: Database,
) -> None:
    old, new = HashEmbedder("a", 8), HashEmbedder("b", 8)
    await set_up(database.url, "test/a", 8)
    first = [f"first tenant's memory {i}" for i in range(10)]
    second = [f"second tenant's memory {i}" for i in range(7)]
    await remember(database.url, old, "t1", first)
    await remember(database.url, old, "t2", second)

    class Stop(Exception):
        pass

    def crash_after_two_batches(done: int, total: int) -> None:
        assert total == 17
        if done >= 8:
            raise Stop

    with pytest.raises(Stop):
        await admin_reembed(database, new, batch_size=4, progress=crash_after_two_batches)
    for model in ("test/a", "test/b"):
        with pytest.raises(ConfigError, match="re-embedding .* with test/b did not finish"):
            await set_up(database.url, model, 8)
    # A server still running the old model writes one more memory meanwhile.
    await remember(database.url, old, "t1", ["written during the move"])

    # And one during the next run, whose id sorts before every id the run has passed.
    early = "00000000-0000-4000-8000-000000000001"

    class WritesDuringTheRun(HashEmbedder):
        calls = 0

        async def embed(self, texts: Sequence[str]) -> np.ndarray:
            self.calls += 1
            if self.calls == 2:
                async with PostgresMemoryStore.from_url(database.url, 8) as store:
                    (vector,) = await old.embed(["written behind the run"])
                    await store.add(
                        "t2",
                        "u",
                        [NewMemory(id=early, content="written behind the run")],
                        vector[None],
                    )
            return await super().embed(texts)

    seen: list[tuple[int, int]] = []
    done = await admin_reembed(
        database, WritesDuringTheRun("b", 8), batch_size=4, progress=lambda *p: seen.append(p)
    )
    assert done == 18 - 8 + 1  # the first run's two batches are kept; the late one is added
    assert seen[-1] == (18, 18)
    await set_up(database.url, "test/b", 8)
    with pytest.raises(ConfigError, match="embedded by test/b"):
        await set_up(database.url, "test/a", 8)
    for tenant, text in [
        ("t1", first[3]),
        ("t2", second[6]),
        ("t1", "written during the move"),
        ("t2", "written behind the run"),
    ]:
        found, similarity = await top_hit(database.url, new, tenant, text)
        assert found == text
        assert similarity == pytest.approx(1.0, abs=1e-5)

    conn = await asyncpg.connect(database.url)
    try:
        await init_connection(conn)
        columns = await conn.fetch(
            "SELECT attname, attnotnull FROM pg_attribute WHERE attrelid = 'memories'::regclass"
            " AND attname LIKE 'embedding%' AND NOT attisdropped"
        )
        assert [tuple(c) for c in columns] == [("embedding", True)]
        index = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'memories_embedding_idx'"
        )
        assert "hnsw (embedding vector_cosine_ops)" in index
        # The application role still owns and writes what the superuser's run touched.
        await remember(database.url, new, "t2", ["after the move"])
    finally:
        await conn.close()
    assert await admin_reembed(database, new) is None  # nothing left to do


async def test_reembed_upgrades_a_store_of_the_previous_release_as_its_owner(
    database: Database,
) -> None:
    old, new = HashEmbedder("a", 8), HashEmbedder("b", 8)
    await set_up(database.url, "test/a", 8)
    await remember(database.url, old, "t1", ["kept"])
    admin = await asyncpg.connect(database.admin_url)
    try:  # the schema as the release before the record left it
        await admin.execute("DROP TABLE stickyray_embedder")
        await admin.execute("DELETE FROM stickyray_migrations WHERE version = 4")
        assert await admin_reembed(database, new) == 1
        owner = await admin.fetchval(
            "SELECT tableowner FROM pg_tables WHERE tablename = 'stickyray_embedder'"
        )
        assert owner == "stickyray"  # not the superuser that ran the step
    finally:
        await admin.close()
    await set_up(database.url, "test/b", 8)
    assert (await top_hit(database.url, new, "t1", "kept"))[0] == "kept"


async def test_reembed_with_the_old_model_drops_an_unfinished_move(database: Database) -> None:
    old, new = HashEmbedder("a", 8), HashEmbedder("b", 8)
    await set_up(database.url, "test/a", 8)
    await remember(database.url, old, "t1", [f"memory {i}" for i in range(5)])

    def crash(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await admin_reembed(database, new, batch_size=2, progress=crash)
    with pytest.raises(ConfigError, match=r"with test/b did not finish.*or with test/a"):
        await set_up(database.url, "test/a", 8)
    assert await admin_reembed(database, old) is None
    await set_up(database.url, "test/a", 8)
    assert (await top_hit(database.url, old, "t1", "memory 3"))[0] == "memory 3"


async def test_an_embedder_giving_the_wrong_vectors_stops_the_run(database: Database) -> None:
    class Short(HashEmbedder):
        async def embed(self, texts: Sequence[str]) -> np.ndarray:
            return (await super().embed(texts))[:-1]

    await set_up(database.url, "test/a", 8)
    await remember(database.url, HashEmbedder("a", 8), "t1", ["one", "two"])
    with pytest.raises(ValueError, match="gave 1 vectors of 8 dimensions for 2 texts"):
        await admin_reembed(database, Short("b", 8))
    assert await admin_reembed(database, HashEmbedder("b", 8)) == 2  # nothing was swapped


@pytest.mark.parametrize("scale", [0.0, 1e20])
async def test_reembedded_vectors_are_checked_and_normalised(
    database: Database, scale: float
) -> None:
    class Scaled(HashEmbedder):
        async def embed(self, texts: Sequence[str]) -> np.ndarray:
            return (await super().embed(texts)) * np.float32(scale)

    await set_up(database.url, "test/a", 8)
    await remember(database.url, HashEmbedder("a", 8), "t1", ["one", "two"])
    if scale == 0.0:  # cosine is undefined: stored, it would make every search's scores NaN
        with pytest.raises(ValueError, match="zero vectors"):
            await admin_reembed(database, Scaled("b", 8))
        return
    assert await admin_reembed(database, Scaled("b", 8)) == 2
    await set_up(database.url, "test/b", 8)
    hit = await top_hit(database.url, HashEmbedder("b", 8), "t1", "two")
    assert hit == ("two", pytest.approx(1.0, abs=1e-5))


async def test_reembed_to_another_width(database: Database) -> None:
    old, new = HashEmbedder("a", 8), HashEmbedder("c", 16)
    await set_up(database.url, "test/a", 8)
    await remember(database.url, old, "t1", ["one", "two", "three"])
    assert await admin_reembed(database, new) == 3
    await set_up(database.url, "test/c", 16)
    assert await top_hit(database.url, new, "t1", "two") == ("two", pytest.approx(1.0, abs=1e-5))


def with_search_path(url: str, schema: str) -> str:
    """``url`` whose sessions have ``schema`` as their search_path."""
    return f"{url}{'&' if '?' in url else '?'}search_path={schema}"


async def test_reembed_finds_the_store_in_the_roles_own_schema(database: Database) -> None:
    """With a schema named after the role, `"$user"` puts the tables there, off the
    superuser's search_path."""
    admin = await asyncpg.connect(database.admin_url)
    try:
        await admin.execute("CREATE SCHEMA stickyray AUTHORIZATION stickyray")
        old, new = HashEmbedder("a", 8), HashEmbedder("c", 16)
        await set_up(database.url, "test/a", 8)
        await remember(database.url, old, "t1", ["one", "two"])
        assert await admin.fetchval("SELECT to_regclass('memories')") is None
        assert await reembed(admin, new, "test/c") == 2
        assert await admin.fetchval("SHOW search_path") == '"$user", public'  # as it was
    finally:
        await admin.close()
    await set_up(database.url, "test/c", 16)
    assert (await top_hit(database.url, new, "t1", "two"))[0] == "two"


async def test_reembed_moves_only_the_store_its_search_path_names(database: Database) -> None:
    admin = await asyncpg.connect(database.admin_url)
    try:
        await admin.execute("CREATE SCHEMA stickyray AUTHORIZATION stickyray")
    finally:
        await admin.close()
    old, new = HashEmbedder("a", 8), HashEmbedder("b", 8)
    in_public = with_search_path(database.url, "public")
    for url in (database.url, in_public):
        await set_up(url, "test/a", 8)
        await remember(url, old, "t1", ["one"])
    with pytest.raises(ConfigError, match=r"in 2 schemas \(public, stickyray\).*search_path"):
        await admin_reembed(database, new)
    chosen = Database(database.url, with_search_path(database.admin_url, "stickyray,public"))
    assert await admin_reembed(chosen, new) == 1
    await set_up(database.url, "test/b", 8)
    await set_up(in_public, "test/a", 8)  # the other store is as it was


async def test_reembed_is_refused_where_it_cannot_move_everything(database: Database) -> None:
    embedder = HashEmbedder("b", 8)
    conn = await asyncpg.connect(database.admin_url)
    try:
        with pytest.raises(ConfigError, match="no memories to re-embed"):
            await reembed(conn, embedder, "test/b")
    finally:
        await conn.close()
    await set_up(database.url, "test/a", 8)
    conn = await asyncpg.connect(database.url)
    try:
        with pytest.raises(ConfigError, match="row-level security hides them"):
            await reembed(conn, embedder, "test/b")
    finally:
        await conn.close()
    holder = await asyncpg.connect(database.admin_url)
    conn = await asyncpg.connect(database.admin_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", 0x5374_6963_6B79_0002)
        with pytest.raises(ConfigError, match="another re-embedding"):
            await reembed(conn, embedder, "test/b")
    finally:
        await holder.close()
        await conn.close()


AGENTS_YAML = """
supervisor: {name: triage, description: Routes conversations., provider: openai, model: m}
specialists:
  - {name: bookings, description: Bookings., provider: openai, model: m,
     memory: {short_window: 6, top_k: 3}}
memory: {embedder: openai, embedding_model: text-embedding-3-small, dimension: 64}
"""


def test_the_command_moves_local_memories_to_openai(
    database: Database,
    fake_llm: FakeLLMServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    local = LocalEmbedder()
    texts = ["my passport number is X123", "I am allergic to peanuts", "I live in Lisbon"]

    async def fill() -> None:
        await set_up(database.url, "local/all-MiniLM-L6-v2", 384)
        async with PostgresMemoryStore.from_url(database.url, 384) as store:
            vectors = await local.embed(texts)
            for i, text in enumerate(texts):
                await store.add(f"t{i}", "u", [NewMemory(content=text)], vectors[i : i + 1])

    asyncio.run(fill())
    config = tmp_path / "agents.yaml"
    config.write_text(AGENTS_YAML)
    new_id = load_config(config).memory.embedder_id
    assert new_id == "openai/text-embedding-3-small"
    # What `stickyray serve` does first with the new config: refused, and told what to run.
    with pytest.raises(ConfigError, match="local/all-MiniLM-L6-v2 .*stickyray memory reembed"):
        prepare_database(database.url, tmp_path / "unused", 64, new_id)

    for name, value in {
        "DATABASE_URL": database.admin_url,
        "OPENAI_API_KEY": "k",
        "OPENAI_BASE_URL": fake_llm.openai_base_url,
        "STICKYRAY_DATA_DIR": str(tmp_path),
    }.items():
        monkeypatch.setenv(name, value)
    assert main(["memory", "reembed", "--config", str(config), "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "re-embedded 3 of 3 memories" in out
    assert "now embedded by openai/text-embedding-3-small (3 re-embedded)" in out
    # Two batches: two paid requests, whose tokens the fake server counts as OpenAI does.
    spent = re.search(r"embedding model took (\d+) tokens in 2 requests \(add it to", out)
    assert spent is not None and int(spent[1]) > 0

    # With a price for the model, the cost too (moving back to local, then to openai again).
    local_yaml = tmp_path / "local.yaml"
    openai_memory = (
        "memory: {embedder: openai, embedding_model: text-embedding-3-small, dimension: 64}"
    )
    local_yaml.write_text(AGENTS_YAML.replace(openai_memory, "memory: {embedder: local}"))
    assert main(["memory", "reembed", "--config", str(local_yaml)]) == 0
    assert "tokens in" not in capsys.readouterr().out  # the local model costs nothing
    priced = tmp_path / "priced.yaml"
    priced.write_text(
        AGENTS_YAML + "pricing: {m: {input: 1, output: 1}, "
        "text-embedding-3-small: {input: 20000, output: 0}}\n"
    )
    assert main(["memory", "reembed", "--config", str(priced), "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    spent = re.search(r"took (\d+) tokens in 2 requests, \$([0-9.]+) at agents.yaml's pricing", out)
    assert spent is not None and float(spent[2]) == pytest.approx(int(spent[1]) * 20000 / 1e6)

    prepare_database(database.url, tmp_path / "unused", 64, new_id)
    with pytest.raises(ConfigError, match="embedded by openai/text-embedding-3-small"):
        prepare_database(database.url, tmp_path / "unused", 384, "local/all-MiniLM-L6-v2")

    async def recall(tenant: str, query: str) -> str:
        client = openai.AsyncOpenAI(base_url=fake_llm.openai_base_url, api_key="k")
        async with PostgresMemoryStore.from_url(database.url, 64) as store:
            memory = LongTermMemory(store, OpenAIEmbedder(client, dimension=64, shorten=True))
            (hit,) = await memory.recall(tenant, "u", query, k=1)
        await client.close()
        return hit.memory.content

    assert asyncio.run(recall("t1", texts[1])) == texts[1]
    assert main(["memory", "reembed", "--config", str(config)]) == 0
    assert "already; nothing to do" in capsys.readouterr().out


def test_the_command_refuses_while_a_server_holds_its_embedded_postgres(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("STICKYRAY_DATA_DIR", str(tmp_path))
    # What a serving stickyray does with the embedded Postgres, whatever its Redis.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from memory.embedded_postgres import EmbeddedPostgres as P; "
            f"p = P(__import__('pathlib').Path({str(tmp_path / 'postgres')!r})); p.start(); "
            "print('up', flush=True); sys.stdin.read(); p.stop()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "up"
        assert main(["memory", "reembed"]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another process (pid {holder.pid})" in err
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)
