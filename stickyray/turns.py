"""The records a turn carries between ingress, thread actor and agent deployments.

They are pydantic models so they validate at the edges and pickle across Ray processes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from memory.buffer import BufferEntry
from memory.long_term import storable_text

__all__ = [
    "REFUSED_ERRORS",
    "AgentRequest",
    "AgentResult",
    "CompressRequest",
    "Handoff",
    "InboundMessage",
    "SORRY_REPLY",
    "ThreadSnapshot",
    "TurnResult",
    "Usage",
    "action_line",
    "anonymous_owner",
    "done",
    "fingerprint",
    "message_text",
    "sorry",
]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Usage(_Record):
    """What model calls spent: tokens, and how many requests they took."""

    # Stored inside turn records: an older release must read what a newer one wrote.
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0
    # US dollars, at the prices of agents.yaml's `pricing`; None when the team sets none, or
    # when it is unknown (see unmeasured_requests).
    cost_usd: float | None = None
    # Of input_tokens: those the vendor's prompt cache gave (OpenAI's cached tokens,
    # Anthropic's cache reads), and those it stored (Anthropic's cache writes).
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    # Of requests: those whose reply reported no token usage (a compatible server that sends
    # none, a stream that broke before its usage came). Their tokens count as 0, so no price
    # gives their cost: a usage with any has an unknown one.
    unmeasured_requests: int = 0

    def __add__(self, other: Usage) -> Usage:
        # A cost is known when every part with tokens has one: a priced part plus an unpriced
        # (or unmeasured) one is unknown, not the priced part alone. Nothing spent costs nothing.
        parts = (self, other)
        known = any(u.cost_usd is not None for u in parts) and all(
            u.cost_usd is not None or u._spent_nothing for u in parts
        )
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            requests=self.requests + other.requests,
            cost_usd=sum(u.cost_usd or 0.0 for u in parts) if known else None,
            cached_input_tokens=self.cached_input_tokens + other.cached_input_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            unmeasured_requests=self.unmeasured_requests + other.unmeasured_requests,
        )

    @property
    def _spent_nothing(self) -> bool:
        return self.input_tokens == self.output_tokens == self.requests == 0

    def priced(
        self,
        input_per_mtok: float,
        output_per_mtok: float,
        cached_input_per_mtok: float | None = None,
        cache_write_per_mtok: float | None = None,
    ) -> Usage:
        """This usage with its cost at these prices (US dollars per million tokens); input
        tokens from or into the prompt cache at theirs, the input price when not given.

        With ``unmeasured_requests`` the cost is unknown (None): some requests' tokens are.
        """
        if self.unmeasured_requests:
            return self.model_copy(update={"cost_usd": None})
        cached, written = self.cached_input_tokens, self.cache_write_tokens
        fresh = max(0, self.input_tokens - cached - written)
        cost = (
            fresh * input_per_mtok
            + cached * (input_per_mtok if cached_input_per_mtok is None else cached_input_per_mtok)
            + written * (input_per_mtok if cache_write_per_mtok is None else cache_write_per_mtok)
            + self.output_tokens * output_per_mtok
        ) / 1e6
        return self.model_copy(update={"cost_usd": cost})


# What a user is told when their message could not be answered (a turn or a run failed).
SORRY_REPLY = (
    "Sorry, something went wrong and this message could not be answered. Please send it again."
)


# A turn's error when the model refused it or the vendor's filter stopped it (with the
# refusal as the reply, or an apology when there was no text): such an exchange is not kept
# as context, since later turns sent with it could be refused for it too.
REFUSED_ERRORS = frozenset(
    {"refusal", "content_filter", "empty reply (refusal)", "empty reply (content_filter)"}
)


def sorry(actions: list[str]) -> str:
    """What a user is told when their message could not be answered after the tools named in
    ``actions`` (``AgentResult.actions``) ran: sent again as it is, it would do them twice."""
    if not actions:
        return SORRY_REPLY
    return f"Sorry, something went wrong before this message was fully answered. {done(actions)}"


def done(actions: list[str]) -> str:
    """What a user whose message was not fully answered is told of the tools that ran."""
    names = list(dict.fromkeys(_tool_of(action) for action in actions))
    return (
        f"Some of it was already done ({', '.join(names)}): please ask what was done before "
        "sending it again."
    )


def action_line(agent: str, tool: str, arguments: dict[str, Any], output: str) -> str:
    """One tool call that ran, for ``AgentResult.actions``: who ran what, with which
    arguments, and what it returned (both cut short: a record, not the data)."""
    said = " ".join(output.split())
    shown = json.dumps(arguments, ensure_ascii=False, default=str)
    return f"{agent} ran {tool}({_short(shown, 200)}): {_short(said, 300)}"


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tool_of(action: str) -> str:
    # As action_line writes it: "<agent> ran <tool>(<arguments>): <output>".
    return action.split(" ran ", 1)[-1].split("(", 1)[0]


def message_text(value: str) -> str:
    """``value`` if the ingress takes it as a message's text, else ValueError saying why."""
    if not value.strip():
        raise ValueError("must not be blank")
    # What is said may end up in long-term memory, so it must be storable there too.
    return storable_text(value)


class InboundMessage(_Record):
    """A user message accepted by the ingress, normalised from any channel."""

    text: str
    # The stores key a turn's answer by it: an empty one would answer no retry.
    message_id: str = Field(min_length=1)
    user_id: str | None = None
    channel: str = "api"
    # The caller reads the reply as it is written (see ``ThreadKey.deltas_key``). A hint for
    # the live call only: never stored, so a turn redone later is not streamed.
    stream: bool = Field(default=False, exclude=True)

    @property
    def fingerprint(self) -> str:
        """What makes a message the same message when its id comes again: its text and
        user (not its channel, nor how the reply is read)."""
        return fingerprint(self.text, self.user_id)

    @classmethod
    def stored(cls, value: str | bytes | dict[str, Any]) -> InboundMessage:
        """A message read back from storage (a pending turn, a queued run), as JSON or its
        fields: a newer release may have added fields, which this one drops (the ingress
        still refuses them in a request)."""
        fields = json.loads(value) if isinstance(value, str | bytes) else value
        if not isinstance(fields, dict):
            raise ValueError(f"a stored message is an object, not {type(fields).__name__}")
        return cls.model_validate({k: v for k, v in fields.items() if k in cls.model_fields})


def fingerprint(text: str, user_id: str | None = None) -> str:
    """A short hash of what was said and by whom (hex)."""
    said = json.dumps([text, user_id], ensure_ascii=False)
    return hashlib.sha256(said.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class Handoff(_Record):
    """One change of agent inside a turn. ``to`` is the agent that takes over."""

    from_agent: str = Field(alias="from", serialization_alias="from")
    to: str
    reason: str = ""


class AgentRequest(_Record):
    """What a thread actor asks of one agent deployment.

    ``user_id`` scopes long-term memory; a message without one is scoped to its thread.
    """

    thread: str
    turn: int
    text: str
    tenant: str = "default"
    user_id: str | None = None
    buffer: list[BufferEntry] = Field(default_factory=list)
    handoff_reason: str | None = None
    # The Redis stream the agent adds its reply's text to as the model writes it.
    stream_to: str | None = None
    # The tool calls that agents handing the thread on ran earlier in this turn (their
    # ``AgentResult.actions``): done, not to be done again.
    earlier: list[str] = Field(default_factory=list)


class CompressRequest(_Record):
    """Messages about to leave a thread's buffer, to be kept as an episodic memory."""

    thread: str
    tenant: str
    user_id: str
    messages: list[BufferEntry]


def anonymous_owner(thread: str) -> str:
    """Whose memories the messages of ``thread`` (tenant/thread_id) without a user_id make.

    The thread's own; no user id holds a '/', so it is never a user's.
    """
    return f"thread:{thread}"


class CompressResult(_Record):
    """The memory that now covers the messages (None if none was made), and its cost."""

    memory_id: str | None = None
    usage: Usage = Usage()


class AgentResult(_Record):
    """An agent's answer: a reply, or a handoff to another agent, with what it cost.

    ``failed`` means the agent could not answer (its provider failed after retries); the
    usage of the calls made before that is still counted. ``actions`` are the tool calls it
    ran, each in a line with what it returned, whether it answered, handed off or failed.
    """

    agent: str
    reply: str | None = None
    handoff_to: str | None = None
    handoff_reason: str = ""
    usage: Usage = Usage()
    llm_calls: int = 0
    tool_calls: list[str] = Field(default_factory=list)
    error: str | None = None
    failed: bool = False
    actions: list[str] = Field(default_factory=list)


class TurnResult(_Record):
    """The outcome of one inbound message: what the API returns and the thread's turn record.

    ``status`` is ``failed`` when the turn was accepted but could not produce an answer;
    ``error`` then says why. Commands (``command`` set) are answered but are not turns.
    ``usage`` is the whole turn's; ``usage_by_agent`` splits it among the agents called.
    """

    # Stored for deduplication and history: an instance still on an older release must read
    # what a newer one wrote during a rolling deploy.
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    thread_id: str
    message_id: str
    turn: int
    agent: str | None
    reply: str
    status: Literal["completed", "failed"] = "completed"
    handoffs: list[Handoff] = Field(default_factory=list)
    usage: Usage = Usage()
    usage_by_agent: dict[str, Usage] = Field(default_factory=dict)
    command: str | None = None
    error: str | None = None
    completed_at: float = 0.0
    # The tool calls the turn ran, by any of its agents, each with what it returned.
    actions: list[str] = Field(default_factory=list)


class ThreadSnapshot(_Record):
    """The visible state of a thread."""

    thread_id: str
    active_agent: str | None
    turns: int
    buffer: list[BufferEntry]
    version: int
