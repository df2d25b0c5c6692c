"""Routing strategies replayed offline with the runtime's router, to compare against a run.

Each policy takes one dialogue's pre-embedded user turns and returns the agent active for
each turn and the number of routing decisions (supervisor calls) it took.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from actors.commands import CHANGING, parse_command
from memory.embedders import LocalEmbedder
from providers.offline import team_profiles
from providers.routing import RECENT_USER_MESSAGES, EvidenceRouter
from replay.dataset import Dialogue
from stickyray.config import TeamConfig

__all__ = ["STRATEGIES", "baselines", "stateless", "sticky", "switching"]

Policy = Callable[[EvidenceRouter, np.ndarray, list[str]], tuple[list[str], int]]


def stateless(
    router: EvidenceRouter, vectors: np.ndarray, texts: list[str]
) -> tuple[list[str], int]:
    """Every turn routed on its own message."""
    return [router.route_vectors(v[None, :]).agent for v in vectors], len(vectors)


def sticky(router: EvidenceRouter, vectors: np.ndarray, texts: list[str]) -> tuple[list[str], int]:
    """The first turn routed, then never switched."""
    return [router.route_vectors(vectors[:1]).agent] * len(vectors), 1


def switching(
    router: EvidenceRouter, vectors: np.ndarray, texts: list[str]
) -> tuple[list[str], int]:
    """The first turn routed, then ``check`` on the recent user messages every turn."""
    active = router.route_vectors(vectors[:1]).agent
    agents, decisions = [active], 1
    for turn in range(1, len(vectors)):
        recent = vectors[max(0, turn + 1 - RECENT_USER_MESSAGES) : turn + 1]
        decision = router.check_vectors(
            recent, active, new_request=router.is_new_request(texts[turn])
        )
        if decision is not None:
            active, decisions = decision.agent, decisions + 1
        agents.append(active)
    return agents, decisions


STRATEGIES: dict[str, Policy] = {
    "stateless": stateless,
    "sticky": sticky,
    "switching": switching,
}


def baselines(team: TeamConfig, dialogues: list[Dialogue]) -> dict[str, dict[str, float | None]]:
    """Accuracy and supervisor decisions per turn of the stateless and never-switch strategies,
    with the same router and embedding model the offline agents use."""
    embedder = LocalEmbedder()
    router = EvidenceRouter(embedder, team_profiles(team))
    # Only messages are routed, as in the thread: a command is answered by the thread.
    texts = [[t.user for t in d.turns if parse_command(t.user) is None] for d in dialogues]
    flat = embedder.embed_sync([t for turns in texts for t in turns])
    out: dict[str, dict[str, float | None]] = {}
    asyncio.run(router.prepare())
    for name, label in (
        ("stateless", "stateless (route every turn)"),
        ("sticky", "sticky without return"),
    ):
        right = labelled = decisions = turns = at = 0
        for dialogue, turn_texts in zip(dialogues, texts, strict=True):
            vectors = flat[at : at + len(turn_texts)]
            at += len(turn_texts)
            agents, made = _replayed(STRATEGIES[name], router, dialogue, vectors)
            decisions += made
            turns += len(dialogue.turns)
            for turn, agent in zip(dialogue.turns, agents, strict=True):
                labels = turn.labels  # as the run scores it: commands are not
                if labels:
                    labelled += 1
                    right += agent in labels
        out[label] = {
            "accuracy": round(right / labelled, 4) if labelled else None,
            "supervisor_decisions_per_turn": round(decisions / max(turns, 1), 4),
        }
    return out


def _replayed(
    policy: Policy, router: EvidenceRouter, dialogue: Dialogue, vectors: np.ndarray
) -> tuple[list[str | None], int]:
    """The agent active at each turn of ``dialogue`` under ``policy``, and its decisions.

    ``vectors`` are the dialogue's messages (its commands left out). As in the thread, only
    ``/supervisor`` and ``/reset`` with nothing after them change the thread: they end a
    stretch, and the policy starts afresh on the messages after them. Any other command
    (``/help``, ``/supervisor please``) only reads the thread: it shows the agent of the turn
    before it, and the stretch goes on across it.
    """
    agents: list[str | None] = []
    stretch: list[int] = []  # positions in ``agents`` of the current stretch's messages
    reading: list[int] = []  # positions of the commands that leave the thread as it is
    decisions = at = 0

    def route() -> None:
        nonlocal decisions, at
        if stretch:
            texts = [dialogue.turns[i].user for i in stretch]
            routed, made = policy(router, vectors[at : at + len(stretch)], texts)
            for position, agent in zip(stretch, routed, strict=True):
                agents[position] = agent
            decisions, at = decisions + made, at + len(stretch)
            stretch.clear()

    for index, turn in enumerate(dialogue.turns):
        command = parse_command(turn.user)
        if command is None:
            stretch.append(index)
            agents.append(None)
            continue
        agents.append(None)
        if command.name in CHANGING and not command.after:
            route()
        else:
            # Its stretch may not be routed yet: filled in once every stretch is.
            reading.append(index)
    route()
    for index in reading:  # in order, so a run of commands passes the agent along
        agents[index] = agents[index - 1] if index else None
    return agents, decisions
