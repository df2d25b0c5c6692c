"""The team configuration (``agents.yaml``): one supervisor, its specialists, thread settings.

Each agent is an ``AgentConfig`` (``stickyray.agent_config``). Every model forbids unknown
keys, so a typo is an error that names the field instead of a silently ignored setting.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from stickyray.agent_config import AgentConfig, ModelName, StrictModel
from stickyray.config_files import format_errors, read_yaml
from stickyray.errors import ConfigError
from stickyray.webhooks import normalize_prefix

if TYPE_CHECKING:
    from stickyray.turns import Usage

__all__ = [
    "MAX_TTL_S",
    "EmbedderConfig",
    "IngressConfig",
    "MemoryConfig",
    "ModelPrice",
    "RoutingConfig",
    "RunsConfig",
    "TeamConfig",
    "ThreadsConfig",
    "load_config",
    "parse_config",
    "sample_config_path",
]

# Redis refuses an expiry past its clock's range ("invalid expire time") on every write: a
# retention is at most ten years.
MAX_TTL_S = 10 * 365 * 24 * 3600


class ThreadsConfig(StrictModel):
    """How thread actors keep conversations."""

    buffer_size: int = Field(default=20, ge=1, le=10_000)
    max_handoffs_per_turn: int = Field(default=3, ge=0, le=10)
    max_message_bytes: int = Field(default=16 * 1024, ge=1)
    # Retention: a thread's stored state lives this long after its last turn. At least an
    # hour, and longer than idle_timeout_s: state expiring under a thread still open (idle,
    # or running a long turn) would be gone mid-turn, and the turn run again from nothing.
    checkpoint_ttl_s: int = Field(default=30 * 24 * 3600, ge=3600, le=MAX_TTL_S)
    # A retried message id returns its first reply for this long.
    message_id_ttl_s: int = Field(default=24 * 3600, ge=1, le=MAX_TTL_S)
    # Passivation: an actor idle this long checkpoints and exits; at most this many live
    # thread actors per node, the least recently used making room for new ones. At most 30
    # days: the node's live set expires twice this later, in milliseconds (actors/liveness.py).
    idle_timeout_s: float = Field(default=300.0, gt=0, le=30 * 24 * 3600)
    max_live_threads: int = Field(default=1000, ge=1)
    # Hosting: "actor" gives every thread its own named actor (an OS process); "pooled" keeps
    # threads as objects inside `pool_size` named host actors, a thread's host chosen by a hash
    # of its key. Pooled trades per-thread process isolation for cheap activation, which pays
    # for many short conversations (replays). `max_live_threads` then caps each host.
    hosting: Literal["actor", "pooled"] = "actor"
    pool_size: int = Field(default=4, ge=1, le=1024)

    @model_validator(mode="after")
    def _retention_outlives_idle_threads(self) -> ThreadsConfig:
        if self.checkpoint_ttl_s <= self.idle_timeout_s:
            idle = self.idle_timeout_s
            raise ValueError(
                f"checkpoint_ttl_s ({self.checkpoint_ttl_s}) must be above idle_timeout_s "
                f"({int(idle) if idle.is_integer() else idle}): a thread's stored state would "
                "expire while its actor still holds it open; raise checkpoint_ttl_s (an hour "
                "at least, 30 days by default) or lower idle_timeout_s"
            )
        return self


class MemoryConfig(StrictModel):
    """Long-term memory for the whole team: the embedder and how search scores combine."""

    embedder: Literal["local", "openai"] = "local"
    embedding_model: ModelName = "text-embedding-3-small"
    # Unset: the model's own size (1536 for OpenAI's small and ada models), not asked for.
    # Set: asked for (text-embedding-3 models shorten their vectors). At most 2000, the most
    # pgvector's HNSW index takes.
    dimension: int | None = Field(default=None, ge=1, le=2000)
    similarity_weight: float = Field(default=1.0, ge=0)
    recency_weight: float = Field(default=0.2, ge=0)
    importance_weight: float = Field(default=0.1, ge=0)
    # Connections each ingress and agent replica may open; keep replicas x pool_size under
    # the server's max_connections (100 for the embedded one, 3 of them kept for superusers).
    pool_size: int = Field(default=10, ge=1, le=100)
    # Core blocks per user: all of them are in every prompt of an agent with memory.
    max_core_blocks: int = Field(default=20, ge=1, le=1000)

    @property
    def embedding_dimension(self) -> int:
        """384 for the local model; the configured (default 1536) for OpenAI."""
        if self.embedder == "local":
            return 384
        return self.dimension or 1536

    @property
    def embedder_id(self) -> str:
        """The model the store's vectors come from: a store filled by another is refused."""
        if self.embedder == "local":
            return "local/all-MiniLM-L6-v2"
        return f"openai/{self.embedding_model}"

    @model_validator(mode="after")
    def _check(self) -> MemoryConfig:
        if self.embedder == "local" and self.dimension not in (None, 384):
            raise ValueError("the local embedder (all-MiniLM-L6-v2) gives 384 dimensions")
        return self


class RoutingConfig(StrictModel):
    """Switch detection for specialists backed by a language model."""

    # Before each model call, a specialist runs the offline evidence router over the recent
    # user messages and hands over at once when the user has clearly moved on: no model call
    # is spent on a message that belongs elsewhere. Needs the local embedding model.
    precheck: bool = False


class IngressConfig(StrictModel):
    """Scaling of the HTTP ingress deployment."""

    num_replicas: int = Field(default=1, ge=1)
    max_ongoing_requests: int = Field(default=500, ge=1)


class RunsConfig(StrictModel):
    """Queued runs: messages answered in the background (POST /v1/threads/{id}/runs)."""

    # Runs of different threads that the run worker delivers at once.
    max_in_flight: int = Field(default=16, ge=1, le=1000)
    # Runs waiting or running; more get a 429.
    max_queued: int = Field(default=10_000, ge=1, le=1_000_000)
    # A finished run's record (status and turn) is kept this long.
    result_ttl_s: int = Field(default=24 * 3600, ge=60, le=MAX_TTL_S)
    # A run whose delivery keeps failing with an outage this long fails with the last error
    # (an outage that never ends is a misconfiguration), letting its thread's next runs go.
    give_up_after_s: float = Field(default=3600.0, gt=0)
    # A reply to a channel (Telegram, WhatsApp) that the channel keeps refusing for now
    # (an outage, rate limits) this long is dropped, and its run's record says why.
    reply_give_up_after_s: float = Field(default=600.0, gt=0)
    # URLs that a run's webhook_url may name (scheme, host and port, and a path at or under
    # the given one); none: runs take no webhook_url. The run worker calls nothing else.
    webhook_urls: list[str] = Field(default_factory=list, max_length=100)

    @field_validator("webhook_urls")
    @classmethod
    def _prefixes(cls, urls: list[str]) -> list[str]:
        checked = []
        for n, url in enumerate(urls):
            try:
                checked.append(normalize_prefix(url))
            except ValueError as exc:
                raise ValueError(f"[{n}] {url!r} {exc}") from None
        return checked


class EmbedderConfig(StrictModel):
    """Scaling of the shared local embedding model (offline routing, pre-checks, memory)."""

    num_replicas: int = Field(default=1, ge=1)
    # One replica batches what reaches it together, so it takes many requests at once.
    max_ongoing_requests: int = Field(default=256, ge=1)
    # 0 fits the model beside everything else on a small machine; give each replica a
    # CPU of its own where there are CPUs to spare.
    num_cpus: float = Field(default=0.0, ge=0)


class ModelPrice(StrictModel):
    """What a model costs, in US dollars per million tokens: input, output, and input read
    from or written to the vendor's prompt cache (the input price when not given)."""

    input: float = Field(ge=0, le=100_000, allow_inf_nan=False)
    output: float = Field(ge=0, le=100_000, allow_inf_nan=False)
    cached_input: float | None = Field(default=None, ge=0, le=100_000, allow_inf_nan=False)
    cache_write: float | None = Field(default=None, ge=0, le=100_000, allow_inf_nan=False)

    def charge(self, usage: Usage) -> Usage:
        """``usage`` with its cost at this price."""
        return usage.priced(self.input, self.output, self.cached_input, self.cache_write)


class TeamConfig(StrictModel):
    """The whole ``agents.yaml``."""

    supervisor: AgentConfig
    specialists: list[AgentConfig] = Field(min_length=1)
    threads: ThreadsConfig = ThreadsConfig()
    memory: MemoryConfig = MemoryConfig()
    routing: RoutingConfig = RoutingConfig()
    ingress: IngressConfig = IngressConfig()
    embedder: EmbedderConfig = EmbedderConfig()
    runs: RunsConfig = RunsConfig()
    # Prices by model name (as agents name it). Set, every model an agent uses must have one,
    # so that a cost is never a sum that silently leaves calls out.
    pricing: dict[str, ModelPrice] | None = None

    @model_validator(mode="after")
    def _check_pricing(self) -> TeamConfig:
        if self.pricing is None:
            return self
        for agent in self.agents:
            if agent.provider != "offline" and agent.model not in self.pricing:
                raise ValueError(
                    f"pricing: no price for model {agent.model!r} (agent {agent.name!r}); add "
                    f"`{agent.model}: {{input: ..., output: ...}}` (US dollars per million "
                    "tokens), or remove pricing"
                )
        model = self.memory.embedding_model
        if self.uses_memory and self.memory.embedder == "openai" and model not in self.pricing:
            raise ValueError(
                f"pricing: no price for the embedding model {model!r} (memory.embedding_model); "
                f"add `{model}: {{input: ..., output: 0}}` (US dollars per million tokens), or "
                "remove pricing"
            )
        return self

    def embedding_price(self) -> ModelPrice | None:
        """The price of long-term memory's embedding model; None when the team sets no
        pricing. The local model costs nothing."""
        if self.pricing is None:
            return None
        if self.memory.embedder == "local":
            return ModelPrice(input=0, output=0)
        # Required when an agent uses memory; without one nothing embeds.
        return self.pricing.get(self.memory.embedding_model)

    def price_of(self, name: str) -> ModelPrice | None:
        """The price of agent ``name``'s model; None when the team sets no pricing.

        The offline provider calls no paid model: it costs nothing.
        """
        if self.pricing is None:
            return None
        agent = self.agent(name)
        if agent.provider == "offline" or agent.model is None:
            return ModelPrice(input=0, output=0)
        return self.pricing[agent.model]

    @model_validator(mode="after")
    def _check_windows(self) -> TeamConfig:
        # The thread keeps at most buffer_size messages, whichever agent is active: a longer
        # window would never fill.
        size = self.threads.buffer_size
        for agent in self.agents:
            window = agent.memory.short_window if agent.memory is not None else None
            if window is not None and window > size:
                raise ValueError(
                    f"agent {agent.name!r}: memory.short_window ({window}) is larger than "
                    f"threads.buffer_size ({size}), the most messages a thread keeps: lower "
                    "short_window or raise buffer_size"
                )
        return self

    @model_validator(mode="after")
    def _check_names(self) -> TeamConfig:
        names = [self.supervisor.name, *(s.name for s in self.specialists)]
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ValueError(f"agent name {name!r} is used twice")
            seen.add(name)
        specialists = {s.name for s in self.specialists}
        for agent in [self.supervisor, *self.specialists]:
            for target in agent.handoffs or []:
                if target == agent.name:
                    raise ValueError(f"agent {agent.name!r} lists itself in handoffs")
                if target == self.supervisor.name:
                    raise ValueError(
                        f"agent {agent.name!r} lists the supervisor {target!r} in handoffs: "
                        "a specialist hands back with return_to_supervisor "
                        "(can_return_to_supervisor), which needs no handoff"
                    )
                if target not in specialists:
                    raise ValueError(
                        f"agent {agent.name!r} hands off to unknown agent {target!r}; "
                        f"known specialists: {', '.join(sorted(specialists))}"
                    )
        return self

    @property
    def agents(self) -> list[AgentConfig]:
        """Supervisor first, then specialists in file order."""
        return [self.supervisor, *self.specialists]

    def agent(self, name: str) -> AgentConfig:
        """The agent called ``name``; KeyError if there is none."""
        for agent in self.agents:
            if agent.name == name:
                return agent
        raise KeyError(name)

    def handoff_targets(self, name: str) -> list[str]:
        """Who ``name`` may hand to; the supervisor defaults to every specialist."""
        agent = self.agent(name)
        if agent.handoffs is not None:
            return list(agent.handoffs)
        if agent.name == self.supervisor.name:
            return [s.name for s in self.specialists]
        return []

    @property
    def uses_memory(self) -> bool:
        """Whether any agent has long-term memory (so a database is needed)."""
        return any(a.memory is not None for a in self.agents)

    def prechecks(self, name: str) -> bool:
        """Whether specialist ``name`` runs the routing pre-check before its model."""
        agent = self.agent(name)
        # One that can neither hand over nor return could not act on the check: skip its cost.
        can_move = bool(self.handoff_targets(name)) or self.can_return(name)
        return (
            self.routing.precheck
            and name != self.supervisor.name
            and agent.provider != "offline"
            and can_move
        )

    @property
    def needs_embedder(self) -> bool:
        """Whether the app must run the local embedding model (offline agents, local memory,
        routing pre-checks)."""
        return any(a.provider == "offline" or self.prechecks(a.name) for a in self.agents) or (
            self.uses_memory and self.memory.embedder == "local"
        )

    def buffer_limit(self, active: str | None) -> int:
        """How many messages the thread keeps while ``active`` (None = supervisor) answers."""
        agent = self.agent(active) if active else self.supervisor
        if agent.memory is not None and agent.memory.short_window is not None:
            return min(agent.memory.short_window, self.threads.buffer_size)
        return self.threads.buffer_size

    def can_return(self, name: str) -> bool:
        """Whether ``name`` offers the return_to_supervisor tool."""
        return name != self.supervisor.name and self.agent(name).can_return_to_supervisor


def sample_config_path() -> Path:
    """The shipped customer-assistant configuration used when no config is given."""
    return Path(str(resources.files("stickyray") / "sample_agents.yaml"))


def parse_config(data: Any, source: Path) -> TeamConfig:
    """Validate already-parsed YAML/JSON data; errors name ``source`` and the field."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        return TeamConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(source, exc)) from None


def load_config(path: Path | str | None = None) -> TeamConfig:
    """Load and validate ``agents.yaml``; ``None`` loads the shipped sample."""
    source = Path(path) if path is not None else sample_config_path()
    data = read_yaml(source)
    if data is None:
        raise ConfigError(f"{source}: the file is empty: it needs a supervisor and specialists")
    return parse_config(data, source)
