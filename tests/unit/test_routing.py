"""The evidence router with the real all-MiniLM-L6-v2 model on hand-written agents (no network).

The agents here are deliberately not SGD services: the router must work from names and
descriptions alone.
"""

from __future__ import annotations

import pytest

from memory.embedders import LocalEmbedder
from providers.routing import (
    RECENT_USER_MESSAGES,
    AgentProfile,
    EvidenceRouter,
    IntentProfile,
)

AGENTS = [
    AgentProfile(
        "invoices",
        "Billing and invoices: explain charges, resend invoices and refund payments",
        (
            IntentProfile(
                "GetInvoice", "Find and resend an invoice", ("Invoice number", "Billing month")
            ),
            IntentProfile(
                "RequestRefund",
                "Refund a charge on the bill",
                ("Amount to refund", "Reason for the refund"),
            ),
        ),
    ),
    AgentProfile(
        "restaurant_bookings",
        "Find restaurants and reserve tables",
        (
            IntentProfile(
                "FindRestaurant",
                "Find a restaurant by city and cuisine",
                ("City of the restaurant", "Type of cuisine", "Price range"),
            ),
            IntentProfile(
                "ReserveTable",
                "Reserve a table at a restaurant",
                (
                    "Name of the restaurant",
                    "Number of people in the party",
                    "Date of the reservation",
                    "Time of the reservation",
                ),
            ),
        ),
    ),
    AgentProfile(
        "taxi_rides",
        "On-demand taxi and cab rides",
        (
            IntentProfile(
                "BookRide",
                "Call a taxi to take you to a destination",
                ("Destination address", "Number of passengers", "Pickup time"),
            ),
        ),
    ),
    AgentProfile(
        "tech_support",
        "Help with software, devices, accounts and connection problems",
        (
            IntentProfile(
                "Troubleshoot",
                "Diagnose and fix a problem with a device or app",
                ("Device", "Error message"),
            ),
            IntentProfile("ResetPassword", "Reset the password of an account", ("Account email",)),
        ),
    ),
    AgentProfile(
        "weather",
        "Weather forecasts for any city and date",
        (
            IntentProfile(
                "GetForecast",
                "Get the weather forecast",
                ("City", "Date", "Temperature", "Chance of rain"),
            ),
        ),
    ),
]

BOOKING = ["I'd like to book a table for four at an Italian place tonight"]
RESTAURANT = "restaurant_bookings"


@pytest.fixture(scope="module")
def router() -> EvidenceRouter:
    return EvidenceRouter(LocalEmbedder(), AGENTS)


def test_profile_from_dataset_entry_uses_slot_descriptions() -> None:
    entry = {
        "name": "Parking_1",
        "description": "Reserve parking spaces",
        "intents": [
            {
                "name": "ReserveSpot",
                "description": "Reserve a parking spot",
                "required_slots": ["garage"],
                "optional_slots": ["hours"],
            }
        ],
        "slots": [
            {"name": "garage", "description": "Name of the garage"},
            {"name": "hours", "description": "How many hours to park"},
        ],
    }
    profile = AgentProfile.from_dataset_entry(entry)
    assert profile.intents == (
        IntentProfile(
            "ReserveSpot",
            "Reserve a parking spot",
            ("Name of the garage", "How many hours to park"),
        ),
    )
    views = profile.view_texts()
    assert views["description"] == ["Parking: Reserve parking spaces"]
    assert views["intent"] == ["Reserve Spot: Reserve a parking spot"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Can I reserve a table for four on Friday?", RESTAURANT),
        ("I need a cab to the airport", "taxi_rides"),
        ("I was charged twice on my last bill", "invoices"),
        ("My laptop keeps losing the wifi connection", "tech_support"),
        ("Will it rain in Paris tomorrow?", "weather"),
    ],
)
async def test_first_turn_routes_by_meaning(router, text: str, expected: str) -> None:
    decision = await router.route([text])
    assert decision.agent == expected
    assert set(decision.scores) == {a.name for a in AGENTS}
    assert "evidence router" in decision.reason


async def test_route_uses_the_whole_history(router) -> None:
    follow_up = "yes, 2 people please"
    alone = await router.route([follow_up])
    with_history = await router.route(["Book a table for two at Luigi's at 8pm", follow_up])
    assert alone.agent != RESTAURANT  # on its own the follow-up says little
    assert with_history.agent == RESTAURANT


@pytest.mark.parametrize(
    "follow_up",
    [
        "yes, 2 people please",
        "what's their address?",
        "thanks!",
        "How much will it cost?",
        "Do they have vegetarian options?",
    ],
)
async def test_short_follow_ups_stay(router, follow_up: str) -> None:
    assert await router.check([*BOOKING, follow_up], RESTAURANT) is None


@pytest.mark.parametrize(
    ("move", "expected"),
    [
        ("I also need a cab to get there", "taxi_rides"),
        ("Will it rain there tonight?", "weather"),
        ("I was charged twice on my last bill", "invoices"),
        ("My phone app keeps crashing when I log in", "tech_support"),
    ],
)
async def test_clear_topic_moves_switch(router, move: str, expected: str) -> None:
    decision = await router.check([*BOOKING, "yes, 2 people please", move], RESTAURANT)
    assert decision is not None
    assert decision.agent == expected
    assert RESTAURANT not in decision.scores
    assert "accumulated margin" in decision.reason and "latest margin" in decision.reason


async def test_after_a_switch_old_messages_do_not_pull_back(router) -> None:
    thread = [*BOOKING, "yes, 2 people please", "I also need a cab to get there"]
    assert await router.check(thread, "taxi_rides") is None
    assert await router.check([*thread, "what's the fare?"], "taxi_rides") is None


async def test_evidence_accumulates_over_consistent_messages(router) -> None:
    hints = ["I need to get to the airport", "Can someone pick me up at 7?"]
    third = "How long will the drive take?"
    # Each hint on its own is too ambiguous to leave the restaurant agent...
    for hint in [*hints, third]:
        assert await router.check([*BOOKING, hint], RESTAURANT) is None
    # ...but consistent ones add up.
    decision = await router.check([*BOOKING, *hints, third], RESTAURANT)
    assert decision is not None and decision.agent == "taxi_rides"
    two = await router.check([*BOOKING, *hints], RESTAURANT)
    assert two is None or two.agent == "taxi_rides"
    if two is not None:
        assert decision.scores["taxi_rides"] > two.scores["taxi_rides"]


async def test_check_reads_only_the_recent_messages(router) -> None:
    old = ["Will it rain in Paris tomorrow?"] * RECENT_USER_MESSAGES
    recent = [*BOOKING, "yes, 2 people please", "thanks!", "what's their address?", "ok"]
    assert len(recent) == RECENT_USER_MESSAGES
    assert await router.check([*old, *recent], RESTAURANT) is None


async def test_empty_threads_and_unknown_agents(router) -> None:
    assert await router.check([], RESTAURANT) is None
    assert (await router.route(["  "])).agent == AGENTS[0].name
    moved = await router.check(["Will it rain in Paris tomorrow?"], "no_such_agent")
    assert moved is not None and moved.agent == "weather"


def test_router_needs_distinct_agents() -> None:
    with pytest.raises(ValueError):
        EvidenceRouter(LocalEmbedder(), [])
    with pytest.raises(ValueError):
        EvidenceRouter(LocalEmbedder(), [AGENTS[0], AGENTS[0]])


# Two agents that cover the same ground, worded differently, each with one thing the other
# lacks: wifi for one, smoking rooms for the other.
HOTELS = AgentProfile(
    "hotel_rooms",
    "Search hotels and reserve rooms",
    (
        IntentProfile(
            "SearchHotel",
            "Find a hotel in a city",
            ("City of the hotel", "Star rating of the hotel", "Whether the hotel has wifi"),
        ),
        IntentProfile(
            "ReserveHotel",
            "Reserve rooms at a hotel for given dates",
            ("Check-in date", "Number of nights", "Number of rooms"),
        ),
    ),
)
LODGING = AgentProfile(
    "lodging_portal",
    "Accommodation booking portal",
    (
        IntentProfile(
            "SearchHotel",
            "Look for accommodation in a city",
            ("City of the accommodation", "Star rating", "Whether smoking is allowed inside"),
        ),
        IntentProfile(
            "ReserveHotel",
            "Book rooms at the accommodation for given dates",
            ("Check in date", "Length of stay in nights", "Number of rooms"),
        ),
    ),
)
STAY = ["I need a hotel in Lisbon for next week"]


@pytest.fixture(scope="module")
def overlap_router() -> EvidenceRouter:
    return EvidenceRouter(LocalEmbedder(), [*AGENTS, HOTELS, LODGING])


@pytest.fixture(scope="module")
def capability_only() -> EvidenceRouter:
    """The same agents with accumulated evidence switched off: only the capability rule moves."""
    return EvidenceRouter(
        LocalEmbedder(),
        [*AGENTS, HOTELS, LODGING],
        switch_threshold=100.0,
        new_request_threshold=100.0,
    )


async def test_overlapping_agents_are_found_from_their_intents(overlap_router) -> None:
    await overlap_router.prepare()
    assert overlap_router.overlapping(HOTELS.name, LODGING.name)
    assert overlap_router.overlapping(LODGING.name, HOTELS.name)
    assert not overlap_router.overlapping(HOTELS.name, RESTAURANT)
    assert not overlap_router.overlapping("taxi_rides", "weather")


@pytest.mark.parametrize(
    ("active", "message", "expected"),
    [
        (HOTELS.name, "Can I smoke in the room?", LODGING.name),
        (LODGING.name, "Is there wifi in the rooms?", HOTELS.name),
    ],
)
async def test_a_distinctive_capability_moves_between_overlapping_agents(
    overlap_router, capability_only, active: str, message: str, expected: str
) -> None:
    thread = [*STAY, "yes, 2 rooms", message]
    decision = await capability_only.check(thread, active)
    assert decision is not None
    assert decision.agent == expected
    assert "the two agents overlap" in decision.reason
    # With accumulated evidence on too, the thread moves the same way.
    both = await overlap_router.check(thread, active)
    assert both is not None and both.agent == expected


@pytest.mark.parametrize(
    "message",
    [
        "What's the address of the hotel?",
        "Book 2 rooms for 3 nights from Friday",
        "How many stars does it have?",
        "yes please",
    ],
)
async def test_what_both_overlapping_agents_offer_does_not_move(
    overlap_router, capability_only, message: str
) -> None:
    for router in (capability_only, overlap_router):
        for active in (HOTELS.name, LODGING.name):
            assert await router.check([*STAY, message], active) is None


async def test_distinctive_capabilities_only_move_between_overlapping_agents(
    capability_only,
) -> None:
    # Wifi is the hotel agent's alone, but the restaurant agent does not overlap with it.
    thread = [*BOOKING, "Do they have wifi?"]
    assert await capability_only.check(thread, RESTAURANT) is None
    moved = await capability_only.check([*STAY, "Do they have wifi?"], LODGING.name)
    assert moved is not None and moved.agent == HOTELS.name
