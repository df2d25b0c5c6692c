"""The bodies and path parameters the HTTP API takes, and the answers it gives beyond the
turn records."""

from fastapi import HTTPException, Path
from pydantic import BaseModel, ConfigDict, Field, field_validator

from actors.key import ID_PATTERN, ThreadKey
from actors.run_records import RunRecord
from serve_app.channel_messages import CHANNEL_ID_PREFIXES
from stickyray.errors import InvalidThreadKey
from stickyray.turns import TurnResult, message_text
from stickyray.webhooks import MAX_URL_LENGTH

__all__ = [
    "AgentInfo",
    "ChatIn",
    "Health",
    "MessageIdPath",
    "MessageIn",
    "OpenRuns",
    "ResetIn",
    "RunIn",
    "ThreadIdPath",
    "TurnHistory",
    "thread_key",
]

ThreadIdPath = Path(description="The conversation thread.", max_length=128)
MessageIdPath = Path(description="The message id of the run.", pattern=ID_PATTERN)


def thread_key(thread_id: str) -> ThreadKey:
    """The key of the thread a route's path names; a 422 naming the path if it is invalid."""
    try:
        return ThreadKey.of(thread_id)
    except InvalidThreadKey as exc:
        raise HTTPException(422, f"path.thread_id: {exc.reason}") from None


def _api_id(value: str | None) -> str | None:
    """A message id sent through the API: never one of a channel's.

    A chat's next message id is predictable: taken through the API first, the user's own
    message would be answered with another turn, or not at all.
    """
    if value is not None and value.startswith(CHANNEL_ID_PREFIXES):
        prefixes = " or ".join(CHANNEL_ID_PREFIXES)
        raise ValueError(f"ids starting with {prefixes} belong to the channels")
    return value


class MessageIn(BaseModel):
    """A user message for a thread."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, description="What the user wrote.")
    message_id: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="Client id of the message; generated when absent.",
    )
    user_id: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="Whose long-term memory the turn reads and writes; the thread's own if absent.",
    )

    @field_validator("text")
    @classmethod
    def _sendable(cls, value: str) -> str:
        return message_text(value)

    @field_validator("message_id")
    @classmethod
    def _not_a_channels(cls, value: str | None) -> str | None:
        return _api_id(value)


class ChatIn(MessageIn):
    """A user message to answer now."""

    stream: bool = Field(
        default=False,
        strict=True,  # only true or false: "no" or 1 is a client's mistake, not a choice
        description="Answer with server-sent events: the reply's text as the model writes "
        "it (`delta`), then the turn (`turn`) or an `error`.",
    )


class RunIn(MessageIn):
    """A user message to answer in the background."""

    webhook_url: str | None = Field(
        default=None,
        max_length=MAX_URL_LENGTH,
        description="Where to POST the run's outcome once it finishes (signed); it must be "
        "under one of agents.yaml's runs.webhook_urls.",
    )


class ResetIn(BaseModel):
    """An optional body of a reset."""

    model_config = ConfigDict(extra="forbid")

    message_id: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="Client id of the reset: a retry with the same id returns the first "
        "answer and deletes nothing sent since. Generated when absent.",
    )

    @field_validator("message_id")
    @classmethod
    def _not_a_channels(cls, value: str | None) -> str | None:
        return _api_id(value)


class AgentInfo(BaseModel):
    """An agent as GET /v1/agents shows it."""

    name: str
    role: str
    description: str
    provider: str
    model: str
    replicas: int


class TurnHistory(BaseModel):
    """Result of GET /v1/threads/{thread_id}/turns."""

    thread_id: str
    turns: list[TurnResult]


class OpenRuns(BaseModel):
    """Result of GET /v1/threads/{thread_id}/runs: runs not finished, in the order they run."""

    thread_id: str
    runs: list[RunRecord]


class Health(BaseModel):
    """Result of GET /healthz."""

    status: str
    checks: dict[str, str]
