"""Turn and model metrics reach the node's Prometheus endpoint, labelled by app and agent."""

from __future__ import annotations

import time
import urllib.request
from collections import defaultdict

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stickyray.dashboard import metric_names
from stickyray.metrics import metrics_url
from stickyray.testing import FakeLLMServer, FakeReply
from tests.e2e.conftest import App, new_thread
from tests.e2e.teams import openai_team

# Dollars per million tokens: 1 for input, 0.5 for input read from the prompt cache, 2 for output.
PRICES = {"gpt-metrics": {"input": 1.0, "output": 2.0, "cached_input": 0.5}}


@pytest.fixture(scope="module")
def app(deploy) -> App:
    return deploy(openai_team(model="gpt-metrics") | {"pricing": PRICES})


# Our labels; Ray adds its own (WorkerId, SessionName, ...), one series per process.
OURS = {
    "agent",
    "status",
    "supervisor",
    "from_agent",
    "to_agent",
    "model",
    "direction",
    "use",
    "channel",
    "outcome",
}


Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, app_name: str) -> tuple[Series, dict[str, set[str]]]:
    """Every sample of ``app_name``, summed over Ray's per-process labels; and, by metric,
    the processes (Ray's WorkerId) that recorded it."""
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    totals: Series = defaultdict(float)
    workers: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.labels.get("app") != app_name:
                continue
            labels = {k: v for k, v in sample.labels.items() if k in OURS}
            totals[(sample.name, tuple(sorted(labels.items())))] += sample.value
            workers[sample.name].add(sample.labels.get("WorkerId", ""))
    return totals, workers


def test_turns_handoffs_tokens_and_cost_are_counted(app: App, fake_llm: FakeLLMServer) -> None:
    fake_llm.on(agent="triage", reply=FakeReply.tool_call("transfer_to_bookings", {"reason": "b"}))
    fake_llm.on(agent="bookings", reply=FakeReply.text("booked").cached(read=2))
    first, second = new_thread(), new_thread()
    sends = [
        (first, "book a room", "m1"),
        (first, "for two", "m2"),
        (first, "for two", "m2"),  # a retry: its stored result, not a turn
        (second, "book a room", "m3"),
    ]
    bodies = {}
    with app.client() as client:
        for thread, text, message_id in sends:
            response = client.post(
                f"/v1/threads/{thread}/messages", json={"text": text, "message_id": message_id}
            )
            assert response.status_code == 200, response.text
            bodies[message_id] = response.json()
    # Each turn's cost is its tokens at the team's prices, per agent and in all.
    cost: dict[str, float] = defaultdict(float)
    for body in bodies.values():
        for agent, usage in body["usage_by_agent"].items():
            cached = usage["cached_input_tokens"]
            assert cached == (2 * usage["requests"] if agent == "bookings" else 0)
            fresh = usage["input_tokens"] - cached
            expected_cost = (fresh * 1.0 + cached * 0.5 + usage["output_tokens"] * 2.0) / 1e6
            assert usage["cost_usd"] == pytest.approx(expected_cost)
            cost[agent] += usage["cost_usd"]
        assert body["usage"]["cost_usd"] == pytest.approx(
            sum(u["cost_usd"] for u in body["usage_by_agent"].values())
        )
    assert set(cost) == {"triage", "bookings"} and all(cost.values())
    url = metrics_url()
    assert url is not None
    expected = {
        ("ray_stickyray_turns_total", (("agent", "bookings"), ("status", "completed"))): 3,
        ("ray_stickyray_turn_seconds_count", (("agent", "bookings"),)): 3,
        ("ray_stickyray_supervisor_decisions_total", (("supervisor", "triage"),)): 2,
        (
            "ray_stickyray_handoffs_total",
            (("from_agent", "triage"), ("to_agent", "bookings")),
        ): 2,
        ("ray_stickyray_llm_requests_total", (("agent", "triage"), ("model", "gpt-metrics"))): 2,
        ("ray_stickyray_llm_requests_total", (("agent", "bookings"), ("model", "gpt-metrics"))): 3,
        (
            "ray_stickyray_llm_cache_tokens_total",
            (("agent", "bookings"), ("model", "gpt-metrics"), ("use", "read")),
        ): 6,
    }
    tokens = [("triage", "input"), ("bookings", "input"), ("bookings", "output")]
    # The turns are done; Ray's metrics agent exports every few seconds. Were the retried m2
    # counted, bookings would reach 4.
    deadline = time.monotonic() + 90
    while True:
        totals, workers = scrape(url, app.name)
        got = {key: totals.get(key, 0) for key in expected}
        spent = {
            (agent, direction): totals.get(
                (
                    "ray_stickyray_llm_tokens_total",
                    (("agent", agent), ("direction", direction), ("model", "gpt-metrics")),
                ),
                0,
            )
            for agent, direction in tokens
        }
        charged = {
            agent: totals.get(
                (
                    "ray_stickyray_llm_cost_usd_total",
                    (("agent", agent), ("model", "gpt-metrics")),
                ),
                0,
            )
            for agent in cost
        }
        if (
            got == expected
            and all(spent.values())
            and all(charged[a] == pytest.approx(cost[a]) for a in cost)
        ):
            break
        assert time.monotonic() < deadline, f"metrics never reached {expected}: {got} {charged}"
        time.sleep(0.5)  # between scrapes
    # The Grafana dashboard reads these under the names Ray exports (a histogram's _bucket).
    exercised = {
        "ray_stickyray_turns_total",
        "ray_stickyray_turn_seconds_bucket",
        "ray_stickyray_supervisor_decisions_total",
        "ray_stickyray_handoffs_total",
        "ray_stickyray_llm_requests_total",
        "ray_stickyray_llm_tokens_total",
        "ray_stickyray_llm_cache_tokens_total",
        "ray_stickyray_llm_cost_usd_total",
    }
    assert exercised <= metric_names()
    assert exercised <= {name for name, _ in totals}
    # Two threads, two thread actors, one recording process: series do not grow with threads.
    assert len(workers["ray_stickyray_turns_total"]) == 1, workers["ray_stickyray_turns_total"]
