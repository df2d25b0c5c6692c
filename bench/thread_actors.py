"""Thread actors next to bare Ray actors, measured side by side in one run.

Reports, with medians and p99: a bare actor's creation time and memory; a thread actor's
memory (USS, RSS), cold activation (first message to a thread with no live actor, through
HTTP), warm turn latency, and recovery after a kill (kill -> next reply). The fake LLM answers
at once, so turn latencies are stickyray's own overhead plus ~1 ms of fake server.
"""

from __future__ import annotations

import json
import logging
import socket
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil
import ray
from ray import serve
from ray.util.state import list_actors

from actors.directory import NAMESPACE
from actors.key import ThreadKey
from serve_app.app import build_app
from stickyray.config import parse_config
from stickyray.embedded_redis import EmbeddedRedis
from stickyray.settings import Settings
from stickyray.testing import FakeLLMServer, FakeReply

RESULTS = Path(__file__).parent / "results"

TEAM = {
    "supervisor": {
        "name": "triage",
        "description": "Routes.",
        "provider": "openai",
        "model": "bench",
    },
    "specialists": [
        {"name": "bookings", "description": "Bookings.", "provider": "openai", "model": "bench"}
    ],
}


@ray.remote(num_cpus=0)
class BareActor:
    """The smallest actor: the floor a thread actor is compared with."""

    def pid(self) -> int:
        import os

        return os.getpid()


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": statistics.median(ordered), "p99": p99, "n": len(ordered)}


def _memory(pid: int) -> tuple[float, float]:
    info = psutil.Process(pid).memory_full_info()
    return info.uss / 2**20, info.rss / 2**20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pid_of(name: str) -> int:
    filters = [("name", "=", name), ("state", "=", "ALIVE")]
    address = ray.get_runtime_context().gcs_address  # this cluster, not any other on the machine
    (actor,) = list_actors(address=address, filters=filters, detail=True)  # type: ignore[arg-type]
    assert actor.pid is not None, name
    return int(actor.pid)


def measure_bare(samples: int) -> dict[str, Any]:
    created, uss, rss, actors = [], [], [], []
    for _ in range(samples):
        start = time.perf_counter()
        actor = BareActor.remote()  # type: ignore[attr-defined]
        pid = ray.get(actor.pid.remote())
        created.append(time.perf_counter() - start)
        actors.append(actor)
        u, r = _memory(pid)
        uss.append(u)
        rss.append(r)
    for actor in actors:
        ray.kill(actor)
    return {"create_s": _stats(created), "uss_mb": _stats(uss), "rss_mb": _stats(rss)}


def measure_threads(client: httpx.Client, samples: int, warm_turns: int) -> dict[str, Any]:
    def post(thread: str, text: str) -> float:
        start = time.perf_counter()
        response = client.post(f"/v1/threads/{thread}/messages", json={"text": text})
        response.raise_for_status()
        return time.perf_counter() - start

    new_thread: list[float] = []
    cold: list[float] = []
    warm: list[float] = []
    recovery: list[float] = []
    uss: list[float] = []
    rss: list[float] = []
    for _ in range(samples):
        thread = f"bench-{uuid.uuid4().hex[:10]}"
        new_thread.append(post(thread, "book a table"))  # creates the actor, routes
        warm.extend(post(thread, f"follow-up {i}") for i in range(warm_turns))
        u, r = _memory(pid_of(ThreadKey.of(thread).actor_name))
        uss.append(u)
        rss.append(r)
        # Cold: the thread exists in Redis but no actor is live (as after passivation).
        actor = ray.get_actor(ThreadKey.of(thread).actor_name, namespace=NAMESPACE)
        ray.get(actor.passivate.remote())
        ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + 60
        while True:  # until Ray has released the name, as the directory would see it
            try:
                ray.get_actor(ThreadKey.of(thread).actor_name, namespace=NAMESPACE)
            except ValueError:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray kept the name of killed actor {thread} for 60 s")
            time.sleep(0.01)
        cold.append(post(thread, "back again"))
        # Recovery: a live actor is killed; the next message pays detection plus restore.
        actor = ray.get_actor(ThreadKey.of(thread).actor_name, namespace=NAMESPACE)
        ray.kill(actor, no_restart=True)
        recovery.append(post(thread, "after the crash"))
    return {
        "first_message_new_thread_s": _stats(new_thread),
        "cold_activation_s": _stats(cold),
        "warm_turn_s": _stats(warm),
        "recovery_after_kill_s": _stats(recovery),
        "uss_mb": _stats(uss),
        "rss_mb": _stats(rss),
    }


def main(quick: bool = False) -> int:
    samples, warm_turns = (3, 20) if quick else (10, 50)
    with tempfile.TemporaryDirectory() as tmp, FakeLLMServer() as fake:
        fake.on(agent="triage", reply=FakeReply.tool_call("transfer_to_bookings", {"reason": "b"}))
        fake.on(agent="bookings", reply=FakeReply.text("ok"))
        redis = EmbeddedRedis(Path(tmp) / "redis")
        settings = Settings(
            REDIS_URL=redis.start(),
            OPENAI_API_KEY="bench",
            OPENAI_BASE_URL=fake.openai_base_url,
            STICKYRAY_API_KEY=None,  # the bench's clients send none, whatever the shell has
        )
        ray.init(address="local", namespace=NAMESPACE, logging_level=logging.ERROR)
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            team = parse_config(TEAM, Path("<bench>"))
            serve.run(build_app(team, settings, app_name="bench"), name="bench", route_prefix="/")
            bare = measure_bare(samples)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                threads = measure_threads(client, samples, warm_turns)
        finally:
            serve.shutdown()
            ray.shutdown()
            redis.stop()
    ratios = {
        "cold_activation_vs_bare_create": threads["cold_activation_s"]["p50"]
        / bare["create_s"]["p50"],
        "thread_uss_vs_bare_uss": threads["uss_mb"]["p50"] / bare["uss_mb"]["p50"],
        "thread_rss_vs_bare_rss": threads["rss_mb"]["p50"] / bare["rss_mb"]["p50"],
    }
    result = {
        "machine": f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "quick": quick,
        "bare_actor": bare,
        "thread_actor": threads,
        "ratios": ratios,
    }
    _print(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "threads.json").write_text(json.dumps(result, indent=2))
    return 0


def _print(result: dict[str, Any]) -> None:
    rows = [("bare actor: create", result["bare_actor"]["create_s"], "s")]
    rows += [(f"bare actor: {k}", result["bare_actor"][k], "MB") for k in ("uss_mb", "rss_mb")]
    for name, unit in [
        ("first_message_new_thread_s", "s"),
        ("cold_activation_s", "s"),
        ("warm_turn_s", "s"),
        ("recovery_after_kill_s", "s"),
        ("uss_mb", "MB"),
        ("rss_mb", "MB"),
    ]:
        rows.append((f"thread actor: {name}", result["thread_actor"][name], unit))
    print(f"\nthread actors vs bare Ray actors on {result['machine']}")
    print(f"{'measure':<44}{'p50':>10}{'p99':>10}  unit")
    for label, stats, unit in rows:
        scale = 1000 if unit == "s" else 1
        shown = "ms" if unit == "s" else unit
        print(f"{label:<44}{stats['p50'] * scale:>10.1f}{stats['p99'] * scale:>10.1f}  {shown}")
    for name, value in result["ratios"].items():
        print(f"ratio {name:<38}{value:>10.2f}")
