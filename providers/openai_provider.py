"""OpenAI Chat Completions through the official ``openai`` SDK."""

from __future__ import annotations

import json
import logging
from typing import Any

import openai
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from providers._retries import (
    SERVER_ERROR_TYPES,
    StreamBroke,
    error_type,
    requests_made,
    retry_stream,
)
from providers._timeouts import unstreamed_timeout
from providers.model import (
    INVALID_JSON_KEY,
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
from stickyray.errors import ProviderError
from stickyray.turns import Usage

__all__ = ["OpenAIProvider"]

log = logging.getLogger(__name__)

AGENT_HEADER = "X-Stickyray-Agent"


def _to_openai(message: ChatMessage) -> dict[str, Any]:
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["content"] = message.content or None
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
            }
            for call in message.tool_calls
        ]
    return out


def _parse_arguments(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError:
        # The loop hands this back to the model as a tool error instead of failing the turn.
        return {INVALID_JSON_KEY: raw}
    return parsed if isinstance(parsed, dict) else {NOT_AN_OBJECT_KEY: parsed}


_STOPS: dict[str | None, StopReason] = {
    "length": "max_tokens",
    "content_filter": "content_filter",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
}


def _read(response: ChatCompletion) -> ModelResponse:
    if not isinstance(response, ChatCompletion):
        raise TypeError(f"expected a chat completion, got {type(response).__name__}")
    if not response.choices:
        raise ValueError("response has no choices")
    first = response.choices[0]
    choice = first.message
    stop = _STOPS.get(first.finish_reason, "end")
    calls = [
        ToolCall(id=c.id, name=c.function.name, arguments=_parse_arguments(c.function.arguments))
        for c in (choice.tool_calls or [])
        if c.type == "function"
    ]
    text = choice.content or ""
    if choice.refusal:
        text, stop = choice.refusal, "refusal"
    if stop in ("max_tokens", "refusal", "content_filter"):
        # Cut off by the token limit, or stopped by the model or the vendor's filter: the
        # arguments may be incomplete, and the calls of a refused reply are not to run.
        calls = [call.cut_off() for call in calls]
    return ModelResponse(
        text=text, tool_calls=calls, usage=_usage(response), model=response.model, stop=stop
    )


def _usage(response: ChatCompletion) -> Usage:
    # A compatible server may send no usage, ignore include_usage, or leave out (or null) its
    # counts: a count taken as 0 would make the cost too low, not unknown.
    tokens = response.usage
    if tokens is None or tokens.prompt_tokens is None or tokens.completion_tokens is None:
        return UNMEASURED
    details = tokens.prompt_tokens_details
    return Usage(
        input_tokens=tokens.prompt_tokens,
        output_tokens=tokens.completion_tokens,
        requests=1,
        cached_input_tokens=(details.cached_tokens or 0) if details is not None else 0,
    )


def _transient(exc: Exception) -> bool:
    """Whether a stream's error is one a new request may not meet: the server's or the
    connection's (timeouts included), not the request's."""
    if isinstance(exc, openai.APIConnectionError):
        return True
    return isinstance(exc, openai.APIError) and error_type(exc.body) in SERVER_ERROR_TYPES


class OpenAIProvider:
    """A Provider on ``openai.AsyncOpenAI``; the SDK does timeouts and retries with backoff,
    and a stream that breaks before its first text is made again as often
    (``providers._retries``), ``retry_delay_s`` the first backoff."""

    name = "openai"

    def __init__(self, client: openai.AsyncOpenAI, *, retry_delay_s: float = 0.5) -> None:
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
    ) -> OpenAIProvider:
        """A provider with its own client."""
        # aiohttp under the SDK: httpx's pool scans every open connection per request, which
        # cost a busy agent replica ~3x the CPU per call at 200 calls in flight (measured).
        client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout_s,
            max_retries=max_retries,
            http_client=openai.DefaultAioHttpClient(timeout=timeout_s),
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
        kwargs: dict[str, Any] = {}
        if tools:
            if tool_choice != "auto":
                kwargs["tool_choice"] = tool_choice
            kwargs["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters,
                    },
                }
                for t in tools
            ]
        if max_tokens is not None:
            kwargs["max_completion_tokens"] = max_tokens
        if temperature is not None:
            kwargs["temperature"] = temperature
        body = {"model": model, "messages": [_to_openai(m) for m in messages], **kwargs}
        if on_text is not None:
            return await self._stream(agent, body, on_text)
        try:
            # The client's own request path (retries, timeouts, typed errors and response),
            # without ``chat.completions.create``'s parameter transform: the body is already
            # wire JSON, and the transform costs ~4 ms of CPU per call at 30 messages.
            response = await self._client.post(
                "/chat/completions",
                body=body,
                cast_to=ChatCompletion,
                options={
                    "headers": {AGENT_HEADER: agent},
                    "timeout": unstreamed_timeout(openai.Timeout(self._client.timeout), max_tokens),
                },
            )
        except (openai.APIError, json.JSONDecodeError) as exc:  # or a JSON body cut short
            raise ProviderError.of("openai", agent, exc) from None
        return read_reply("openai", agent, _read, response)

    async def _stream(self, agent: str, body: dict[str, Any], on_text: TextSink) -> ModelResponse:
        """The same call, streamed: ``on_text`` gets the reply's text as its chunks come, and
        the SDK's own accumulator makes the completion read as an unstreamed one is."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}

        async def attempt(sink: TextSink, sdk_retries: int) -> ModelResponse:
            return await self._stream_once(agent, body, sink, sdk_retries)

        retries, delay_s = self._client.max_retries, self._retry_delay_s
        return await retry_stream(
            "openai", agent, attempt, on_text, retries=retries, delay_s=delay_s
        )

    async def _stream_once(
        self, agent: str, body: dict[str, Any], on_text: TextSink, sdk_retries: int
    ) -> ModelResponse:
        # Usage comes in the last chunk, after the finish: a stream that breaks reports none,
        # so it counts as a request whose tokens are unknown.
        state = ChatCompletionStreamState()
        opened = seen = False
        requests = 1
        try:
            chunks = await self._client.post(
                "/chat/completions",
                body=body,
                cast_to=ChatCompletion,
                # Only the retries earlier attempts left (see providers._retries).
                options={"headers": {AGENT_HEADER: agent}, "max_retries": sdk_retries},
                stream=True,
                stream_cls=openai.AsyncStream[ChatCompletionChunk],
            )
            opened = True  # the SDK's retries are behind us
            requests = requests_made(chunks.response)
            async with chunks:
                async for chunk in chunks:
                    state.handle_chunk(chunk)
                    seen = True
                    for choice in chunk.choices:
                        if choice.index == 0 and choice.delta.content:
                            await on_text(choice.delta.content)
        except Exception as exc:  # an error status, or a stream that broke off or was unreadable
            failed = ProviderError.of("openai", agent, exc)
            # A server error sent in the stream, or a dropped connection: worth another try.
            if opened and _transient(exc):
                raise StreamBroke(failed.detail, UNMEASURED, requests) from None
            raise failed from None
        # The snapshot, not get_final_completion(), which refuses a cut-off or filtered
        # reply: those read as they do unstreamed.
        response = state.current_completion_snapshot if seen else None
        if response is None or not response.choices or response.choices[0].finish_reason is None:
            # Ended cleanly, but before the reply did (a proxy's timeout, say): the SDK stops
            # iterating without an error, and the text so far is not the reply.
            raise StreamBroke("the stream ended before its finish_reason", UNMEASURED, requests)
        return read_reply("openai", agent, _read, response)

    async def aclose(self) -> None:
        await self._client.close()
