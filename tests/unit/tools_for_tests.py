"""Tool functions ``agents.yaml`` may name that cannot be offered to a model."""

from __future__ import annotations

import functools
import socket


def _add(a: int, b: int) -> int:
    return a + b


add_one = functools.partial(_add, 1)  # no __name__

nameless = lambda text: text  # noqa: E731  # named "<lambda>"


def takes_a_socket(connection: socket.socket) -> str:
    """No JSON schema describes a socket."""
    return str(connection)
