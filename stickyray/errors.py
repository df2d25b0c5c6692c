"""The one exception hierarchy of stickyray.

Every class here can cross a Ray process boundary: each passes all of its constructor
arguments to ``super().__init__`` so the default pickling rebuilds it intact.
"""

from __future__ import annotations

__all__ = [
    "CheckpointConflict",
    "ChannelSendFailed",
    "CompressionNotStored",
    "ConfigError",
    "InvalidThreadKey",
    "MessageIdReused",
    "ProviderError",
    "RunQueueFull",
    "StickyrayError",
    "StoreUnavailable",
    "ThreadFenced",
    "ThreadPassivated",
    "TurnPending",
]


class StickyrayError(Exception):
    """Base class of every error stickyray raises on purpose."""


class ConfigError(StickyrayError):
    """A configuration file or environment setting is wrong; the message says where and how."""


class InvalidThreadKey(StickyrayError, ValueError):
    """A tenant or thread id does not match the allowed format."""

    def __init__(self, field: str, value: str, reason: str) -> None:
        super().__init__(field, value, reason)
        self.field = field
        self.value = value
        self.reason = reason

    def __str__(self) -> str:
        return f"invalid {self.field} {self.value!r}: {self.reason}"


class CoreBlocksFull(StickyrayError, ValueError):
    """A user's core blocks are as many as allowed: a new label needs an old one gone."""


class CheckpointConflict(StickyrayError):
    """A checkpoint write lost its compare-and-set: the thread was written since it was read."""

    def __init__(self, thread: str, expected_version: int, found_version: int) -> None:
        super().__init__(thread, expected_version, found_version)
        self.thread = thread
        self.expected_version = expected_version
        self.found_version = found_version

    def __str__(self) -> str:
        return (
            f"checkpoint conflict on {self.thread}: expected version {self.expected_version}, "
            f"store has {self.found_version}"
        )


class StoreUnavailable(StickyrayError):
    """A backing store (Redis, Postgres) cannot be reached."""

    def __init__(self, store: str, detail: str) -> None:
        super().__init__(store, detail)
        self.store = store
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.store} is unavailable: {self.detail}"


class CompressionNotStored(StickyrayError):
    """A compression was paid for (its summary, its embedding), but its memory was not stored.

    ``usage`` is what it cost (a ``Usage`` as a dict): the thread counts it in the turn, and
    keeps the messages for the next turn to compress again.
    """

    def __init__(self, reason: str, usage: dict[str, object]) -> None:
        super().__init__(reason, usage)
        self.reason = reason
        self.usage = usage

    def __str__(self) -> str:
        return f"the compression was paid for but its memory was not stored: {self.reason}"


class ProviderError(StickyrayError):
    """An LLM provider call failed after its retries.

    ``usage`` is what its attempts are known to have spent (a ``Usage`` as a dict: those of
    streams that broke after their response began), empty when none is known.
    """

    def __init__(
        self, provider: str, agent: str, detail: str, usage: dict[str, object] | None = None
    ) -> None:
        super().__init__(provider, agent, detail, usage)
        self.provider = provider
        self.agent = agent
        self.detail = detail
        self.usage = usage or {}

    def __str__(self) -> str:
        return f"{self.provider} call for agent {self.agent!r} failed: {self.detail}"

    @classmethod
    def of(cls, provider: str, agent: str, exc: BaseException) -> ProviderError:
        """A vendor SDK's error as one: its type and message, and the cause it wraps.

        The SDKs report any failure to connect over aiohttp as "Request timed out.": the
        cause says what it was ("Cannot connect to host ... Connect call failed").
        """
        detail = f"{type(exc).__name__}: {exc}"
        cause = exc.__cause__
        if cause is not None and str(cause) and str(cause) not in detail:
            detail += f" ({type(cause).__name__}: {cause})"
        return cls(provider, agent, detail)


class ThreadFenced(StickyrayError):
    """A newer incarnation of the thread exists; this one must stop serving it."""

    def __init__(self, thread: str, epoch: int) -> None:
        super().__init__(thread, epoch)
        self.thread = thread
        self.epoch = epoch

    def __str__(self) -> str:
        return f"thread {self.thread}: incarnation {self.epoch} was superseded"


class ThreadPassivated(StickyrayError):
    """The thread's actor is shutting down; the message must go to its next incarnation."""

    def __init__(self, thread: str) -> None:
        super().__init__(thread)
        self.thread = thread

    def __str__(self) -> str:
        return f"thread {self.thread} is passivating"


class TurnPending(StickyrayError):
    """The store holds an accepted turn of the thread whose outcome is not stored yet."""

    def __init__(self, thread: str, seq: int) -> None:
        super().__init__(thread, seq)
        self.thread = thread
        self.seq = seq

    def __str__(self) -> str:
        return f"turn {self.seq} of {self.thread} is still pending"


class MessageIdReused(StickyrayError):
    """A message id already taken in the thread by a different message (text or user).

    A message id is an idempotency key: sent again with the same message it returns the
    first answer; with another message it is refused, not answered with the first one's.
    """

    def __init__(self, thread: str, message_id: str) -> None:
        super().__init__(thread, message_id)
        self.thread = thread
        self.message_id = message_id

    def __str__(self) -> str:
        return (
            f"message_id {self.message_id!r} was already used in thread {self.thread} for a "
            "different message; send each new message with a new message_id"
        )


class RunQueueFull(StickyrayError):
    """The run queue holds as many runs as allowed: retry later."""

    def __init__(self, queued: int, cap: int) -> None:
        super().__init__(queued, cap)
        self.queued = queued
        self.cap = cap

    def __str__(self) -> str:
        return f"the run queue is full: {self.queued} runs waiting or running (runs.max_queued)"


class ChannelSendFailed(StickyrayError):
    """A channel (Telegram, WhatsApp) did not take a reply.

    ``permanent``: sending it again cannot work (the user blocked the bot, a bad token).
    ``retry_after``: seconds the platform asked to wait before the next try.
    """

    def __init__(
        self, channel: str, reason: str, permanent: bool, retry_after: float | None = None
    ) -> None:
        super().__init__(channel, reason, permanent, retry_after)
        self.channel = channel
        self.reason = reason
        self.permanent = permanent
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.channel}: {self.reason}"
