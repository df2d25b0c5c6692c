"""How long a model call waits for its reply.

A streamed reply sends its text as the model writes it, so the client's timeout bounds the
quiet between two pieces, and a long reply is never cut off. An unstreamed reply sends
nothing until it is whole: waited for only as long, a long one timed out while the model was
still writing it, and the SDK asked for it again (each time paid for), up to its retries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from openai import Timeout  # the HTTP client's, which the Anthropic SDK uses too

__all__ = ["TOKENS_PER_S", "unstreamed_timeout"]

# The pace the Anthropic SDK assumes of a model writing a reply that is not streamed: an hour
# for 128,000 tokens (~36 a second).
TOKENS_PER_S = 128_000 / 3600


def unstreamed_timeout(timeout: Timeout, max_tokens: int | None) -> Timeout:
    """``timeout`` (the client's) with a read timeout long enough for the model to write
    ``max_tokens`` at ``TOKENS_PER_S``, when that is longer than its own."""
    writing_s = 0.0 if max_tokens is None else max_tokens / TOKENS_PER_S
    if timeout.read is None or writing_s <= timeout.read:
        return timeout
    return type(timeout)(
        connect=timeout.connect, read=writing_s, write=timeout.write, pool=timeout.pool
    )
