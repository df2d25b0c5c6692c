"""Clients of the fake LLM server shared by its tests: real SDKs pointed at it."""

from __future__ import annotations

from typing import Any

import anthropic
import openai

AGENT = {"X-Stickyray-Agent": "bookings"}


def ask_openai(client: openai.OpenAI, text: str = "hello there", **kwargs: Any) -> Any:
    messages: Any = [{"role": "user", "content": text}]
    return client.chat.completions.create(model="gpt-test", messages=messages, **kwargs)


def ask_claude(client: anthropic.Anthropic, text: str = "hello there", **kwargs: Any) -> Any:
    messages: Any = [{"role": "user", "content": text}]
    return client.messages.create(model="claude-test", max_tokens=64, messages=messages, **kwargs)
