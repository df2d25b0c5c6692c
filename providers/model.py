"""The provider-neutral wire model: messages, tools, tool calls and responses.

Providers translate these to and from each vendor's format; nothing else sees vendor types.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from stickyray.errors import ProviderError
from stickyray.turns import Usage

__all__ = [
    "CUT_OFF_KEY",
    "INVALID_JSON_KEY",
    "NOT_AN_OBJECT_KEY",
    "UNMEASURED",
    "ChatMessage",
    "ModelResponse",
    "Provider",
    "StopReason",
    "TextSink",
    "ToolCall",
    "ToolChoice",
    "ToolSpec",
    "read_reply",
    "valid_unicode",
    "valid_unicode_json",
]


log = logging.getLogger(__name__)


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Where a provider keeps arguments that were not a JSON object (cut off, or a bare value),
# or that parsed but belong to a reply the token limit cut off.
INVALID_JSON_KEY = "_invalid_json"
NOT_AN_OBJECT_KEY = "_value"
CUT_OFF_KEY = "_cut_off"

StopReason = Literal["end", "tool_use", "max_tokens", "refusal", "content_filter"]
"""Why a model reply ended, in both vendors' terms: finished, calling tools, cut off by the
token limit, refused (the text is the refusal), or withheld by a content filter."""


ToolChoice = Literal["auto", "none"]
"""Whether the model may call the offered tools (``auto``) or must answer in text (``none``:
the tools stay offered, as a conversation holding tool calls needs them described)."""


class ToolCall(_Wire):
    """A model's request to run one tool."""

    id: str
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)

    @property
    def malformed(self) -> bool:
        """Whether the arguments were not a JSON object or were cut off: the tool must not run."""
        return any(
            key in self.arguments for key in (INVALID_JSON_KEY, NOT_AN_OBJECT_KEY, CUT_OFF_KEY)
        )

    def cut_off(self) -> ToolCall:
        """This call from a reply the token limit cut off: its arguments may be incomplete."""
        if self.malformed:
            return self
        return self.model_copy(update={"arguments": {CUT_OFF_KEY: self.arguments}})


class ToolSpec(_Wire):
    """A tool offered to the model: name, what it does, JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ChatMessage(_Wire):
    """One message of a model conversation."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    # An assistant message's reasoning blocks, as its vendor sent them (see ModelResponse).
    reasoning: list[dict[str, Any]] = Field(default_factory=list)


class ModelResponse(_Wire):
    """A model's answer: text, tool calls or both, why it ended, and the tokens it used."""

    text: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    usage: Usage = Usage(requests=1)  # one response, one request
    model: str = ""
    stop: StopReason = "end"
    # Blocks the vendor wants back unchanged with the tool results of this answer
    # (Anthropic's thinking and redacted_thinking, with their signatures); opaque here.
    reasoning: list[dict[str, Any]] = Field(default_factory=list)


# What a request whose tokens are unknown spent: itself (a reply without usage, a stream
# that broke before its usage came).
UNMEASURED = Usage(requests=1, unmeasured_requests=1)


def read_reply(
    vendor: str, agent: str, read: Callable[[Any], ModelResponse], raw: Any
) -> ModelResponse:
    """``read(raw)``, with an answer in no shape the SDK knows (an HTML page from a proxy, a
    compatible server's nulls) a ProviderError: the provider failed, like an error status.

    Its text is valid Unicode: a lone surrogate (a JSON escape a server may send) is "?",
    so the turn can be stored and sent like any other. An answer without token usage is
    taken, with a warning: its cost is unknown (``Usage.unmeasured_requests``)."""
    try:
        response = read(raw)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ProviderError(
            vendor, agent, f"unreadable response: {type(exc).__name__}: {exc}"
        ) from None
    if response.usage.unmeasured_requests:
        log.warning(
            "%s reply for agent %s (model %s) reported no token usage: its tokens count as 0 "
            "and its cost is unknown",
            vendor,
            agent,
            response.model,
        )
    text = valid_unicode(response.text)
    # Tool calls too: their arguments go back to the model in the next request, and into
    # tool results and handoff notes, which the SDK could not encode.
    calls = [_valid_call(call) for call in response.tool_calls]
    if text == response.text and calls == response.tool_calls:
        return response
    return response.model_copy(update={"text": text, "tool_calls": calls})


def _valid_call(call: ToolCall) -> ToolCall:
    name, arguments = valid_unicode(call.name), valid_unicode_json(call.arguments)
    if name == call.name and arguments == call.arguments:
        return call
    return call.model_copy(update={"name": name, "arguments": arguments})


def valid_unicode(text: str) -> str:
    """``text`` with each lone surrogate (which UTF-8 cannot carry) as "?"."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def valid_unicode_json(value: Any) -> Any:
    """Parsed JSON with each string (keys too) made ``valid_unicode``."""
    if isinstance(value, str):
        return valid_unicode(value)
    if isinstance(value, list):
        return [valid_unicode_json(item) for item in value]
    if isinstance(value, dict):
        return {valid_unicode_json(key): valid_unicode_json(item) for key, item in value.items()}
    return value


# Told each piece of a reply's text as the model writes it (a streamed call).
TextSink = Callable[[str], Awaitable[None]]


@runtime_checkable
class Provider(Protocol):
    """Something that answers a conversation with text or tool calls."""

    name: str

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
        """One model call. Raises ProviderError once its retries are spent.

        With ``on_text`` the call streams, and ``on_text`` is told the text as it comes; the
        response is the same as without it.
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
