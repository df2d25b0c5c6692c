"""The offline provider: no network, no keys, no language model.

The supervisor routes by semantic similarity between the user's message and each
specialist's name and description (all-MiniLM-L6-v2), answering with the same
``transfer_to_<agent>`` tool call an LLM would make. Specialists reply with a fixed text that
names the agent and says plainly that no model wrote it; when the message is clearly about
another specialist's topic, they hand over instead.
"""

from __future__ import annotations

import numpy as np

from memory.embedders import Embedder, cosine_scores
from providers.model import ChatMessage, ModelResponse, ToolCall, ToolSpec
from stickyray.config import AgentConfig, TeamConfig

__all__ = ["OfflineProvider", "agent_profile"]

TRANSFER_PREFIX = "transfer_to_"
RETURN_TOOL = "return_to_supervisor"


def agent_profile(agent: AgentConfig) -> str:
    """The text that stands for an agent when comparing it with a message."""
    return f"{agent.name.replace('_', ' ')}: {agent.description}"


class OfflineProvider:
    """A Provider that routes with embeddings and answers deterministically."""

    name = "offline"

    def __init__(
        self,
        agent: AgentConfig,
        team: TeamConfig,
        embedder: Embedder,
        switch_margin: float = 0.2,
    ) -> None:
        self._agent = agent
        self._team = team
        self._embedder = embedder
        self._switch_margin = switch_margin
        self._specialists = [s.name for s in team.specialists]
        self._profiles: np.ndarray | None = None

    async def _profile_matrix(self) -> np.ndarray:
        if self._profiles is None:
            texts = [agent_profile(self._team.agent(n)) for n in self._specialists]
            self._profiles = await self._embedder.embed(texts)
        return self._profiles

    async def scores(self, text: str) -> dict[str, float]:
        """Similarity of ``text`` to every specialist."""
        profiles = await self._profile_matrix()
        query = (await self._embedder.embed([text]))[0]
        sims = cosine_scores(query, profiles)
        return {name: float(s) for name, s in zip(self._specialists, sims, strict=True)}

    async def complete(
        self,
        *,
        agent: str,
        model: str,
        messages: list[ChatMessage],
        tools: list[ToolSpec],
        temperature: float | None,
        max_tokens: int | None = None,
    ) -> ModelResponse:
        last = messages[-1] if messages else None
        if last is not None and last.role == "tool":
            return self._reply(f"Tool results: {last.content}", model)
        text = next((m.content for m in reversed(messages) if m.role == "user"), "")
        offered = {t.name for t in tools}
        targets = [name for name in self._specialists if f"{TRANSFER_PREFIX}{name}" in offered]
        if agent == self._team.supervisor.name:
            return await self._route(text, targets, model)
        return await self._answer(agent, text, targets, RETURN_TOOL in offered, model)

    async def _route(self, text: str, targets: list[str], model: str) -> ModelResponse:
        if not targets or not text.strip():
            return self._reply(
                "Hello! I am the triage agent running offline. Tell me what you need help "
                "with and I will pass you to the right specialist.",
                model,
            )
        scores = await self.scores(text)
        best = max(targets, key=lambda n: scores[n])
        reason = f"offline router: closest to {best} (similarity {scores[best]:.2f})"
        return self._call(f"{TRANSFER_PREFIX}{best}", {"reason": reason}, model)

    async def _answer(
        self, agent: str, text: str, targets: list[str], can_return: bool, model: str
    ) -> ModelResponse:
        if (targets or can_return) and text.strip():
            scores = await self.scores(text)
            own = scores.get(agent, 0.0)
            other, best = max(
                ((n, s) for n, s in scores.items() if n != agent),
                key=lambda item: item[1],
                default=(None, own),
            )
            if other is not None and best - own >= self._switch_margin:
                reason = (
                    f"offline router: message is closer to {other} ({best:.2f}) "
                    f"than to {agent} ({own:.2f})"
                )
                if other in targets:
                    return self._call(f"{TRANSFER_PREFIX}{other}", {"reason": reason}, model)
                if can_return:
                    return self._call(RETURN_TOOL, {"reason": reason}, model)
        snippet = text if len(text) <= 200 else text[:197] + "..."
        return self._reply(
            f"[{agent}, offline mode] This is an automatic reply: no language model is "
            f'configured for the {agent} agent. I received: "{snippet}"',
            model,
        )

    @staticmethod
    def _reply(text: str, model: str) -> ModelResponse:
        return ModelResponse(text=text, model=model)

    @staticmethod
    def _call(name: str, arguments: dict[str, str], model: str) -> ModelResponse:
        return ModelResponse(
            tool_calls=[ToolCall(id=f"offline-{name}", name=name, arguments=arguments)],
            model=model,
        )

    async def aclose(self) -> None:
        return None
