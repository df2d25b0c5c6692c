"""Offline routing that knows when to switch specialists, without a language model.

Every agent is embedded several times: its name and description, each intent (name and
description), each intent with its slots' descriptions, and each slot description. A message
scores against an agent as a weighted mix of those views, each the best match in its view
(max over intents, max over slots), so one good intent or slot match counts fully instead of
being averaged away in one long profile text.

``route`` picks the agent with the highest decayed mean score over the thread's user messages
(newest weighted most). ``check`` keeps the active agent unless another one builds up enough
evidence: per recent user message, the margin of each other agent's score over the active
one's is accumulated CUSUM-style (``S = max(0, decay * S + margin)``, oldest first), and the
best other agent takes over when that sum, plus ``distinct_weight`` times how clearly the
newest message singles it out (its lead over every other agent), passes ``switch_threshold``
and the newest message leans its way too. Short follow-ups ("yes, 2 people please") have
small margins and leave the active agent alone; one clear move ("I also need a cab to get
there") passes at once; a few moderately consistent messages pass together; the clipping at
zero stops old messages about the active topic from blocking a fresh move. A newest message
that announces an added request ("also", "too", "another", ...) needs the lower
``new_request_threshold`` instead.

Some teams have agents that cover the same ground (two hotel-booking services, two movie
services): at least ``overlap_share`` of one agent's intents have a counterpart (cosine >=
``overlap_intent_similarity``) among the other's. Their similarities to a message differ by
wording more than by meaning, so the margins above cannot tell them apart. Between such
agents, ``check`` also switches when the newest message is best matched, over every agent's
intents and slots, by a *distinctive capability* of the other agent: one with no counterpart
(cosine >= ``counterpart_similarity``) in the active agent and a match of at least
``capability_match``. "Can I smoke there?" moves a thread to the agent whose slots include
whether smoking is allowed; "what's the hotel's address?" does not move it, since both have
an address.

Both are stateless given the recent user messages: ``check`` reads the last
``RECENT_USER_MESSAGES`` (5) user messages, i.e. about ten thread messages.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from memory.embedders import Embedder, VectorCache

__all__ = [
    "RECENT_USER_MESSAGES",
    "AgentProfile",
    "EvidenceRouter",
    "NEW_REQUEST_CUE",
    "IntentProfile",
    "RouteDecision",
    "in_words",
]

RECENT_USER_MESSAGES = 5
"""How many recent user messages ``check`` needs; older ones have decayed to nothing."""

_VIEWS = ("description", "intent", "intent_slots", "slot")

NEW_REQUEST_CUE = r"\b(also|too|as well|in addition|additionally|another)\b"
"""Words with which users add a request ("I also need a cab"): such a message switches sooner."""


def in_words(identifier: str) -> str:
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
            s["name"]: s.get("description") or in_words(s["name"]) for s in entry.get("slots", [])
        }
        intents = tuple(
            IntentProfile(
                name=intent["name"],
                description=intent.get("description", ""),
                slots=tuple(
                    slot_text.get(s, in_words(s))
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
        head = f"{in_words(self.name)}: {self.description}"
        intents = [f"{in_words(i.name)}: {i.description}" for i in self.intents]
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
    """Where a thread should go, the per-agent evidence behind it, and why in words.

    ``scores`` are, for ``route``, each agent's decayed mean similarity; for ``check``, each
    other agent's accumulated margin over the active one.
    """

    agent: str
    scores: dict[str, float]
    reason: str


class EvidenceRouter:
    """Routes a thread's first turn and decides switches from accumulated evidence.

    The async ``route`` and ``check`` embed (each distinct text once, cached) and call the
    synchronous ``route_vectors`` / ``check_vectors``, which a benchmark can also call directly
    on pre-embedded messages after ``await prepare()``. Thresholds are in cosine units.
    """

    def __init__(
        self,
        embedder: Embedder,
        agents: Sequence[AgentProfile],
        *,
        description_weight: float = 1.0,
        intent_weight: float = 1.0,
        intent_slots_weight: float = 1.0,
        slot_weight: float = 2.0,
        slot_top_k: int = 1,
        route_decay: float = 0.7,
        switch_decay: float = 0.7,
        switch_threshold: float = 0.3,
        distinct_weight: float = 1.0,
        latest_margin: float = 0.025,
        new_request_threshold: float = 0.25,
        new_request_cue: str | None = NEW_REQUEST_CUE,
        overlap_intent_similarity: float = 0.7,
        overlap_share: float = 0.5,
        counterpart_similarity: float = 0.5,
        capability_match: float = 0.3,
        cache_size: int = 4096,
    ) -> None:
        if not agents:
            raise ValueError("EvidenceRouter needs at least one agent")
        names = [a.name for a in agents]
        if len(set(names)) != len(names):
            raise ValueError(f"agent names must be unique: {names}")
        self._embedder = embedder
        self._agents = list(agents)
        self._names = names
        self._weights = np.array(
            [description_weight, intent_weight, intent_slots_weight, slot_weight], np.float32
        )
        self._slot_top_k = slot_top_k
        self._route_decay = route_decay
        self._switch_decay = switch_decay
        self._switch_threshold = switch_threshold
        self._distinct_weight = distinct_weight
        self._latest_margin = latest_margin
        self._new_request_threshold = new_request_threshold
        self._new_request = re.compile(new_request_cue, re.IGNORECASE) if new_request_cue else None
        self._overlap_intent_similarity = overlap_intent_similarity
        self._overlap_share = overlap_share
        self._counterpart_similarity = counterpart_similarity
        self._capability_match = capability_match
        self._views: list[list[np.ndarray]] | None = None
        self._capabilities: _Capabilities | None = None
        self._cache = VectorCache(cache_size)

    @property
    def agents(self) -> list[str]:
        """Agent names, in the order of every score vector."""
        return list(self._names)

    def overlapping(self, first: str, second: str) -> bool:
        """Whether two agents cover the same ground (see the module docstring)."""
        if self._capabilities is None:
            raise RuntimeError("call `await router.prepare()` first")
        i, j = self._names.index(first), self._names.index(second)
        return bool(self._capabilities.overlapping[i, j])

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
        self._capabilities = self._index_capabilities(out, texts)

    def _index_capabilities(
        self, views: list[list[np.ndarray]], texts: list[dict[str, list[str]]]
    ) -> _Capabilities:
        """Every agent's intents and slots as one matrix, with counterparts and overlaps."""
        per_agent = [np.concatenate([rows[1], rows[3]]) for rows in views]
        vectors = np.concatenate(per_agent)
        owner = np.repeat(np.arange(len(per_agent)), [len(v) for v in per_agent])
        labels = [t for agent in texts for t in [*agent["intent"], *agent["slot"]]]
        counterpart = np.stack([(vectors @ v.T).max(axis=1) for v in per_agent], axis=1)
        intents = [rows[1] for rows in views]
        overlapping = np.zeros((len(intents), len(intents)), bool)
        for i, mine in enumerate(intents):
            for j, theirs in enumerate(intents):
                if i != j:
                    close = (mine @ theirs.T) >= self._overlap_intent_similarity
                    share = max(close.any(axis=1).mean(), close.any(axis=0).mean())
                    overlapping[i, j] = share >= self._overlap_share
        return _Capabilities(vectors, owner, labels, counterpart, overlapping)

    async def _embed(self, texts: Sequence[str]) -> np.ndarray:
        found, missing = self._cache.lookup(texts)
        if missing:
            vectors = await self._embedder.embed(missing)
            for text, vector in zip(missing, vectors, strict=True):
                found[text] = np.asarray(vector, np.float32)
        self._cache.keep(found)
        return np.stack([found[t] for t in texts])

    async def route(self, user_messages: list[str]) -> RouteDecision:
        """The agent for a thread given all its user messages so far, oldest first."""
        await self.prepare()
        messages = [m for m in user_messages if m.strip()]
        if not messages:
            return RouteDecision(self._names[0], {}, "evidence router: no user message yet")
        return self.route_vectors(await self._embed(messages))

    async def check(self, user_messages: list[str], active: str) -> RouteDecision | None:
        """None to stay with ``active``, else the agent the recent user messages moved to."""
        await self.prepare()
        messages = [m for m in user_messages if m.strip()][-RECENT_USER_MESSAGES:]
        if not messages:
            return None
        return self.check_vectors(
            await self._embed(messages), active, new_request=self.is_new_request(messages[-1])
        )

    def is_new_request(self, message: str) -> bool:
        """Whether the message announces an additional request ("I also need ...")."""
        return bool(self._new_request and self._new_request.search(message))

    def similarities(self, vectors: np.ndarray) -> np.ndarray:
        """(messages, agents) scores: the weighted mix of each view's best match."""
        if self._views is None:
            raise RuntimeError("call `await router.prepare()` first")
        vectors = np.asarray(vectors, np.float32).reshape(-1, self._views[0][0].shape[1])
        out = np.empty((len(vectors), len(self._names)), np.float32)
        weights = self._weights / self._weights.sum()
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
            out[:, j] = mixed @ weights
        return out

    def route_vectors(self, vectors: np.ndarray) -> RouteDecision:
        """``route`` on embedded user messages, oldest first."""
        sims = self.similarities(vectors)
        weights = self._route_decay ** np.arange(len(sims) - 1, -1, -1, dtype=np.float32)
        total = weights @ sims / weights.sum()
        best = int(total.argmax())
        runner_up = float(np.sort(total)[-2]) if len(total) > 1 else float("-inf")
        reason = (
            f"evidence router: closest to {self._names[best]} ({total[best]:.2f}, "
            f"next {runner_up:.2f}) over {len(sims)} user message(s)"
        )
        scores = {n: float(s) for n, s in zip(self._names, total, strict=True)}
        return RouteDecision(self._names[best], scores, reason)

    def check_vectors(
        self, vectors: np.ndarray, active: str, *, new_request: bool = False
    ) -> RouteDecision | None:
        """``check`` on embedded recent user messages, oldest first.

        ``new_request`` says the newest message announces an added request (see
        ``is_new_request``); it lowers the threshold to ``new_request_threshold``. When the
        accumulated evidence does not pass, an overlapping agent's distinctive capability in
        the newest message still may (see the module docstring).
        """
        if len(vectors) == 0:
            return None
        if active not in self._names:
            return self.route_vectors(vectors)
        sims = self.similarities(vectors)[-RECENT_USER_MESSAGES:]
        me = self._names.index(active)
        margins = sims - sims[:, me : me + 1]
        evidence = np.zeros(len(self._names), np.float32)
        for row in margins:
            # CUSUM: old messages for the active agent cannot bank negative evidence.
            evidence = np.maximum(0.0, self._switch_decay * evidence + row)
        evidence[me] = -np.inf
        best = int(evidence.argmax())
        latest = float(margins[-1, best])
        # A generic message ("I'd like to make a reservation") may beat the active agent yet
        # fit several others as well; a real move singles one agent out.
        distinct = float(sims[-1, best] - np.delete(sims[-1], best).max(initial=-1.0))
        score = float(evidence[best]) + self._distinct_weight * distinct
        threshold = self._switch_threshold
        if new_request:
            threshold = min(threshold, self._new_request_threshold)
        scores = {n: float(evidence[i]) for i, n in enumerate(self._names) if i != me}
        if score >= threshold and latest >= self._latest_margin:
            reason = (
                f"evidence router: {self._names[best]} over {active}: accumulated margin "
                f"{evidence[best]:.3f} across {len(sims)} recent user message(s) + "
                f"{self._distinct_weight:g} x latest lead {distinct:+.3f} = {score:.3f} >= "
                f"{threshold:.3f} (latest margin {latest:+.3f})"
            )
            return RouteDecision(self._names[best], scores, reason)
        return self._distinctive_switch(np.asarray(vectors[-1], np.float32), me, scores)

    def _distinctive_switch(
        self, vector: np.ndarray, me: int, scores: dict[str, float]
    ) -> RouteDecision | None:
        """The overlapping agent whose distinctive capability the message asks for, if any."""
        caps = self._capabilities
        assert caps is not None
        sims = caps.vectors @ vector.reshape(-1)
        k = int(sims.argmax())
        other = int(caps.owner[k])
        if (
            other == me
            or not caps.overlapping[other, me]
            or sims[k] < self._capability_match
            or caps.counterpart[k, me] >= self._counterpart_similarity
        ):
            return None
        active, name = self._names[me], self._names[other]
        reason = (
            f"evidence router: {name} over {active}: the latest message asks for "
            f"{caps.labels[k]!r} ({sims[k]:.2f}), which {name} offers and {active} does not "
            f"(closest {caps.counterpart[k, me]:.2f} < {self._counterpart_similarity:g}); "
            f"the two agents overlap"
        )
        return RouteDecision(name, scores, reason)


@dataclass(frozen=True)
class _Capabilities:
    """Every agent's intents and slots, embedded, for the distinctive-capability switch.

    ``counterpart[k, i]`` is capability k's best similarity among agent i's capabilities;
    ``overlapping[i, j]`` says agents i and j cover the same ground.
    """

    vectors: np.ndarray
    owner: np.ndarray
    labels: list[str]
    counterpart: np.ndarray
    overlapping: np.ndarray
