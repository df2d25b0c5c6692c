"""The offline provider: no network, no keys, no language model.

Routing uses the evidence router (``providers.routing``) over a local embedding model: the
supervisor routes a thread on its user messages so far and answers with the same
``transfer_to_<agent>`` tool call an LLM would make; a specialist checks the recent user
messages for accumulated evidence that the user moved on, and hands over (directly when it
may, else back to the supervisor, naming the agent it suggests). Otherwise specialists reply
with a fixed text that names the agent and says plainly that no model wrote it.
"""

from __future__ import annotations

import re

from memory.embedders import Embedder
from providers.model import (
    ChatMessage,
    ModelResponse,
    TextSink,
    ToolCall,
    ToolChoice,
    ToolSpec,
)
from providers.routing import AgentProfile, EvidenceRouter, IntentProfile, in_words
from stickyray.agent_config import AgentConfig
from stickyray.config import TeamConfig

__all__ = ["OfflineProvider", "team_profiles"]

TRANSFER_PREFIX = "transfer_to_"
RETURN_TOOL = "return_to_supervisor"
# How an agent's system prompt says the thread was handed to it within the turn.
HANDOFF_NOTE = "The conversation was handed to you because:"
# A specialist handing back names the agent it found; the supervisor takes the hint, so a
# switch costs one supervisor call and cannot ping-pong.
_SUGGESTED = re.compile(r"\[suggested: ([a-z][a-z0-9_]*)\]")


def team_profiles(team: TeamConfig) -> list[AgentProfile]:
    """What the router knows of each specialist: names, descriptions, intents, slots."""
    return [_profile(agent) for agent in team.specialists]


def _profile(agent: AgentConfig) -> AgentProfile:
    intents = tuple(
        IntentProfile(
            name=intent.name,
            description=intent.description,
            slots=tuple(
                _slot_text(agent, slot) for slot in [*intent.required_slots, *intent.optional_slots]
            ),
        )
        for intent in agent.intents
    )
    return AgentProfile(
        name=agent.name,
        description=agent.description,
        intents=intents,
        slots=tuple(_slot_text(agent, slot) for slot in agent.slots),
    )


def _slot_text(agent: AgentConfig, slot: str) -> str:
    # A slot without a description (an agents.json entry's gives "", or only spaces) is
    # embedded as its name in words, as the routing benchmark does: an empty text would match
    # nothing. A name with no words in it ("_1") is embedded as it is.
    return (agent.slots.get(slot) or "").strip() or in_words(slot) or slot


class OfflineProvider:
    """A Provider that routes with embeddings and answers deterministically."""

    name = "offline"

    def __init__(self, agent: AgentConfig, team: TeamConfig, embedder: Embedder) -> None:
        self._agent = agent
        self._team = team
        self.router = EvidenceRouter(embedder, team_profiles(team))

    async def complete(
        self,
        *,
        agent: str,
        model: str,
        messages: list[ChatMessage],
        tools: list[ToolSpec],
        temperature: float | None,
        max_tokens: int | None = None,
        tool_choice: ToolChoice = "auto",
        on_text: TextSink | None = None,
    ) -> ModelResponse:
        response = await self._complete(agent, model, messages, tools, tool_choice)
        if on_text is not None and response.text:
            await on_text(response.text)  # no model to stream: the reply comes whole
        return response

    async def _complete(
        self,
        agent: str,
        model: str,
        messages: list[ChatMessage],
        tools: list[ToolSpec],
        tool_choice: ToolChoice,
    ) -> ModelResponse:
        last = messages[-1] if messages else None
        if last is not None and last.role == "tool":
            return self._reply(f"Tool results: {last.content}", model)
        users = [m.content for m in messages if m.role == "user"]
        # Tools the model may call: with "none", it answers in text like a model would.
        offered = {t.name for t in tools} if tool_choice == "auto" else set()
        targets = [n for n in self.router.agents if f"{TRANSFER_PREFIX}{n}" in offered]
        if agent == self._team.supervisor.name:
            system = messages[0].content if messages and messages[0].role == "system" else ""
            if HANDOFF_NOTE not in system:
                # A turn that starts here (the first one, or after /supervisor) is a new
                # request: route what the user said since the last reply, not the topic left.
                replied = [i for i, m in enumerate(messages) if m.role == "assistant"]
                since = replied[-1] + 1 if replied else 0
                users = [m.content for m in messages[since:] if m.role == "user"]
            return await self._route(users, targets, system, model)
        return await self._answer(agent, users, targets, RETURN_TOOL in offered, model)

    async def _route(
        self, users: list[str], targets: list[str], system: str, model: str
    ) -> ModelResponse:
        if not targets or not any(u.strip() for u in users):
            return self._reply(
                "Hello! I am the triage agent running offline. Tell me what you need help "
                "with and I will pass you to the right specialist.",
                model,
            )
        hint = _SUGGESTED.search(system)
        if hint and hint.group(1) in targets:
            best, reason = hint.group(1), f"offline router: taking the suggestion {hint.group(1)}"
        else:
            decision = await self.router.route(users)
            best = decision.agent
            reason = f"offline router: {decision.reason}"
            if best not in targets:
                # The closest agent this supervisor may hand to, not the first one listed.
                best = max(targets, key=lambda n: decision.scores.get(n, float("-inf")))
                reason += f" ({decision.agent} is not a handoff target; {best} is the closest)"
        return self._call(f"{TRANSFER_PREFIX}{best}", {"reason": reason}, model)

    async def _answer(
        self, agent: str, users: list[str], targets: list[str], can_return: bool, model: str
    ) -> ModelResponse:
        if (targets or can_return) and agent in self.router.agents:
            decision = await self.router.check(users, agent)
            if decision is not None and decision.agent != agent:
                reason = f"offline router: {decision.reason}"
                if decision.agent in targets:
                    return self._call(
                        f"{TRANSFER_PREFIX}{decision.agent}", {"reason": reason}, model
                    )
                # Back to the supervisor only if it can send the thread there: otherwise the
                # two would pass the thread back and forth until the turn's handoff limit.
                supervisor = self._team.supervisor.name
                if can_return and decision.agent in self._team.handoff_targets(supervisor):
                    reason += f" [suggested: {decision.agent}]"
                    return self._call(RETURN_TOOL, {"reason": reason}, model)
        text = users[-1] if users else ""
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
