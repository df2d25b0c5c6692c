"""Test helpers for stickyray users: a scriptable fake LLM server speaking OpenAI and Anthropic."""

from .fake_llm import (
    AGENT_HEADER,
    FakeLLMServer,
    FakeReply,
    FakeRequest,
    FakeRule,
    FakeToolCall,
)

__all__ = [
    "AGENT_HEADER",
    "FakeLLMServer",
    "FakeReply",
    "FakeRequest",
    "FakeRule",
    "FakeToolCall",
]
