"""OpenAI Chat Completions wire format for the fake LLM server.

Pure functions: request JSON in, normalized fields out; a scripted reply in, response JSON or
SSE frames out. Nothing here knows about rules, recording or HTTP.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

from stickyray.testing._fake_script import StopReason

_SYSTEM_ROLES = frozenset({"system", "developer"})
# "function" is the pre-tools way of returning a result; old agents still send it.
_TOOL_ROLES = frozenset({"tool", "function"})
_ARGUMENT_PIECE = 16

ToolCallSpec = tuple[str | None, str, dict[str, Any]]
"""(id or None to generate one, function name, arguments)."""


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    return [m for m in messages if isinstance(m, dict)]


def _text(content: Any) -> str:
    """Text of a message's content: a plain string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return "\n".join(p for p in parts if isinstance(p, str))
    return ""


def system_text(body: dict[str, Any]) -> str:
    """System and developer messages, joined by newlines."""
    texts = [_text(m.get("content")) for m in _messages(body) if m.get("role") in _SYSTEM_ROLES]
    return "\n".join(texts)


def tool_names(body: dict[str, Any]) -> list[str]:
    """Names of the tools (and legacy functions) offered to the model."""
    names: list[str] = []
    for tool in body.get("tools") or []:
        if isinstance(tool, dict):
            # {"type": "function", "function": {...}} or {"type": "custom", "custom": {...}}
            spec = tool.get(tool.get("type") or "function")
            if isinstance(spec, dict) and isinstance(spec.get("name"), str):
                names.append(spec["name"])
    for function in body.get("functions") or []:
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.append(function["name"])
    return names


def tool_choice(body: dict[str, Any]) -> str:
    """``auto`` (also when unset), ``none``, ``required``, or the name of the forced tool."""
    choice = body.get("tool_choice")
    if isinstance(choice, str):
        return choice
    if isinstance(choice, dict):
        allowed = choice.get("allowed_tools")
        if choice.get("type") == "allowed_tools" and isinstance(allowed, dict):
            return str(allowed.get("mode") or "auto")  # auto or required, among a subset
        spec = choice.get(choice.get("type") or "function")
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            return spec["name"]
    return "auto"


def last_user_text(body: dict[str, Any]) -> str:
    """Text of the last role=user message."""
    for message in reversed(_messages(body)):
        if message.get("role") == "user":
            return _text(message.get("content"))
    return ""


def tool_results(body: dict[str, Any]) -> list[str]:
    """Contents of every tool result message, oldest first."""
    return [_text(m.get("content")) for m in _messages(body) if m.get("role") in _TOOL_ROLES]


def ends_with_tool_result(body: dict[str, Any]) -> bool:
    """Whether the last message is a tool result."""
    messages = _messages(body)
    return bool(messages) and messages[-1].get("role") in _TOOL_ROLES


def input_texts(body: dict[str, Any]) -> list[str]:
    """Every piece of input text that counts toward prompt tokens."""
    # System messages are ordinary messages here, so they are counted exactly once.
    return [_text(m.get("content")) for m in _messages(body)] + tool_names(body)


def error_body(status: int, message: str) -> dict[str, Any]:
    """The JSON body OpenAI sends with an HTTP error."""
    if status >= 500:
        kind = "server_error"
    elif status == 429:
        kind = "rate_limit_exceeded"
    elif status in (401, 403):
        kind = "authentication_error" if status == 401 else "permission_error"
    else:
        kind = "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def models_body(ids: list[str]) -> dict[str, Any]:
    """`GET /v1/models` list. Anthropic uses the same path, so this carries both SDKs' fields;
    each SDK reads its own and ignores the rest."""
    data = [
        {
            "id": model_id,
            "object": "model",
            "created": 0,
            "owned_by": "stickyray",
            "type": "model",
            "created_at": "1970-01-01T00:00:00Z",
            "display_name": model_id,
        }
        for model_id in ids
    ]
    page = {
        "has_more": False,
        "first_id": ids[0] if ids else None,
        "last_id": ids[-1] if ids else None,
    }
    return {"object": "list", "data": data, **page}


def _calls(seq: int, tool_calls: Sequence[ToolCallSpec]) -> list[dict[str, Any]]:
    return [
        {
            "id": call_id or f"call_fake{seq}_{index}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)},
        }
        for index, (call_id, name, arguments) in enumerate(tool_calls)
    ]


def _usage(input_tokens: int, output_tokens: int, cache_read: int) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": input_tokens,  # the cached ones too
        "completion_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }
    if cache_read:
        usage["prompt_tokens_details"] = {"cached_tokens": cache_read}
    return usage


def _finish_reason(stop: StopReason | None, calls: list[dict[str, Any]]) -> str:
    if stop == "max_tokens":
        return "length"
    if stop == "content_filter":
        return "content_filter"
    return "tool_calls" if calls else "stop"  # a refusal finishes normally


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
    """A complete `chat.completion` object."""
    calls = _calls(seq, tool_calls)
    # Like the real API: content is null when the model only calls tools.
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if stop in ("refusal", "content_filter"):
        message["content"] = None
    if stop == "refusal":
        message["refusal"] = text
    if calls:
        message["tool_calls"] = calls
    return {
        "id": f"chatcmpl-fake{seq}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": _finish_reason(stop, calls),
                "logprobs": None,
            }
        ],
        "usage": _usage(input_tokens, output_tokens, cache_read),
        "system_fingerprint": "fake",
    }


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
    """SSE frames of `chat.completion.chunk` objects, ending with `data: [DONE]` (not
    ``complete``: ending before the chunk with the finish reason; with ``error``, an
    `error_body`, a frame of it in its place).

    Text arrives word by word and tool arguments in small pieces, so client code that
    accumulates deltas is actually exercised.
    """
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    base = {
        "id": f"chatcmpl-fake{seq}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        data: dict[str, Any] = {
            **base,
            "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            ],
        }
        if include_usage:
            data["usage"] = None
        return _frame(data)

    yield chunk({"role": "assistant", "content": ""})
    field = "refusal" if stop == "refusal" else "content"
    for piece in re.findall(r"\s*\S+|\s+", "" if stop == "content_filter" else text):
        yield chunk({field: piece})
    calls = _calls(seq, tool_calls)
    for index, call in enumerate(calls):
        function = call["function"]
        yield chunk(
            {
                "tool_calls": [
                    {
                        "index": index,
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": function["name"], "arguments": ""},
                    }
                ]
            }
        )
        arguments = function["arguments"]
        for start in range(0, len(arguments), _ARGUMENT_PIECE):
            piece = arguments[start : start + _ARGUMENT_PIECE]
            yield chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
    if error is not None:  # an `error_body`, sent in place of the finish
        yield _frame(error)
        return
    if not complete:
        return
    yield chunk({}, _finish_reason(stop, calls))
    if include_usage:
        yield _frame(
            {**base, "choices": [], "usage": _usage(input_tokens, output_tokens, cache_read)}
        )
    yield "data: [DONE]\n\n"


def _frame(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def fake_embedding(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector: hashed words, so texts sharing words are similar."""
    vector = [0.0] * dimensions
    for word in text.lower().split():
        digest = hashlib.blake2b(word.strip(".,;:!?\"'()").encode(), digest_size=8).digest()
        slot = int.from_bytes(digest[:4], "little") % dimensions
        vector[slot] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


EMBEDDING_MAX_TOKENS = 8192


def embeddings_refusal(body: dict[str, Any]) -> str | None:
    """Why the API would answer 400, as it does: an input over the model's 8,192 tokens, or
    ``dimensions`` for a model older than text-embedding-3.

    Tokens are counted as the real tokenizer's worst case, one per UTF-8 byte, so a client
    that fits this fits the real API.
    """
    inputs = body.get("input", [])
    texts = [inputs] if isinstance(inputs, str) else [str(t) for t in inputs]
    if any(len(t.encode()) > EMBEDDING_MAX_TOKENS for t in texts):
        return f"This model's maximum context length is {EMBEDDING_MAX_TOKENS} tokens"
    if "dimensions" in body and str(body.get("model", "")).startswith("text-embedding-ada"):
        return "This model does not support specifying dimensions."
    return None


def embeddings_body(body: dict[str, Any]) -> dict[str, Any]:
    """A `create embeddings` response for ``body`` (a string or a list of strings)."""
    inputs = body.get("input", [])
    texts = [inputs] if isinstance(inputs, str) else [str(t) for t in inputs]
    dimensions = int(body.get("dimensions") or 1536)
    return {
        "object": "list",
        "model": body.get("model", "fake-embedding"),
        "data": [
            {"object": "embedding", "index": i, "embedding": fake_embedding(t, dimensions)}
            for i, t in enumerate(texts)
        ],
        "usage": {
            "prompt_tokens": sum(len(t.split()) for t in texts),
            "total_tokens": sum(len(t.split()) for t in texts),
        },
    }
