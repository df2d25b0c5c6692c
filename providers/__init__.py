"""LLM providers (OpenAI, Anthropic, offline) behind one provider-neutral wire model."""

from providers.model import ChatMessage, ModelResponse, Provider, ToolCall, ToolSpec

__all__ = ["ChatMessage", "ModelResponse", "Provider", "ToolCall", "ToolSpec"]
