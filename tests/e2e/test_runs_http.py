"""Queued runs over HTTP: real Ray, Serve, Redis and the openai SDK against the fake server."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import httpx
import pytest
from ray.util.state import list_actors

from actors.key import ThreadKey
from actors.redis_store import connect_redis
from actors.run_queue import RunQueue
from serve_app.run_worker import RUN_WORKER_DEPLOYMENT
from stickyray.config import RunsConfig
from stickyray.metrics import metrics_url
from stickyray.settings import Settings
from stickyray.testing import FakeLLMServer, FakeReply
from stickyray.turns import InboundMessage
from tests.e2e.conftest import App, app_name, new_thread, wait_for
from tests.e2e.teams import openai_team
from tests.e2e.test_metrics import scrape

pytestmark = pytest.mark.ray

RUNS = {"max_queued": 6, "max_in_flight": 4}


def run_worker_pid(app_name: str) -> int | None:
    """The process of the app's live run worker replica."""
    found = list_actors(
        filters=[
            ("class_name", "=", f"ServeReplica:{app_name}:{RUN_WORKER_DEPLOYMENT}"),
            ("state", "=", "ALIVE"),
        ],
        detail=True,
    )
    return found[0].pid if len(found) == 1 else None


def team() -> dict[str, Any]:
    config = openai_team()
    config["runs"] = RUNS
    return config


@pytest.fixture(scope="module")
def app(deploy) -> App:
    return deploy(team())


def script(fake: FakeLLMServer, latency_s: float = 0.0) -> None:
    """Triage hands bookings over; bookings echoes, taking ``latency_s`` per answer."""
    fake.on(
        agent="triage",
        user_contains="book",
        reply=FakeReply.tool_call("transfer_to_bookings", {"reason": "wants a booking"}),
    )
    fake.on(
        agent="bookings",
        reply=lambda req: FakeReply.text(f"bookings says: {req.last_user_text}"),
        latency_s=latency_s,
    )


def submit(client: httpx.Client, thread: str, text: str, mid: str, status: int = 202) -> Any:
    response = client.post(f"/v1/threads/{thread}/runs", json={"text": text, "message_id": mid})
    assert response.status_code == status, response.text
    return response.json()


def finished(client: httpx.Client, thread: str, *mids: str) -> list[dict[str, Any]]:
    """Poll until every run named is finished; their records."""
    records: dict[str, Any] = {}

    def done() -> bool:
        for mid in mids:
            response = client.get(f"/v1/threads/{thread}/runs/{mid}")
            assert response.status_code == 200, response.text
            records[mid] = response.json()
        return all(r["status"] in ("completed", "failed") for r in records.values())

    wait_for(done, timeout=60, what=f"runs {mids} of {thread}")
    return [records[m] for m in mids]


def test_runs_answer_in_the_background_in_order(app: App, fake_llm: FakeLLMServer) -> None:
    script(fake_llm, latency_s=0.5)
    thread = new_thread()
    texts = ["I want to book a table", "for 2 people", "at 8 pm"]
    with app.client() as client:
        queued = [submit(client, thread, text, f"m{i}") for i, text in enumerate(texts)]
        # Answered before any turn ran: each one waits at least 0.5 s for its answer.
        assert all(r["status"] in ("queued", "running") for r in queued)
        assert all(r["result"] is None and r["thread_id"] == thread for r in queued)
        # A run behind three that take 0.5 s each has not started: it can be cancelled.
        submit(client, thread, "and a cake", "m3")
        cancelled = client.post(f"/v1/threads/{thread}/runs/m3/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled" and cancelled.json()["result"] is None
        waiting = client.get(f"/v1/threads/{thread}/runs").json()
        assert [r["message_id"] for r in waiting["runs"]] == ["m0", "m1", "m2"]
        # Pages: from the run after the last one shown.
        page = client.get(f"/v1/threads/{thread}/runs?limit=1&after=m1").json()["runs"]
        assert [r["message_id"] for r in page] == ["m2"]
        unknown = client.get(f"/v1/threads/{thread}/runs?after=m9")
        assert unknown.status_code == 422 and unknown.json()["error"].startswith("query.after")
        records = finished(client, thread, "m0", "m1", "m2")
        assert client.get(f"/v1/threads/{thread}/runs?limit=5").json()["runs"] == []
        late = client.post(f"/v1/threads/{thread}/runs/m0/cancel")
        assert late.status_code == 409 and "has completed" in late.json()["error"]
        assert client.post(f"/v1/threads/{thread}/runs/m9/cancel").status_code == 404
        again = client.post(f"/v1/threads/{thread}/runs/m3/cancel")
        assert again.status_code == 200 and again.json()["status"] == "cancelled"
        assert [r["status"] for r in records] == ["completed"] * 3
        results = [r["result"] for r in records]
        assert [(t["turn"], t["agent"], t["message_id"]) for t in results] == [
            (1, "bookings", "m0"),
            (2, "bookings", "m1"),
            (3, "bookings", "m2"),
        ]
        assert results[0]["handoffs"] == [
            {"from": "triage", "to": "bookings", "reason": "wants a booking"}
        ]
        assert results[2]["reply"] == "bookings says: at 8 pm"
        # Follow-ups went straight to the specialist, as posted messages do.
        assert fake_llm.count(agent="triage") == 1 and fake_llm.count(agent="bookings") == 3
        assert all(r["started_at"] >= r["created_at"] for r in records)
        assert all(r["finished_at"] >= r["started_at"] for r in records)

        # The same message id again: the run as it stands, not a second one.
        again = submit(client, thread, "I want to book a table", "m0", status=200)
        assert again == records[0]
        # A run is a turn of the thread like any other: history and a posted retry agree.
        history = client.get(f"/v1/threads/{thread}/turns").json()["turns"]
        assert [t["message_id"] for t in history] == ["m0", "m1", "m2"]
        posted = client.post(
            f"/v1/threads/{thread}/messages", json={"text": "at 8 pm", "message_id": "m2"}
        )
        assert posted.json() == results[2]
    assert fake_llm.count(agent="bookings") == 3

    # Ray exports metrics every few seconds: poll until the runs show.
    url = metrics_url()
    assert url is not None
    wanted = {
        ("ray_stickyray_runs_total", (("status", "completed"),)): 3.0,
        ("ray_stickyray_runs_total", (("status", "cancelled"),)): 1.0,
        ("ray_stickyray_run_wait_seconds_count", ()): 3.0,
    }
    found: dict = {}

    def exported() -> bool:
        totals, _ = scrape(url, app.name)
        found.update({k: totals.get(k) for k in wanted})
        return found == wanted

    wait_for(exported, timeout=60, what=f"run metrics {wanted} (last seen {found})")


def test_bad_runs_get_clear_errors(app: App, fake_llm: FakeLLMServer) -> None:
    script(fake_llm, latency_s=0.5)
    thread = new_thread()
    with app.client() as client:
        blank = client.post(f"/v1/threads/{thread}/runs", json={"text": "  "})
        assert blank.status_code == 422 and "body.text" in blank.json()["error"]
        big = client.post(f"/v1/threads/{thread}/runs", json={"text": "x" * 2000})
        assert big.status_code == 413 and "body.text" in big.json()["error"]
        bad_thread = client.post("/v1/threads/-x/runs", json={"text": "hello"})
        assert bad_thread.status_code == 422 and "thread_id" in bad_thread.json()["error"]
        missing = client.get(f"/v1/threads/{thread}/runs/nope")
        assert missing.status_code == 404 and "nope" in missing.json()["error"]
        bad_id = client.get(f"/v1/threads/{thread}/runs/-bad")
        assert bad_id.status_code == 422 and "message_id" in bad_id.json()["error"]

        # A full queue refuses the next run and keeps every run it had accepted.
        mids = [f"q{i}" for i in range(RUNS["max_queued"])]
        for i, mid in enumerate(mids):
            submit(client, thread, f"book table {i}", mid)
        full = client.post(f"/v1/threads/{thread}/runs", json={"text": "one more"})
        assert full.status_code == 429, full.text
        assert "runs.max_queued" in full.json()["error"] and full.headers["retry-after"]
        records = finished(client, thread, *mids)
        assert [r["result"]["turn"] for r in records] == list(range(1, len(mids) + 1))
        assert submit(client, thread, "one more", "q-after")["status"] in ("queued", "running")
        finished(client, thread, "q-after")


def test_a_killed_worker_loses_and_repeats_nothing(app: App, fake_llm: FakeLLMServer) -> None:
    script(fake_llm, latency_s=0.5)
    threads = [new_thread(), new_thread()]
    with app.client() as client:
        for thread in threads:
            for i, text in enumerate(["book a room", "for 2 nights", "with a view"]):
                submit(client, thread, text, f"m{i}")

        def running() -> bool:
            status = client.get(f"/v1/threads/{threads[0]}/runs/m0").json()["status"]
            return status in ("running", "completed")

        wait_for(running, what="the first run to start")
        pid = run_worker_pid(app.name)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # Serve starts another replica, which takes over
        for thread in threads:
            records = finished(client, thread, "m0", "m1", "m2")
            assert [r["status"] for r in records] == ["completed"] * 3
            assert [r["result"]["turn"] for r in records] == [1, 2, 3]
            history = client.get(f"/v1/threads/{thread}/turns").json()["turns"]
            assert [t["message_id"] for t in history] == ["m0", "m1", "m2"]
    # Redelivered runs were answered from their stored turns: 3 specialist turns per thread.
    assert fake_llm.count(agent="bookings") == 6
    assert run_worker_pid(app.name) not in (None, pid)


def test_runs_queued_before_the_app_starts_are_answered(
    deploy, settings: Settings, fake_llm: FakeLLMServer
) -> None:
    """As after a restart of the whole cluster: the runs wait in Redis, and the app runs them."""
    script(fake_llm)
    name, thread = app_name(), new_thread()

    async def queue_before() -> None:
        redis = connect_redis(settings.redis_url or "")
        try:
            queue = RunQueue(redis, name, RunsConfig(**RUNS))
            for i, text in enumerate(["book a table", "for 4"]):
                await queue.submit(
                    ThreadKey.of(thread), InboundMessage(text=text, message_id=f"m{i}")
                )
        finally:
            await redis.aclose()

    asyncio.run(queue_before())
    app = deploy(team(), name=name)
    with app.client() as client:
        records = finished(client, thread, "m0", "m1")
    assert [(r["status"], r["result"]["turn"]) for r in records] == [
        ("completed", 1),
        ("completed", 2),
    ]
