"""Anthropic Messages through the official ``anthropic`` SDK."""

from __future__ import annotations

import json
import logging
from typing import Any

import anthropic

from providers._retries import (
    SERVER_ERROR_TYPES,
    StreamBroke,
    error_type,
    refuse_long_retry_after,
    requests_made,
    retry_stream,
)
from providers._timeouts import unstreamed_timeout
from providers.model import (
    NOT_AN_OBJECT_KEY,
    UNMEASURED,
    ChatMessage,
    ModelResponse,
    StopReason,
    TextSink,
    ToolCall,
    ToolChoice,
    ToolSpec,
    read_reply,
)
from providers.openai_provider import AGENT_HEADER
from stickyray.errors import ProviderError
from stickyray.turns import Usage

__all__ = ["AnthropicProvider"]

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 1024


def _blocks(message: ChatMessage) -> list[dict[str, Any]]:
    if message.role == "tool":
        return [
            {"type": "tool_result", "tool_use_id": message.tool_call_id, "content": message.content}
        ]
    # Thinking first, unchanged: a tool result sent without the thinking blocks of the
    # answer that called the tool is refused when thinking is on.
    blocks: list[dict[str, Any]] = [dict(block) for block in message.reasoning]
    if message.content.strip():  # the API refuses a text block of whitespace only
        blocks.append({"type": "text", "text": message.content})
    for call in message.tool_calls:
        blocks.append(
            {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}
        )
    return blocks


def to_anthropic(messages: list[ChatMessage]) -> tuple[str, list[dict[str, Any]]]:
    """Split out the system prompt and merge same-role neighbours, as the Messages API requires.

    Tool results travel in user messages there, so a run of tool results becomes one user turn.
    """
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    out: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            continue
        role = "assistant" if message.role == "assistant" else "user"
        blocks = _blocks(message)
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return system, out


_STOPS: dict[str | None, StopReason] = {
    "max_tokens": "max_tokens",
    "model_context_window_exceeded": "max_tokens",  # cut off just the same
    "tool_use": "tool_use",
    "refusal": "refusal",
}


def _read(response: anthropic.types.Message) -> ModelResponse:
    if not isinstance(response, anthropic.types.Message):
        raise TypeError(f"expected a message, got {type(response).__name__}")
    stop = _STOPS.get(response.stop_reason, "end")
    texts: list[str] = []
    calls: list[ToolCall] = []
    reasoning: list[dict[str, Any]] = []
    for block in response.content:
        if block.type in ("thinking", "redacted_thinking"):
            reasoning.append(block.model_dump(mode="json", exclude_none=True))
        elif block.type == "text":
            texts.append(block.text)
        elif block.type == "tool_use":
            args = block.input
            if not isinstance(args, dict):
                args = {NOT_AN_OBJECT_KEY: args}
            calls.append(ToolCall(id=block.id, name=block.name, arguments=args))
    if stop in ("max_tokens", "refusal"):
        # The last tool_use block may be incomplete, its input a fragment parsed to {}: the
        # token limit, or a streaming classifier that stopped the reply, cut it off.
        calls = [call.cut_off() for call in calls]
    if stop == "refusal":
        # Claude's refusal carries no message of its own: the text is what the classifier
        # stopped mid-way, no reply to show (OpenAI's refusal is the model's own words).
        texts = []
    usage = _usage(response.usage)
    return ModelResponse(
        text="".join(texts),
        tool_calls=calls,
        usage=usage,
        model=response.model,
        stop=stop,
        reasoning=reasoning,
    )


def _usage(tokens: anthropic.types.Usage | None) -> Usage:
    # The SDK does not validate replies: a compatible server may send no usage at all, or
    # leave out its counts (a count taken as 0 would make the cost too low, not unknown).
    if tokens is None or tokens.input_tokens is None or tokens.output_tokens is None:
        return UNMEASURED
    # input_tokens leaves out what the prompt cache read or wrote; OpenAI's prompt_tokens
    # include cached tokens, so both count every token of the prompt.
    read = tokens.cache_read_input_tokens or 0
    written = tokens.cache_creation_input_tokens or 0
    return Usage(
        input_tokens=tokens.input_tokens + read + written,
        output_tokens=tokens.output_tokens,
        requests=1,
        cached_input_tokens=read,
        cache_write_tokens=written,
    )


def _transient(exc: Exception) -> bool:
    """Whether a stream's error is one a new request may not meet: the server's or the
    connection's (timeouts included), not the request's."""
    if isinstance(exc, anthropic.APIConnectionError):
        return True
    return isinstance(exc, anthropic.APIStatusError) and error_type(exc.body) in SERVER_ERROR_TYPES


class AnthropicProvider:
    """A Provider on ``anthropic.AsyncAnthropic``; the SDK does timeouts and retries, and a
    stream that breaks before its first text is made again as often (``providers._retries``),
    ``retry_delay_s`` the first backoff."""

    name = "anthropic"

    def __init__(self, client: anthropic.AsyncAnthropic, *, retry_delay_s: float = 0.5) -> None:
        self._client = client
        self._retry_delay_s = retry_delay_s

    @classmethod
    def from_settings(
        cls,
        api_key: str,
        base_url: str,
        timeout_s: float,
        max_retries: int,
        *,
        retry_delay_s: float = 0.5,
    ) -> AnthropicProvider:
        """A provider with its own client."""
        # aiohttp under the SDK, as for OpenAI (httpx's pool is costly with many calls in flight).
        # The SDK waits as long as a Retry-After asks (an hour, say): the hook refuses that.
        http_client = anthropic.DefaultAioHttpClient(
            timeout=timeout_s, event_hooks={"response": [refuse_long_retry_after]}
        )
        client = anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout_s,
            max_retries=max_retries,
            http_client=http_client,
        )
        return cls(client, retry_delay_s=retry_delay_s)

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
        system, wire = to_anthropic(messages)
        kwargs: dict[str, Any] = {}
        if system:
            kwargs["system"] = system
        if temperature is not None:
            # Not a named parameter of this SDK version; the API still accepts it.
            kwargs["extra_body"] = {"temperature": temperature}
        if tools:
            if tool_choice != "auto":
                kwargs["tool_choice"] = {"type": tool_choice}
            kwargs["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": t.parameters}
                for t in tools
            ]
        kwargs |= {
            "model": model,
            "max_tokens": max_tokens or DEFAULT_MAX_TOKENS,
            "messages": wire,
            "extra_headers": {AGENT_HEADER: agent},
        }
        if on_text is not None:
            return await self._stream(agent, kwargs, on_text)
        try:
            timeout = anthropic.Timeout(self._client.timeout)
            response = await self._client.messages.create(
                **kwargs, timeout=unstreamed_timeout(timeout, kwargs["max_tokens"])
            )
        except (anthropic.APIError, json.JSONDecodeError) as exc:  # or a JSON body cut short
            raise ProviderError.of("anthropic", agent, exc) from None
        return read_reply("anthropic", agent, _read, response)

    async def _stream(self, agent: str, kwargs: dict[str, Any], on_text: TextSink) -> ModelResponse:
        """The same call, streamed: ``on_text`` gets the text as it comes, and the SDK's
        stream gives the final message as an unstreamed call does."""

        async def attempt(sink: TextSink, sdk_retries: int) -> ModelResponse:
            return await self._stream_once(agent, kwargs, sink, sdk_retries)

        retries, delay_s = self._client.max_retries, self._retry_delay_s
        return await retry_stream(
            "anthropic", agent, attempt, on_text, retries=retries, delay_s=delay_s
        )

    async def _stream_once(
        self, agent: str, kwargs: dict[str, Any], on_text: TextSink, sdk_retries: int
    ) -> ModelResponse:
        opened = False
        requests = 1
        started: anthropic.types.Message | None = None
        client = self._client
        if sdk_retries != client.max_retries:  # the retries earlier attempts left
            client = client.with_options(max_retries=sdk_retries)
        try:
            async with client.messages.stream(**kwargs) as stream:
                opened = True  # the SDK's retries are behind us
                requests = requests_made(stream.response)
                async for event in stream:
                    if event.type == "message_start":
                        started = event.message
                    elif event.type == "text" and event.text:
                        await on_text(event.text)
                # A 200 that ended before any event has no message: the SDK asserts one.
                response = None if started is None else await stream.get_final_message()
        except Exception as exc:  # an error status, or a stream that broke off or was unreadable
            failed = ProviderError.of("anthropic", agent, exc)
            if opened and _transient(exc):  # an overload sent in the stream, a dropped connection
                # message_start carries the usage so far; without it, a request of unknown tokens.
                spent = _usage(started.usage if started is not None else None)
                raise StreamBroke(failed.detail, spent, requests) from None
            raise failed from None
        if response is None:
            # Ended cleanly before its message_start (a proxy's timeout, say): no tokens known.
            raise StreamBroke("the stream ended before its message_start", UNMEASURED, requests)
        if response.stop_reason is None:
            # Ended cleanly, but before the reply did (a proxy's timeout, say): the SDK stops
            # iterating without an error, and the text so far is not the reply.
            spent = _usage(response.usage)
            raise StreamBroke("the stream ended before its stop_reason", spent, requests)
        return read_reply("anthropic", agent, _read, response)

    async def aclose(self) -> None:
        await self._client.close()
