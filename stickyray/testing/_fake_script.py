"""Scripting for the fake LLM server: normalized requests, scripted replies, rule matching.

Token usage is deterministic: input tokens are the whitespace-separated words of all message
text (text parts/blocks and tool results, system prompt included) plus one per offered tool
name; output tokens are the words of the reply text plus the words of each tool call's
arguments JSON (`json.dumps(arguments)`). Both are at least 1.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Protocol

Api = Literal["openai", "anthropic"]
AGENT_HEADER = "X-Stickyray-Agent"


def _words(texts: Iterable[str]) -> int:
    return sum(len(text.split()) for text in texts)


@dataclass
class FakeRequest:
    """One request as the fake saw it, normalized across both wire formats."""

    api: Api
    model: str
    agent: str | None
    system: str
    messages: list[Any]
    tools: list[str]
    tool_choice: str  # auto, none, required, or the forced tool's name
    last_user_text: str
    tool_results: list[str]
    ends_with_tool_result: bool
    stream: bool
    headers: dict[str, str]  # lower-cased names
    body: dict[str, Any]
    input_tokens: int
    latency_s: float = 0.0

    def summary(self) -> str:
        """One line for error messages: who asked what, with which tools."""
        return (
            f"{self.api} model={self.model!r} agent={self.agent!r} "
            f"user={self.last_user_text[:80]!r} tools={self.tools} "
            f"tool_choice={self.tool_choice} "
            f"after_tool_result={self.ends_with_tool_result}"
        )


@dataclass(frozen=True)
class FakeToolCall:
    """A tool call in a scripted reply; `id` is generated when None."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str | None = None


StopReason = Literal["max_tokens", "refusal", "content_filter"]
"""Why a scripted reply ended, other than finishing or calling tools.

``max_tokens``: cut off by the token limit (OpenAI ``length``). ``refusal``: OpenAI sends the
content as ``message.refusal`` with null ``content``; Anthropic's ``stop_reason`` is
``refusal``. ``content_filter``: OpenAI's finish reason (Azure sends it with null content);
Anthropic has none, and answers ``refusal``.
"""


@dataclass(frozen=True)
class FakeReply:
    """A scripted model reply: text, tool calls (optionally with text), or an HTTP error.

    ``stop`` makes the reply end for another reason than finishing (see ``StopReason``).
    ``in_stream``: a streamed request gets the error inside its stream, after the text.
    ``retry_after_s``: the error's ``Retry-After`` header.
    ``cache_read_tokens``, ``cache_write_tokens``: input tokens the reply reports as read
    from, and written to, the prompt cache (see ``cached``).
    """

    content: str = ""
    calls: tuple[FakeToolCall, ...] = ()
    error_status: int | None = None
    error_message: str = ""
    stop: StopReason | None = None
    broken_off: bool = False
    in_stream: bool = False
    retry_after_s: float | None = None
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    @classmethod
    def text(cls, content: str) -> FakeReply:
        """A plain assistant message."""
        return cls(content=content)

    @classmethod
    def tool_call(
        cls,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        text: str = "",
        call_id: str | None = None,
    ) -> FakeReply:
        """One tool call, optionally preceded by text."""
        return cls.tool_calls([FakeToolCall(name, dict(arguments or {}), call_id)], text=text)

    @classmethod
    def tool_calls(
        cls, calls: Iterable[FakeToolCall | tuple[str, Mapping[str, Any]]], *, text: str = ""
    ) -> FakeReply:
        """Several tool calls in one turn, given as `(name, arguments)` pairs or FakeToolCall."""
        parsed = tuple(
            c if isinstance(c, FakeToolCall) else FakeToolCall(c[0], dict(c[1])) for c in calls
        )
        if not parsed:
            raise ValueError("FakeReply.tool_calls needs at least one call")
        for call in parsed:
            json.dumps(call.arguments)  # fail while scripting, not inside the server
        return cls(content=text, calls=parsed)

    @classmethod
    def broken_off_text(cls, content: str) -> FakeReply:
        """A reply whose response ends cleanly before the reply does, as behind a proxy that
        times out: streamed, its text comes but no finish (OpenAI's ``finish_reason`` and
        ``[DONE]``, Anthropic's ``message_delta`` and ``message_stop``); unstreamed, its JSON
        body stops halfway."""
        return cls(content=content, broken_off=True)

    @classmethod
    def error(cls, status: int, message: str, *, retry_after_s: float | None = None) -> FakeReply:
        """An HTTP error in the calling API's error JSON shape, with a ``Retry-After`` header
        of ``retry_after_s`` seconds if given."""
        if not 400 <= status <= 599:
            raise ValueError(f"error status must be 4xx or 5xx, got {status}")
        return cls(error_status=status, error_message=message, retry_after_s=retry_after_s)

    @classmethod
    def error_in_stream(cls, status: int, message: str, *, text: str = "") -> FakeReply:
        """The error ``status`` would be, sent by a streamed reply after its 200 and ``text``,
        as the APIs report a failure mid-stream: Anthropic an ``error`` event (529 is
        ``overloaded_error``), OpenAI a chunk holding an ``error`` (5xx is ``server_error``).
        Unstreamed, it is the HTTP error."""
        return replace(cls.error(status, message), content=text, in_stream=True)

    def cached(self, *, read: int = 0, written: int = 0) -> FakeReply:
        """This reply, reporting ``read`` of its input tokens as read from the prompt cache
        and ``written`` as written to it (at most the request's input tokens in all). OpenAI
        reports reads as ``prompt_tokens_details.cached_tokens`` and no writes; Anthropic
        both, as ``cache_read_input_tokens`` and ``cache_creation_input_tokens``, apart from
        ``input_tokens``."""
        if read < 0 or written < 0:
            raise ValueError(f"cached tokens must be >= 0, got read={read} written={written}")
        return replace(self, cache_read_tokens=read, cache_write_tokens=written)

    @property
    def output_tokens(self) -> int:
        """Output tokens this reply reports in `usage` (see the module docstring)."""
        arguments = (json.dumps(call.arguments) for call in self.calls)
        return max(1, _words([self.content, *arguments]))

    def describe(self) -> str:
        """Short human description for assertion messages."""
        if self.error_status is not None:
            where = f" in stream after {self.content[:40]!r}" if self.in_stream else ""
            return f"error {self.error_status} {self.error_message!r}{where}"
        names = [call.name for call in self.calls]
        stop = f" (stop: {self.stop})" if self.stop else ""
        stop += " (broken off)" if self.broken_off else ""
        return f"text {self.content[:40]!r}" + (f" + tool calls {names}" if names else "") + stop


ReplyResult = FakeReply | str
ReplySource = ReplyResult | Callable[[FakeRequest], ReplyResult | Awaitable[ReplyResult]]


@dataclass
class FakeRule:
    """A scripted reply and the requests it answers; returned by `FakeLLMServer.on`."""

    description: str
    matches: Callable[[FakeRequest], bool]
    reply: ReplySource
    times: int | None = None
    latency_s: float | None = None
    calls: int = 0

    @property
    def exhausted(self) -> bool:
        """Whether the rule has answered all the requests it was scripted for."""
        return self.times is not None and self.calls >= self.times


@dataclass(frozen=True)
class _Criteria:
    """The conditions given to `on()`; every one that is not None must hold."""

    predicate: Callable[[FakeRequest], bool] | None = None
    agent: str | None = None
    model: str | None = None
    api: Api | None = None
    user_contains: str | None = None
    system_contains: str | None = None
    has_tool: str | None = None
    after_tool_result: bool | None = None

    def __call__(self, r: FakeRequest) -> bool:
        checks = (
            self.agent is None or r.agent == self.agent,
            self.model is None or r.model == self.model,
            self.api is None or r.api == self.api,
            self.user_contains is None or self.user_contains.lower() in r.last_user_text.lower(),
            self.system_contains is None or self.system_contains.lower() in r.system.lower(),
            self.has_tool is None or self.has_tool in r.tools,
            self.after_tool_result is None or r.ends_with_tool_result == self.after_tool_result,
        )
        # The predicate runs last, so it only sees requests the keywords already accepted.
        return all(checks) and (self.predicate is None or self.predicate(r))

    def describe(self) -> str:
        parts = [getattr(self.predicate, "__name__", "predicate")] if self.predicate else []
        for name in [f.name for f in fields(self)][1:]:
            if (value := getattr(self, name)) is not None:
                parts.append(f"{name}={value!r}")
        return ", ".join(parts) or "*"


_ToolCallSpec = tuple[str | None, str, dict[str, Any]]


class _Wire(Protocol):
    """What a wire-format module provides (`_fake_openai`, `_fake_anthropic`)."""

    def system_text(self, body: dict[str, Any]) -> str: ...
    def tool_names(self, body: dict[str, Any]) -> list[str]: ...
    def tool_choice(self, body: dict[str, Any]) -> str: ...
    def last_user_text(self, body: dict[str, Any]) -> str: ...
    def tool_results(self, body: dict[str, Any]) -> list[str]: ...
    def ends_with_tool_result(self, body: dict[str, Any]) -> bool: ...
    def input_texts(self, body: dict[str, Any]) -> list[str]: ...
    def error_body(self, status: int, message: str) -> dict[str, Any]: ...
    def reply_body(
        self,
        *,
        seq: int,
        model: str,
        text: str,
        tool_calls: Sequence[_ToolCallSpec],
        input_tokens: int,
        output_tokens: int,
        stop: StopReason | None = None,
    ) -> dict[str, Any]: ...
    def reply_stream(
        self,
        body: dict[str, Any],
        *,
        seq: int,
        model: str,
        text: str,
        tool_calls: Sequence[_ToolCallSpec],
        input_tokens: int,
        output_tokens: int,
        stop: StopReason | None = None,
        complete: bool = True,
        error: dict[str, Any] | None = None,
    ) -> Iterator[str]: ...


def normalize(
    api: Api, wire: _Wire, body: dict[str, Any], headers: Mapping[str, str]
) -> FakeRequest:
    """One request body and its HTTP headers as a FakeRequest."""
    messages = body.get("messages")
    return FakeRequest(
        api=api,
        model=str(body.get("model") or ""),
        agent=headers.get(AGENT_HEADER),
        system=wire.system_text(body),
        messages=messages if isinstance(messages, list) else [],
        tools=wire.tool_names(body),
        tool_choice=wire.tool_choice(body),
        last_user_text=wire.last_user_text(body),
        tool_results=wire.tool_results(body),
        ends_with_tool_result=wire.ends_with_tool_result(body),
        stream=bool(body.get("stream")),
        headers=dict(headers),
        body=body,
        input_tokens=max(1, _words(wire.input_texts(body))),
    )
