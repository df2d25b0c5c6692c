"""Anthropic Messages wire format for the fake LLM server.

Pure functions: request JSON in, normalized fields out; a scripted reply in, response JSON or
SSE frames out. Nothing here knows about rules, recording or HTTP.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

from stickyray.testing._fake_script import StopReason

_ARGUMENT_PIECE = 16
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}

ToolCallSpec = tuple[str | None, str, dict[str, Any]]
"""(id or None to generate one, tool name, input)."""


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    return [m for m in messages if isinstance(m, dict)]


def _blocks(content: Any) -> list[dict[str, Any]]:
    """Content as a list of blocks; a plain string is shorthand for one text block."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [block for block in content if isinstance(block, dict)]
    return []


def _text(content: Any) -> str:
    """The text blocks of some content, joined by newlines."""
    texts = [b.get("text") for b in _blocks(content) if b.get("type") == "text"]
    return "\n".join(t for t in texts if isinstance(t, str))


def system_text(body: dict[str, Any]) -> str:
    """The `system` prompt, a string or a list of text blocks."""
    return _text(body.get("system"))


def tool_names(body: dict[str, Any]) -> list[str]:
    """Names of the tools offered to the model."""
    tools = body.get("tools") or []
    return [t["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)]


def tool_choice(body: dict[str, Any]) -> str:
    """``auto`` (also when unset), ``none``, ``required`` (Anthropic's ``any``), or the name
    of the forced tool."""
    choice = body.get("tool_choice")
    if not isinstance(choice, dict):
        return "auto"
    kind = choice.get("type")
    if kind == "tool" and isinstance(choice.get("name"), str):
        return str(choice["name"])
    return {"none": "none", "any": "required"}.get(str(kind), "auto")


def last_user_text(body: dict[str, Any]) -> str:
    """Text of the last text block of a user turn, ignoring tool_result blocks.

    A user turn that only carries tool results is skipped, so after a tool round trip this is
    still what the person asked, the same as the OpenAI view (where results are role=tool).
    Anthropic wants user and assistant turns to alternate, so consecutive user messages (one
    left without a reply by a failed turn, then the new one) arrive as one turn, a text
    block each: the last block is the last message, as OpenAI's last role=user is.
    """
    for message in reversed(_messages(body)):
        if message.get("role") != "user":
            continue
        blocks = _blocks(message.get("content"))
        texts = [b.get("text") for b in blocks if b.get("type") == "text"]
        if texts:
            return texts[-1] if isinstance(texts[-1], str) else ""
    return ""


def _tool_result_blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in _blocks(message.get("content")) if b.get("type") == "tool_result"]


def tool_results(body: dict[str, Any]) -> list[str]:
    """Contents of every tool_result block, oldest first."""
    return [
        _text(block.get("content"))
        for message in _messages(body)
        for block in _tool_result_blocks(message)
    ]


def ends_with_tool_result(body: dict[str, Any]) -> bool:
    """Whether the last message is a user turn carrying tool results."""
    messages = _messages(body)
    return bool(messages) and bool(_tool_result_blocks(messages[-1]))


def input_texts(body: dict[str, Any]) -> list[str]:
    """Every piece of input text that counts toward input tokens."""
    texts = [system_text(body)]
    for message in _messages(body):
        texts.append(_text(message.get("content")))
        texts.extend(_text(block.get("content")) for block in _tool_result_blocks(message))
    return texts + tool_names(body)


def error_body(status: int, message: str) -> dict[str, Any]:
    """The JSON body Anthropic sends with an HTTP error."""
    default = "api_error" if status >= 500 else "invalid_request_error"
    kind = _ERROR_TYPES.get(status, default)
    return {"type": "error", "error": {"type": kind, "message": message}}


def _stop_reason(stop: StopReason | None, tool_calls: Sequence[ToolCallSpec]) -> str:
    if stop == "max_tokens":
        return "max_tokens"
    if stop is not None:  # no content filter here: a refusal
        return "refusal"
    return "tool_use" if tool_calls else "end_turn"


def _content(
    seq: int, text: str, tool_calls: Sequence[ToolCallSpec], stop: StopReason | None = None
) -> list[dict[str, Any]]:
    # The real API never sends an empty text block next to tool calls, and a refusal may
    # come with no content at all.
    blocks: list[dict[str, Any]] = []
    if text or not (tool_calls or stop in ("refusal", "content_filter")):
        blocks.append({"type": "text", "text": text})
    for index, (call_id, name, arguments) in enumerate(tool_calls):
        call_id = call_id or f"toolu_fake{seq}_{index}"
        blocks.append({"type": "tool_use", "id": call_id, "name": name, "input": arguments})
    return blocks


def _message(seq: int, model: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": f"msg_fake{seq}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }


def _input(input_tokens: int, cache_read: int, cache_write: int) -> dict[str, int]:
    """The usage of the prompt: ``input_tokens`` leaves out what the cache read or wrote."""
    usage = {"input_tokens": input_tokens - cache_read - cache_write}
    if cache_read or cache_write:
        usage |= {"cache_read_input_tokens": cache_read, "cache_creation_input_tokens": cache_write}
    return usage


def reply_body(
    *,
    seq: int,
    model: str,
    text: str,
    tool_calls: Sequence[ToolCallSpec],
    input_tokens: int,
    output_tokens: int,
    stop: StopReason | None = None,
    cache_read: int = 0,
    cache_write: int = 0,
) -> dict[str, Any]:
    """A complete `message` object."""
    message = _message(seq, model, _content(seq, text, tool_calls, stop))
    message["stop_reason"] = _stop_reason(stop, tool_calls)
    message["usage"] = {
        **_input(input_tokens, cache_read, cache_write),
        "output_tokens": output_tokens,
    }
    return message


def reply_stream(
    body: dict[str, Any],
    *,
    seq: int,
    model: str,
    text: str,
    tool_calls: Sequence[ToolCallSpec],
    input_tokens: int,
    output_tokens: int,
    stop: StopReason | None = None,
    cache_read: int = 0,
    cache_write: int = 0,
    complete: bool = True,
    error: dict[str, Any] | None = None,
) -> Iterator[str]:
    """SSE events from `message_start` to `message_stop`, as the Messages API streams them
    (not ``complete``: ending before `message_delta`, which carries the stop reason; with
    ``error``, an `error_body`, an `error` event in its place).

    Text arrives word by word and tool input in small `input_json_delta` pieces, so client code
    that accumulates deltas is actually exercised.
    """
    start = _message(seq, model, [])
    start["usage"] = {**_input(input_tokens, cache_read, cache_write), "output_tokens": 1}
    yield _event("message_start", {"type": "message_start", "message": start})
    yield _event("ping", {"type": "ping"})
    for index, block in enumerate(_content(seq, text, tool_calls, stop)):
        if block["type"] == "text":
            opening: dict[str, Any] = {"type": "text", "text": ""}
            deltas = [
                {"type": "text_delta", "text": piece}
                for piece in re.findall(r"\s*\S+|\s+", block["text"])
            ]
        else:
            opening = {**block, "input": {}}
            arguments = json.dumps(block["input"])
            deltas = [
                {"type": "input_json_delta", "partial_json": arguments[i : i + _ARGUMENT_PIECE]}
                for i in range(0, len(arguments), _ARGUMENT_PIECE)
            ]
        yield _event(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": opening},
        )
        for delta in deltas:
            yield _event(
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta},
            )
        yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
    if error is not None:  # an `error_body`, sent in place of the finish
        yield _event("error", error)
        return
    if not complete:
        return
    delta = {"stop_reason": _stop_reason(stop, tool_calls), "stop_sequence": None}
    usage = {"output_tokens": output_tokens}
    yield _event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
    yield _event("message_stop", {"type": "message_stop"})


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"
