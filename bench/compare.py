"""stickyray side by side with the raw Ray pieces it is made of, and with peer frameworks.

One run, one machine, one fake LLM server answering every call after the same latency L:

1. the raw Ray path: a no-op request through the Serve HTTP proxy, a Ray actor call, a Serve
   handle call, a checkpoint-sized Redis write, one LLM round trip through the OpenAI SDK
   beyond L, and a bare actor's creation time and memory;
2. stickyray, with one actor per thread (the default) and with pooled hosting: a new
   thread's first turn, a routed turn on a live thread (supervisor + specialist), a
   follow-up (specialist only), hot-turn overhead (turn latency minus L per model call),
   cold activation, memory per live thread, and throughput with 200 concurrent threads
   sending follow-ups next to a raw Serve pipeline (proxy -> ingress -> agent -> LLM) with the
   same L;
3. the peers (``bench.peers``): the OpenAI Agents SDK and LangGraph on the same fake server.

Ratios are computed from numbers taken minutes apart on the same machine; absolute times on
a shared 2-core machine drift, the ratios hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import psutil
import ray
import redis.asyncio as aioredis
from openai import AsyncOpenAI
from ray import serve
from starlette.requests import Request

from actors.directory import NAMESPACE, passivate_actor, passivate_thread, pool_scope
from actors.key import ThreadKey
from bench.fake_llm_process import FakeLLMProcess
from bench.thread_actors import _memory, _stats, free_port, measure_bare, pid_of
from serve_app.app import build_app
from stickyray.config import TeamConfig, parse_config
from stickyray.embedded_redis import EmbeddedRedis
from stickyray.settings import Settings
from stickyray.testing import AGENT_HEADER

RESULTS = Path(__file__).parent / "results"

TEAM: dict[str, Any] = {
    "supervisor": {
        "name": "triage",
        "description": "Routes each new conversation to a specialist.",
        "provider": "openai",
        "model": "bench",
    },
    "specialists": [
        {"name": "invoices", "description": "Invoices.", "provider": "openai", "model": "bench"},
        {"name": "bookings", "description": "Bookings.", "provider": "openai", "model": "bench"},
    ],
}


# -- the raw pieces ---------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class Noop:
    """The smallest Serve deployment: answers HTTP and handle calls with nothing."""

    async def __call__(self, request: Request) -> str:
        return "ok"

    async def ping(self) -> str:
        return "ok"


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class RawAgent:
    """One model call through the OpenAI SDK, nothing else: the raw pipeline's agent."""

    def __init__(self, base_url: str) -> None:
        # The same SDK transport as stickyray's OpenAI provider, so only the pipeline differs.
        self._client = AsyncOpenAI(
            base_url=base_url,
            api_key="bench",
            max_retries=0,
            # Through the module: cloudpickle would copy the class itself, and break it.
            http_client=openai.DefaultAioHttpClient(),
        )

    async def reply(self, text: str) -> str:
        response = await self._client.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": text}],
            extra_headers={AGENT_HEADER: "raw"},
        )
        return response.choices[0].message.content or ""


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class RawIngress:
    """HTTP in, one handle call to the agent, JSON out: a raw Serve pipeline."""

    def __init__(self, agent: Any) -> None:
        self._agent = agent

    async def __call__(self, request: Request) -> dict[str, str]:
        body = await request.json()
        return {"reply": await self._agent.reply.remote(body["text"])}


@ray.remote(num_cpus=0)
class PingActor:
    def ping(self) -> int:
        return 0


async def _timed(call: Callable[[], Awaitable[Any]], samples: int) -> list[float]:
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        await call()
        times.append(time.perf_counter() - start)
    return times


async def measure_raw(
    http: httpx.AsyncClient, redis_url: str, fake: FakeLLMProcess, samples: int, size: int
) -> dict[str, Any]:
    """Each raw piece on its own, timed from the driver."""
    noop = serve.get_app_handle("bench-noop")
    actor = PingActor.remote()  # type: ignore[attr-defined]
    await actor.ping.remote()
    client = aioredis.Redis.from_url(redis_url)
    llm = AsyncOpenAI(base_url=fake.url, api_key="bench", max_retries=0)
    value = b"x" * size

    async def chat() -> None:
        await llm.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={AGENT_HEADER: "raw"},
        )

    try:
        for warm in (lambda: http.get("/bench-noop"), noop.ping.remote, actor.ping.remote, chat):
            await warm()
        result: dict[str, Any] = {
            "http_noop_s": _stats(await _timed(lambda: http.get("/bench-noop"), samples)),
            "actor_call_s": _stats(await _timed(actor.ping.remote, samples)),
            "handle_call_s": _stats(await _timed(noop.ping.remote, samples)),
            "redis_write_s": _stats(
                await _timed(lambda: client.set("bench:checkpoint", value), samples)
            ),
            "llm_sdk_beyond_L_s": _stats(
                [t - fake.latency_s for t in await _timed(chat, max(samples // 4, 5))]
            ),
            "redis_value_bytes": size,
        }
    finally:
        await client.aclose()
        await llm.close()
        ray.kill(actor)
    # A hot turn crosses each piece once, and writes to Redis twice (accept, then commit).
    parts = ["http_noop_s", "actor_call_s", "handle_call_s", "llm_sdk_beyond_L_s"]
    for q in ("p50", "p99"):
        result[f"path_{q}_s"] = sum(result[p][q] for p in parts) + 2 * result["redis_write_s"][q]
    return result


# -- stickyray ---------------------------------------------------------------------------------


async def _post(http: httpx.AsyncClient, prefix: str, thread: str, text: str) -> float:
    start = time.perf_counter()
    response = await http.post(f"{prefix}/v1/threads/{thread}/messages", json={"text": text})
    response.raise_for_status()
    return time.perf_counter() - start


async def _leave(key: ThreadKey, team: TeamConfig, app: str) -> None:
    """Passivate a thread, and with an actor per thread let its actor go too."""
    await passivate_thread(key, team, pool_scope(app, team))
    if team.threads.hosting == "actor":
        await passivate_actor(key.actor_name)


async def measure_turns(
    http: httpx.AsyncClient,
    fake: FakeLLMProcess,
    app: str,
    team: TeamConfig,
    threads: int,
    follow_ups: int,
) -> dict[str, Any]:
    """Turn latencies on one app, one thread at a time (no queueing anywhere)."""
    prefix = f"/{app}"
    L = fake.latency_s
    first, routed, follow, cold, uss = [], [], [], [], []
    # A warm thread first, as the peers have: replicas, connections and imports are ready.
    warm = ThreadKey.of(f"bench-warm-{uuid.uuid4().hex[:10]}")
    await _post(http, prefix, warm.thread_id, "book a table")
    await _post(http, prefix, warm.thread_id, "for 2 people")
    await _leave(warm, team, app)
    calls_before = fake.stats()[0]
    turns = 0
    for _ in range(threads):
        thread = f"bench-{uuid.uuid4().hex[:10]}"
        first.append(await _post(http, prefix, thread, "book a table"))
        for i in range(follow_ups):
            follow.append(await _post(http, prefix, thread, f"for {i + 2} people"))
        await _post(http, prefix, thread, "/supervisor")  # a command: no model call
        routed.append(await _post(http, prefix, thread, "and a room for tonight"))
        turns += 2 + follow_ups
        if team.threads.hosting == "actor":
            uss.append(_memory(pid_of(ThreadKey.of(thread).actor_name))[0])
        # Cold: the thread is stored but not live (as after passivation or an idle timeout).
        await passivate_thread(ThreadKey.of(thread), team, pool_scope(app, team))
        cold.append(await _post(http, prefix, thread, "back again") - L)
        turns += 1
        await _leave(ThreadKey.of(thread), team, app)  # the throughput's threads are the live ones
    calls = fake.stats()[0] - calls_before
    # The scripted path: two model calls for a first or routed turn, one for the others.
    expected = threads * (2 + 2 + follow_ups + 1)
    if calls != expected:
        raise RuntimeError(f"{app}: {calls} model calls, expected {expected}: script broke")
    overhead = [t - L for t in follow]
    result = {
        "first_turn_new_thread_s": _stats(first),
        "routed_turn_live_thread_s": _stats(routed),
        "follow_up_s": _stats(follow),
        "follow_up_over_routed": _stats(follow)["p50"] / _stats(routed)["p50"],
        "hot_overhead_s": _stats(overhead),
        "cold_activation_overhead_s": _stats(cold),
        "turns": turns,
    }
    if uss:
        result["thread_actor_uss_mb"] = _stats(uss)
    return result


async def measure_throughput(
    base: str, path_of: Callable[[str], str], threads: int, follow_ups: int
) -> dict[str, Any]:
    """``threads`` conversations at once, each sending ``follow_ups`` one after another.

    The load comes from aiohttp: httpx's connection pool costs the driver ~18 ms of CPU per
    request at 200 open connections (measured), which would cap both pipelines alike.
    """
    ids = [f"tp-{uuid.uuid4().hex[:10]}" for _ in range(threads)]
    connector = aiohttp.TCPConnector(limit=threads)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as http:

        async def send(thread: str, text: str) -> None:
            async with http.post(path_of(thread), json={"text": text}) as response:
                body = await response.text()
                if response.status != 200:
                    raise RuntimeError(f"{thread}: HTTP {response.status}: {body[:300]}")

        await asyncio.gather(*(send(t, "book a table") for t in ids))  # every thread is live

        async def conversation(thread: str) -> None:
            for i in range(follow_ups):
                await send(thread, f"for {i + 2} people")

        start = time.perf_counter()
        await asyncio.gather(*(conversation(t) for t in ids))
        elapsed = time.perf_counter() - start
    return {
        "threads": threads,
        "turns": threads * follow_ups,
        "turns_per_s": threads * follow_ups / elapsed,
    }


def _hosts_uss(app: str) -> float:
    names = [
        e["name"]
        for e in ray.util.list_named_actors(all_namespaces=True)
        if e["namespace"] == NAMESPACE and e["name"].startswith(f"threadhost/{app}/")
    ]
    return sum(_memory(pid_of(name))[0] for name in names)


# -- the run -----------------------------------------------------------------------------------


def _team(hosting: str) -> TeamConfig:
    config = json.loads(json.dumps(TEAM))
    config["threads"] = {"hosting": hosting, "pool_size": 2}
    return parse_config(config, Path("<bench>"))


async def _measure_cluster(
    fake: FakeLLMProcess, settings: Settings, port: int, quick: bool
) -> dict[str, Any]:
    samples = 50 if quick else 300
    threads, follow_ups = (4, 5) if quick else (12, 20)
    tp_threads, tp_follow = (50, 2) if quick else (200, 5)
    limits = httpx.Limits(max_connections=tp_threads * 2, max_keepalive_connections=tp_threads * 2)
    base = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:
        # A checkpoint-sized value: a thread's stored checkpoint after a buffer's worth of turns.
        result["raw"] = await measure_raw(http, settings.redis_url or "", fake, samples, 4096)
        bare = await asyncio.to_thread(measure_bare, 3 if quick else 10)
        result["bare_actor"] = bare
        for hosting in ("actor", "pooled"):
            team = _team(hosting)
            result[hosting] = await measure_turns(
                http, fake, f"bench-{hosting}", team, threads, follow_ups
            )
        result["throughput"] = {
            "pooled": await measure_throughput(
                base, lambda t: f"/bench-pooled/v1/threads/{t}/messages", tp_threads, tp_follow
            ),
            "raw_serve": await measure_throughput(
                base, lambda t: "/bench-raw", tp_threads, tp_follow
            ),
        }
        result["pooled"]["uss_per_thread_mb"] = _hosts_uss("bench-pooled") / tp_threads
    return result


def _deploy(settings: Settings, fake: FakeLLMProcess) -> None:
    serve.run(Noop.bind(), name="bench-noop", route_prefix="/bench-noop")  # type: ignore[attr-defined]
    raw = RawIngress.bind(RawAgent.bind(fake.url))  # type: ignore[attr-defined]
    serve.run(raw, name="bench-raw", route_prefix="/bench-raw")
    for hosting in ("actor", "pooled"):
        name = f"bench-{hosting}"
        serve.run(
            build_app(_team(hosting), settings, app_name=name), name=name, route_prefix=f"/{name}"
        )


def _ratios(r: dict[str, Any]) -> dict[str, float]:
    raw, bare = r["raw"], r["bare_actor"]
    out = {}
    for hosting in ("actor", "pooled"):
        h = r[hosting]
        out[f"{hosting}: follow-up / routed turn (p50; limit 0.5)"] = h["follow_up_over_routed"]
        for q in ("p50", "p99"):
            out[f"{hosting}: hot overhead / raw Ray path ({q})"] = (
                h["hot_overhead_s"][q] / raw[f"path_{q}_s"]
            )
        out[f"{hosting}: cold activation overhead / bare actor create (p50)"] = (
            h["cold_activation_overhead_s"]["p50"] / bare["create_s"]["p50"]
        )
    out["actor: thread actor USS / bare actor USS"] = (
        r["actor"]["thread_actor_uss_mb"]["p50"] / bare["uss_mb"]["p50"]
    )
    out["pooled: USS per live thread / bare actor USS"] = (
        r["pooled"]["uss_per_thread_mb"] / bare["uss_mb"]["p50"]
    )
    tp = r["throughput"]
    out["pooled: throughput / raw Serve pipeline"] = (
        tp["pooled"]["turns_per_s"] / tp["raw_serve"]["turns_per_s"]
    )
    return out


@contextlib.contextmanager
def bench_cluster(latency_s: float) -> Iterator[tuple[FakeLLMProcess, Settings, int]]:
    """The fake LLM, an embedded Redis, a local Ray cluster and Serve on a free port; all
    stopped on exit. Yields the fake, settings pointing at both, and Serve's HTTP port."""
    # The fake LLM runs in its own process, as for the peers: in the driver it would share the
    # GIL with the load-generating HTTP client.
    fake = FakeLLMProcess(latency_s, "stickyray")
    with tempfile.TemporaryDirectory(prefix="sr-bench-") as tmp, contextlib.ExitStack() as stack:
        stack.callback(fake.stop)
        redis = EmbeddedRedis(Path(tmp) / "redis")
        settings = Settings(
            REDIS_URL=redis.start(),
            OPENAI_API_KEY="bench",
            OPENAI_BASE_URL=fake.url,
            STICKYRAY_API_KEY=None,  # the bench's clients send none, whatever the shell has
        )
        stack.callback(redis.stop)
        port = free_port()
        ray.init(address="local", namespace=NAMESPACE, logging_level=logging.ERROR)
        stack.callback(ray.shutdown)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        stack.callback(serve.shutdown)
        yield fake, settings, port


def run(quick: bool = False, latency_s: float = 0.2) -> dict[str, Any]:
    """Measure everything; the peers run after the Ray cluster is gone."""
    with bench_cluster(latency_s) as (fake, settings, port):
        _deploy(settings, fake)
        result = asyncio.run(_measure_cluster(fake, settings, port, quick))
    result["ratios"] = _ratios(result)
    try:
        from bench.peers import run_peers
    except ImportError as exc:  # the bench extra is not installed
        result["peers"] = {"error": f"pip install 'stickyray[bench]' ({exc})"}
    else:
        threads = 50 if quick else 200
        result["peers"] = asyncio.run(run_peers(latency_s=latency_s, threads=threads, quick=quick))
    result["latency_s"] = latency_s
    result["quick"] = quick
    result["machine"] = (
        f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    )
    return result


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def report(result: dict[str, Any]) -> str:
    """The result as the tables the README shows."""
    raw, bare = result["raw"], result["bare_actor"]
    lines = [
        f"stickyray vs raw Ray vs peers on {result['machine']}, fake LLM latency "
        f"L = {result['latency_s'] * 1000:.0f} ms{' (quick)' if result['quick'] else ''}",
        "",
        "| raw Ray path | p50 ms | p99 ms |",
        "| --- | --- | --- |",
    ]
    for key, label in [
        ("http_noop_s", "no-op request through the Serve HTTP proxy"),
        ("actor_call_s", "Ray actor call"),
        ("handle_call_s", "Serve handle call"),
        ("redis_write_s", f"Redis write of {raw['redis_value_bytes']} bytes"),
        ("llm_sdk_beyond_L_s", "OpenAI SDK round trip beyond L"),
    ]:
        lines.append(f"| {label} | {_ms(raw[key]['p50'])} | {_ms(raw[key]['p99'])} |")
    lines.append(
        f"| a hot turn's raw path (the above, Redis twice; p99: the sum of p99s, at most) "
        f"| {_ms(raw['path_p50_s'])} "
        f"| {_ms(raw['path_p99_s'])} |"
    )
    lines.append(
        f"| bare actor: create + first call | {_ms(bare['create_s']['p50'])} "
        f"| {_ms(bare['create_s']['p99'])} |"
    )
    lines += ["", "| stickyray | actor p50 | actor p99 | pooled p50 | pooled p99 |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for key, label in [
        ("first_turn_new_thread_s", "first turn of a new thread (2 model calls)"),
        ("routed_turn_live_thread_s", "routed turn on a live thread (2 model calls)"),
        ("follow_up_s", "follow-up (1 model call)"),
        ("hot_overhead_s", "hot-turn overhead (follow-up minus L)"),
        ("cold_activation_overhead_s", "cold activation overhead (stored, not live; minus L)"),
    ]:
        a, p = result["actor"][key], result["pooled"][key]
        lines.append(
            f"| {label} | {_ms(a['p50'])} | {_ms(a['p99'])} | {_ms(p['p50'])} | {_ms(p['p99'])} |"
        )
    tp = result["throughput"]
    lines += [
        "",
        f"| throughput, {tp['pooled']['threads']} concurrent threads sending follow-ups "
        "| turns/s |",
        "| --- | --- |",
        f"| raw Serve pipeline (proxy, ingress, agent, model) "
        f"| {tp['raw_serve']['turns_per_s']:.1f} |",
        f"| stickyray, pooled hosting | {tp['pooled']['turns_per_s']:.1f} |",
        "",
        "| ratio | value |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {value:.2f} |" for name, value in result["ratios"].items()]
    peers = result["peers"]
    lines += [
        "",
        "| framework | follow-up p50 ms | follow-up / routed turn (2 calls) | overhead p50 ms "
        "| overhead p99 ms "
        "| turns/s at N threads |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    pooled = result["pooled"]
    lines.append(
        f"| stickyray (pooled) | {_ms(pooled['follow_up_s']['p50'])} "
        f"| {pooled['follow_up_over_routed']:.2f} | {_ms(pooled['hot_overhead_s']['p50'])} "
        f"| {_ms(pooled['hot_overhead_s']['p99'])} | {tp['pooled']['turns_per_s']:.1f} "
        f"({tp['pooled']['threads']}) |"
    )
    if "error" in peers:
        lines.append(f"| peers | {peers['error']} | | | | |")
    else:
        for name, peer in peers.items():
            if not isinstance(peer, dict):
                continue
            if "error" in peer:
                lines.append(f"| {name} | error: {peer['error']} | | | | |")
                continue
            lines.append(
                f"| {name} | {peer['follow_p50_ms']:.1f} | {peer['follow_first_ratio']:.2f} "
                f"| {peer['overhead_p50_ms']:.1f} | {peer['overhead_p99_ms']:.1f} "
                f"| {peer['throughput_tps']:.1f} ({peer['threads']}) |"
            )
    return "\n".join(lines)


def main(quick: bool = False, latency_s: float = 0.2) -> int:
    started = time.monotonic()
    result = run(quick=quick, latency_s=latency_s)
    result["elapsed_s"] = time.monotonic() - started
    print(report(result))
    print(f"\n(measured in {result['elapsed_s']:.0f} s)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compare.json").write_text(json.dumps(result, indent=2))
    return 0
