"""Offline routing that knows when to switch specialists, without a language model.

Every agent is embedded several times: its name and description, each intent (name and
description), each intent with its slots' descriptions, and each slot description. A message
scores against an agent as a weighted mix of those views (max over intents, mean of the best
few slots), so one good intent match counts fully instead of being averaged away. Per message,
the scores become log-probabilities over agents (a softmax with a temperature): short
follow-ups such as "yes, 2 people" come out nearly flat and carry little evidence, while a
clear request is peaked.

``route`` sums that evidence over the thread's user messages (newest weighted most).
``check`` keeps the active agent unless the exponentially decayed sum, over the recent user
messages, of the best other agent's log-probability margin over the active one passes a
threshold while the newest message also leans the same way. One ambiguous message therefore
does not switch; two or three consistent ones do.

Both are stateless given the recent user messages: the runtime needs to pass the last
``RECENT_USER_MESSAGES`` user messages (about ten thread messages).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from memory.embedders import Embedder

__all__ = [
    "RECENT_USER_MESSAGES",
    "AgentProfile",
    "EvidenceRouter",
    "IntentProfile",
    "RouteDecision",
]

RECENT_USER_MESSAGES = 5
"""How many recent user messages ``check`` needs; older ones have decayed to nothing."""

_VIEWS = ("description", "intent", "intent_slots", "slot")


def _words(identifier: str) -> str:
    """``ReserveHotel`` / ``Hotels_1`` -> ``Reserve Hotel`` / ``Hotels``: embeddable words."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", identifier.replace("_", " "))
    return re.sub(r"\s*\d+$", "", spaced).strip()


@dataclass(frozen=True)
class IntentProfile:
    """One thing an agent can do: a tool, with the descriptions of its parameters."""

    name: str
    description: str
    slots: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgentProfile:
    """What the router knows about a specialist: only names and descriptions."""

    name: str
    description: str
    intents: tuple[IntentProfile, ...] = ()
    slots: tuple[str, ...] = ()

    @classmethod
    def from_dataset_entry(cls, entry: dict[str, Any]) -> AgentProfile:
        """Build from one entry of an ``agents.json`` (SGD schema: intents, slots)."""
        slot_text = {
            s["name"]: s.get("description") or _words(s["name"]) for s in entry.get("slots", [])
        }
        intents = tuple(
            IntentProfile(
                name=intent["name"],
                description=intent.get("description", ""),
                slots=tuple(
                    slot_text.get(s, _words(s))
                    for s in [*intent.get("required_slots", []), *intent.get("optional_slots", [])]
                ),
            )
            for intent in entry.get("intents", [])
        )
        return cls(
            name=entry["name"],
            description=entry.get("description", ""),
            intents=intents,
            slots=tuple(slot_text.values()),
        )

    def view_texts(self) -> dict[str, list[str]]:
        """The texts embedded for this agent, by view; empty views fall back to the description."""
        head = f"{_words(self.name)}: {self.description}"
        intents = [f"{_words(i.name)}: {i.description}" for i in self.intents]
        with_slots = [
            f"{i.description}. {'; '.join(i.slots)}" if i.slots else i.description
            for i in self.intents
        ]
        slots = list(self.slots) or sorted({s for i in self.intents for s in i.slots})
        return {
            "description": [head],
            "intent": intents or [head],
            "intent_slots": with_slots or [head],
            "slot": slots or [head],
        }


@dataclass(frozen=True)
class RouteDecision:
    """Where a thread should go, the per-agent evidence behind it, and why in words."""

    agent: str
    scores: dict[str, float]
    reason: str


class EvidenceRouter:
    """Routes a thread's first turns and decides switches from accumulated evidence.

    The async ``route`` and ``check`` embed (each distinct text once, cached) and call the
    synchronous ``route_vectors`` / ``check_vectors``, which a benchmark can call directly on
    pre-embedded messages after ``await prepare()``.
    """

    def __init__(
        self,
        embedder: Embedder,
        agents: Sequence[AgentProfile],
        *,
        description_weight: float = 1.0,
        intent_weight: float = 1.0,
        intent_slots_weight: float = 1.0,
        slot_weight: float = 1.0,
        slot_top_k: int = 3,
        temperature: float = 0.05,
        route_decay: float = 0.7,
        switch_decay: float = 0.5,
        switch_threshold: float = 2.0,
        latest_margin: float = 0.5,
        cache_size: int = 4096,
    ) -> None:
        if not agents:
            raise ValueError("EvidenceRouter needs at least one agent")
        self._embedder = embedder
        self._agents = list(agents)
        self._names = [a.name for a in self._agents]
        self._weights = np.array(
            [description_weight, intent_weight, intent_slots_weight, slot_weight], np.float32
        )
        self._slot_top_k = slot_top_k
        self._temperature = temperature
        self._route_decay = route_decay
        self._switch_decay = switch_decay
        self._switch_threshold = switch_threshold
        self._latest_margin = latest_margin
        self._views: list[list[np.ndarray]] | None = None
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    @property
    def agents(self) -> list[str]:
        """Agent names, in the order of every score vector."""
        return list(self._names)

    async def prepare(self) -> None:
        """Embed every agent's views once (later calls are free)."""
        if self._views is not None:
            return
        texts = [agent.view_texts() for agent in self._agents]
        flat = [t for views in texts for view in _VIEWS for t in views[view]]
        vectors = np.asarray(await self._embedder.embed(flat), np.float32)
        out: list[list[np.ndarray]] = []
        at = 0
        for views in texts:
            rows = []
            for view in _VIEWS:
                rows.append(vectors[at : at + len(views[view])])
                at += len(views[view])
            out.append(rows)
        self._views = out

    async def _embed(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            vectors = await self._embedder.embed(missing)
            for text, vector in zip(missing, vectors, strict=True):
                self._cache[text] = np.asarray(vector, np.float32)
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        for text in texts:
            self._cache.move_to_end(text)
        return np.stack([self._cache[t] for t in texts])

    async def route(self, user_messages: list[str]) -> RouteDecision:
        """The agent for a thread given all its user messages so far, oldest first."""
        await self.prepare()
        messages = [m for m in user_messages if m.strip()]
        if not messages:
            return RouteDecision(self._names[0], {}, "no user message yet: first agent")
        return self.route_vectors(await self._embed(messages))

    async def check(self, user_messages: list[str], active: str) -> RouteDecision | None:
        """None to stay with ``active``, else the agent the recent messages moved to."""
        await self.prepare()
        messages = [m for m in user_messages if m.strip()][-RECENT_USER_MESSAGES:]
        if not messages:
            return None
        return self.check_vectors(await self._embed(messages), active)

    def similarities(self, vectors: np.ndarray) -> np.ndarray:
        """(messages, agents) similarity: the weighted mix of the views' best matches."""
        if self._views is None:
            raise RuntimeError("call `await router.prepare()` first")
        out = np.empty((len(vectors), len(self._names)), np.float32)
        for j, (head, intent, with_slots, slot) in enumerate(self._views):
            slot_sims = vectors @ slot.T
            k = min(self._slot_top_k, slot_sims.shape[1])
            mixed = np.stack(
                [
                    (vectors @ head.T).max(axis=1),
                    (vectors @ intent.T).max(axis=1),
                    (vectors @ with_slots.T).max(axis=1),
                    np.sort(slot_sims, axis=1)[:, -k:].mean(axis=1),
                ],
                axis=1,
            )
            out[:, j] = mixed @ self._weights / self._weights.sum()
        return out

    def evidence(self, vectors: np.ndarray) -> np.ndarray:
        """(messages, agents) log-probabilities: how strongly each message points where."""
        logits = self.similarities(vectors) / self._temperature
        logits -= logits.max(axis=1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))

    def _decayed(self, evidence: np.ndarray, decay: float) -> np.ndarray:
        weights = decay ** np.arange(len(evidence) - 1, -1, -1, dtype=np.float32)
        return weights @ evidence

    def route_vectors(self, vectors: np.ndarray) -> RouteDecision:
        """``route`` on embedded user messages, oldest first."""
        total = self._decayed(self.evidence(vectors), self._route_decay)
        best = int(total.argmax())
        scores = {n: float(s) for n, s in zip(self._names, total, strict=True)}
        ranked = np.sort(total)
        lead = float(ranked[-1] - ranked[-2]) if len(ranked) > 1 else float("inf")
        reason = (
            f"evidence router: {self._names[best]} leads by {lead:.2f} log-odds "
            f"over {len(vectors)} user message(s)"
        )
        return RouteDecision(self._names[best], scores, reason)

    def check_vectors(self, vectors: np.ndarray, active: str) -> RouteDecision | None:
        """``check`` on embedded recent user messages, oldest first."""
        if active not in self._names:
            return self.route_vectors(vectors)
        evidence = self.evidence(vectors[-RECENT_USER_MESSAGES:])
        me = self._names.index(active)
        margins = evidence - evidence[:, me : me + 1]
        total = self._decayed(margins, self._switch_decay)
        total[me] = -np.inf
        best = int(total.argmax())
        latest = float(margins[-1, best])
        if total[best] < self._switch_threshold or latest < self._latest_margin:
            return None
        scores = {n: float(s) for n, s in zip(self._names, total, strict=True) if n != active}
        reason = (
            f"evidence router: {self._names[best]} beats {active} by {total[best]:.2f} "
            f"decayed log-odds over {len(vectors)} recent user message(s) "
            f"(latest {latest:.2f}; threshold {self._switch_threshold:.2f})"
        )
        return RouteDecision(self._names[best], scores, reason)
