"""Builds the Provider an agent's configuration asks for."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack

from memory.embedders import Embedder, LocalEmbedder, OpenAIEmbedder
from providers.model import Provider
from stickyray.agent_config import AgentConfig
from stickyray.config import MemoryConfig, TeamConfig
from stickyray.errors import ConfigError
from stickyray.settings import Settings
from stickyray.turns import Usage

__all__ = ["build_provider", "check_providers", "openai_embedder"]


def check_providers(team: TeamConfig, settings: Settings) -> None:
    """Fail before anything starts when a provider lacks its API key or its packages."""
    offline = [a.name for a in team.agents if a.provider == "offline"]
    if team.needs_embedder and not offline:
        offline.append("the local embedder (memory or routing.precheck)")
    if offline and not LocalEmbedder.installed():
        raise ConfigError(
            f"agents {', '.join(offline)} use provider offline, which needs the local "
            f"embedding model: {LocalEmbedder.INSTALL_HINT}"
        )
    if team.uses_memory and team.memory.embedder == "openai" and settings.openai_api_key is None:
        raise ConfigError("memory.embedder openai needs OPENAI_API_KEY")
    for agent in team.agents:
        if agent.provider == "openai" and settings.openai_api_key is None:
            raise ConfigError(f"agent {agent.name!r} uses provider openai: set OPENAI_API_KEY")
        if agent.provider == "anthropic" and settings.anthropic_api_key is None:
            raise ConfigError(
                f"agent {agent.name!r} uses provider anthropic: set ANTHROPIC_API_KEY"
            )


def build_provider(
    agent: AgentConfig, team: TeamConfig, settings: Settings, embedder: Embedder | None
) -> Provider:
    """The provider for ``agent``; the SDK clients import only when used."""
    if agent.provider == "openai":
        from providers.openai_provider import OpenAIProvider

        assert settings.openai_api_key is not None, "checked by check_providers"
        return OpenAIProvider.from_settings(
            api_key=settings.openai_api_key.get_secret_value(),
            base_url=settings.openai_base_url,
            timeout_s=settings.llm_timeout_s,
            max_retries=settings.llm_max_retries,
        )
    if agent.provider == "anthropic":
        from providers.anthropic_provider import AnthropicProvider

        assert settings.anthropic_api_key is not None, "checked by check_providers"
        return AnthropicProvider.from_settings(
            api_key=settings.anthropic_api_key.get_secret_value(),
            base_url=settings.anthropic_base_url,
            timeout_s=settings.llm_timeout_s,
            max_retries=settings.llm_max_retries,
        )
    from providers.offline import OfflineProvider

    if embedder is None:
        raise ConfigError(f"agent {agent.name!r} uses provider offline but no embedder is running")
    return OfflineProvider(agent, team, embedder)


def openai_embedder(
    memory: MemoryConfig,
    settings: Settings,
    stack: AsyncExitStack,
    on_usage: Callable[[Usage], None] | None = None,
) -> OpenAIEmbedder:
    """The OpenAI embedder ``memory`` names, on a client that closes with ``stack``;
    ``on_usage`` is told what each request spent."""
    import openai

    if settings.openai_api_key is None:
        raise ConfigError("memory.embedder openai needs OPENAI_API_KEY")
    client = openai.AsyncOpenAI(
        api_key=settings.openai_api_key.get_secret_value(),
        base_url=settings.openai_base_url,
        timeout=settings.llm_timeout_s,
        max_retries=settings.llm_max_retries,
    )
    stack.push_async_callback(client.close)
    return OpenAIEmbedder(
        client,
        memory.embedding_model,
        memory.embedding_dimension,
        shorten=memory.dimension is not None,
        on_usage=on_usage,
    )
