"""Team configurations used by the end-to-end tests."""

from __future__ import annotations

from typing import Any


def openai_team(provider: str = "openai", model: str = "gpt-test") -> dict[str, Any]:
    """A supervisor and three specialists on one provider, with a handoff loop available."""
    return {
        "supervisor": {
            "name": "triage",
            "description": "Routes each new conversation to a specialist.",
            "instructions": "You are triage. Hand the user to the right specialist.",
            "provider": provider,
            "model": model,
        },
        "specialists": [
            {
                "name": "invoices",
                "description": "Invoices, bills and payments.",
                "instructions": "You handle invoices.",
                "provider": provider,
                "model": model,
                "handoffs": ["support"],
                "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1},
            },
            {
                "name": "bookings",
                "description": "Reservations of tables, rooms and flights.",
                "instructions": "You handle bookings.",
                "provider": provider,
                "model": model,
                "num_replicas": 2,
            },
            {
                "name": "support",
                "description": "Technical support for the app.",
                "instructions": "You handle technical support.",
                "provider": provider,
                "model": model,
                "handoffs": ["invoices"],
            },
        ],
        "threads": {"buffer_size": 60, "max_handoffs_per_turn": 3, "max_message_bytes": 1024},
    }


def memory_team(short_window: int = 6) -> dict[str, Any]:
    """The OpenAI team with long-term memory on bookings (OpenAI embeddings, 384 dims)."""
    team = openai_team()
    team["specialists"][1]["memory"] = {"short_window": short_window, "top_k": 3}
    team["memory"] = {"embedder": "openai", "dimension": 384}
    return team
