"""Tool functions ``agents.yaml`` may name, in a module whose annotations are strings.

The first few cannot be offered to a model; the rest can.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import functools
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Literal


def _add(a: int, b: int) -> int:
    return a + b


add_one = functools.partial(_add, 1)  # no __name__

nameless = lambda text: text  # noqa: E731  # named "<lambda>"


def takes_a_socket(connection: socket.socket) -> str:
    """No JSON schema describes a socket."""
    return str(connection)


class Cabin(enum.Enum):
    ECONOMY = "economy"
    BUSINESS = "business"


def book_flight(
    day: datetime.date, cabin: Cabin, seat: Literal["window", "aisle"] = "aisle", **extra: Any
) -> str:
    """Book a flight."""
    return f"{day.isoformat()} {cabin.value} {seat}"


SIDE_EFFECTS: list[str] = []


def _in_a_thread(func: Callable[..., Awaitable[str]]) -> Callable[..., Awaitable[str]]:
    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Awaitable[str]:  # sync, returns the coroutine
        return func(**kwargs)

    return wrapper


@_in_a_thread
async def cancel_booking(booking: str) -> str:
    """Cancel a booking."""
    SIDE_EFFECTS.append(booking)
    return f"cancelled {booking}"


async def hangs(release: str = "") -> str:
    """A backend that never answers."""
    await asyncio.Event().wait()
    return "never"


async def backend_timeout() -> str:
    """A backend that answers with its own timeout."""
    raise TimeoutError("the booking system did not answer")
