"""The Ray Serve deployments behind the ingress: one per agent, plus the shared embedder.

The classes are plain; ``agent_deployment`` and ``embedder_deployment`` apply the Serve options
from ``agents.yaml`` so each agent scales on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import numpy as np
from ray import serve
from ray.serve import Deployment
from redis.asyncio import Redis

from actors.redis_store import connect_redis
from memory.embedders import Embedder, LocalEmbedder
from memory.long_term import SearchWeights
from memory.service import LongTermMemory
from providers.factory import build_provider, openai_embedder
from providers.offline import team_profiles
from providers.routing import EvidenceRouter
from serve_app.agent import Agent
from serve_app.agent_memory import AgentMemory, SummaryNotStored
from serve_app.deltas import DeltaWriter
from serve_app.tools import intent_tools, resolve_tools
from stickyray.agent_config import AgentConfig
from stickyray.config import EmbedderConfig, TeamConfig
from stickyray.errors import CompressionNotStored, ConfigError
from stickyray.metrics import record_model_calls
from stickyray.settings import Settings
from stickyray.turns import AgentRequest, AgentResult, CompressRequest, CompressResult, Usage

__all__ = [
    "EMBEDDER_DEPLOYMENT",
    "AgentDeployment",
    "EmbedderDeployment",
    "HandleEmbedder",
    "agent_deployment",
    "embedder_deployment",
    "open_memory",
]

log = logging.getLogger(__name__)

EMBEDDER_DEPLOYMENT = "Embedder"

R = TypeVar("R", AgentResult, CompressResult)


class HandleEmbedder:
    """An Embedder that asks the shared embedder deployment, so one process holds the model."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    @property
    def dimension(self) -> int:
        return 384

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        vectors: np.ndarray = await self._handle.embed.remote(list(texts))
        return vectors


class EmbedderDeployment:
    """Serves the local embedding model to every offline agent."""

    def __init__(self) -> None:
        self._embedder = LocalEmbedder()
        # Load the model now, so the first routed message does not pay for it.
        self._embedder.embed_sync(["warm up"])

    async def embed(self, texts: list[str]) -> np.ndarray:
        """Normalised embeddings of ``texts``."""
        vectors: np.ndarray = await self._embed_together(texts)
        return vectors

    # Requests that arrive together (many threads routing at once, as in a replay) share one
    # forward pass, which on CPU costs far less than the same texts one at a time.
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def _embed_together(self, requests: list[list[str]]) -> list[np.ndarray]:
        vectors = await self._embedder.embed([text for texts in requests for text in texts])
        bounds = np.cumsum([0] + [len(texts) for texts in requests])
        return [vectors[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


# The embedding calls made while one agent request is served, priced, so that they count in
# its turn's usage. None outside a request: the memory API's calls belong to no turn.
_EMBEDDING_SPEND: ContextVar[list[Usage] | None] = ContextVar("embedding_spend", default=None)


@contextmanager
def _embedding_spend() -> Iterator[list[Usage]]:
    """Collect what the embedding model spends inside the block (this task and its children)."""
    spent: list[Usage] = []
    token = _EMBEDDING_SPEND.set(spent)
    try:
        yield spent
    finally:
        _EMBEDDING_SPEND.reset(token)


def _plus(result: R, spent: list[Usage]) -> R:
    """``result`` with the embedding calls made for it added to its usage."""
    if not spent:
        return result
    return result.model_copy(update={"usage": sum(spent, result.usage)})


# The agent label of embedding calls made for the memory API, which no agent makes. Agent
# names cannot hold a hyphen, so it never mixes with one.
MEMORY_API_LABEL = "memory-api"


async def open_memory(
    team: TeamConfig,
    settings: Settings,
    embedder: Any | None,
    stack: AsyncExitStack,
    metric_labels: tuple[str, str] | None = None,
) -> LongTermMemory | None:
    """The team's long-term memory on ``DATABASE_URL``, or None when no agent uses memory.

    Connections close with ``stack``. With ``metric_labels`` (app, agent), paid embedding
    calls count in that agent's model metrics, under the embedding model's name. Those made
    while an agent request is served count in its result's usage too.
    """
    if not team.uses_memory:
        return None
    if not settings.database_url:
        raise ConfigError("long-term memory needs DATABASE_URL (the CLI sets it when embedded)")
    config = team.memory
    from memory.postgres import PostgresMemoryStore

    store = await stack.enter_async_context(
        PostgresMemoryStore.from_url(
            settings.database_url, dimension=config.embedding_dimension, pool_size=config.pool_size
        )
    )
    vectors: Embedder
    if config.embedder == "openai":
        price = team.embedding_price()

        def on_usage(usage: Usage) -> None:
            if price is not None:
                usage = price.charge(usage)
            if metric_labels is not None:
                record_model_calls(*metric_labels, config.embedding_model, usage)
            spent = _EMBEDDING_SPEND.get()
            if spent is not None:
                spent.append(usage)

        vectors = openai_embedder(config, settings, stack, on_usage)
    else:
        assert embedder is not None, "build_app binds the embedder for local memory"
        vectors = HandleEmbedder(embedder)
    weights = SearchWeights(
        similarity=config.similarity_weight,
        recency=config.recency_weight,
        importance=config.importance_weight,
    )
    return LongTermMemory(store, vectors, weights, config.max_core_blocks)


class AgentDeployment:
    """One agent of the team, answering AgentRequests from thread actors."""

    async def __init__(  # type: ignore[misc]
        self,
        agent_name: str,
        team: TeamConfig,
        settings: Settings,
        embedder: Any | None,
        app_name: str,
    ) -> None:
        self._stack = AsyncExitStack()
        self._closed = False
        config = team.agent(agent_name)
        self._metric_labels = (app_name, agent_name, config.model_name)
        self._price = team.price_of(agent_name)
        self._redis_url = settings.redis_url
        self._redis: Redis | None = None  # opened by the first streamed reply
        provider = build_provider(
            config, team, settings, HandleEmbedder(embedder) if embedder is not None else None
        )
        self._stack.push_async_callback(provider.aclose)
        memory = None
        try:
            if config.memory is not None:
                long_term = await open_memory(
                    team, settings, embedder, self._stack, (app_name, agent_name)
                )
                assert long_term is not None
                memory = AgentMemory(config, long_term)
            # A tool module missing on this node fails here, on every restart Serve tries.
            tools = resolve_tools(config.tools) + intent_tools(config)
            router = None
            if team.prechecks(agent_name):
                router = EvidenceRouter(HandleEmbedder(embedder), team_profiles(team))
            self._agent = Agent(config, team, provider, tools, memory, router)
        except BaseException:
            self._closed = True
            await self._stack.aclose()  # Serve runs no destructor for a replica that never started
            raise

    def __del__(self) -> Coroutine[Any, Any, None] | None:
        """Close the provider's and memory's connections, once.

        Serve awaits what this returns when it stops the replica. Not ``async def``: the
        garbage collector calls it again later, and then gets None rather than a coroutine
        nobody awaits.
        """
        if getattr(self, "_closed", True):
            return None
        self._closed = True
        return self._stack.aclose()

    async def run(self, request: AgentRequest) -> AgentResult:
        """Run the agent loop for one request.

        Its usage is the chat model's plus the embedding model's (memory searches and writes);
        each was counted in the metrics under its own model.
        """
        writer = self._writer(request)
        model_failed = False  # the chat model's provider, not memory: what the metric counts
        try:
            with _embedding_spend() as spent:
                on_text = writer.write if writer is not None else None
                try:
                    result = self._charged(await self._agent.run(request, on_text))
                    model_failed = result.failed
                except Exception as exc:
                    if not spent:
                        raise
                    # Paid embeddings (a memory search before the store failed): the turn
                    # fails as it would with the error, but keeps what it cost.
                    log.warning("agent %s: %s: %s", self._metric_labels[1], type(exc).__name__, exc)
                    result = AgentResult(
                        agent=self._metric_labels[1],
                        failed=True,
                        error=f"{type(exc).__name__}: {exc}",
                    )
        finally:
            if writer is not None:
                await writer.close()
        record_model_calls(*self._metric_labels, result.usage, model_failed)
        return _plus(result, spent)

    def _writer(self, request: AgentRequest) -> DeltaWriter | None:
        """Where the reply's text goes as it is written, when the caller streams it."""
        if request.stream_to is None or self._redis_url is None:
            return None
        if self._redis is None:
            self._redis = connect_redis(self._redis_url)
            self._stack.push_async_callback(self._redis.aclose)
        return DeltaWriter(self._redis, request.stream_to, self._metric_labels[1])

    async def compress(self, request: CompressRequest) -> CompressResult:
        """Keep messages leaving a thread's buffer as an episodic memory."""
        with _embedding_spend() as spent:
            try:
                result = self._charged(await self._agent.compress(request))
            except Exception as exc:
                # What was paid for (the summary, its embedding) counts here and in the
                # thread's turn. Still an error, so that any thread (one started by an earlier
                # release too) keeps the messages and tries again.
                paid = Usage()
                cause: BaseException | None = exc
                if isinstance(exc, SummaryNotStored):
                    paid = self._priced(exc.usage)
                    record_model_calls(*self._metric_labels, paid)
                    cause = exc.__cause__
                elif not spent:
                    raise
                paid = sum(spent, paid)
                reason = f"{type(cause).__name__}: {cause}"
                raise CompressionNotStored(reason, paid.model_dump()) from None
        record_model_calls(*self._metric_labels, result.usage)
        return _plus(result, spent)

    def _charged(self, result: R) -> R:
        """``result`` with the cost of its usage, when the team sets pricing."""
        if self._price is None:
            return result
        return result.model_copy(update={"usage": self._priced(result.usage)})

    def _priced(self, usage: Usage) -> Usage:
        if self._price is None:
            return usage
        return self._price.charge(usage)


def agent_deployment(config: AgentConfig) -> Deployment:
    """The Serve deployment of ``config``, named after the agent, with its scaling settings."""
    options: dict[str, Any] = {
        "name": config.name,
        "max_ongoing_requests": config.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": config.num_cpus},
    }
    if config.autoscaling_config is not None:
        options["autoscaling_config"] = config.autoscaling_config.model_dump(exclude_none=True)
    else:
        options["num_replicas"] = config.num_replicas or 1
    return serve.deployment(**options)(AgentDeployment)


def embedder_deployment(config: EmbedderConfig) -> Deployment:
    """The shared embedder, scaled as ``embedder:`` in agents.yaml says."""
    return serve.deployment(
        name=EMBEDDER_DEPLOYMENT,
        num_replicas=config.num_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.num_cpus},
    )(EmbedderDeployment)
