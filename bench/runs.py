"""Queued runs side by side with posted messages: the same conversations, the same app.

One run, one machine, one fake LLM server answering every call after the same latency L,
one app (pooled hosting, ``runs.max_in_flight`` = the number of conversations):

- posted: N conversations at once, each posting F follow-ups one after another and waiting
  for each answer (``POST .../messages``), as ``bench compare`` measures throughput;
- queued: the same N x F follow-ups submitted as runs (``POST .../runs``, 202 at once),
  then polled until every run has finished.

It prints turns per second both ways and their ratio, and the time to accept a run, alone
and under that load; it checks that every run finished once, in order.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from ray import serve

from bench.compare import TEAM, bench_cluster, measure_throughput
from bench.thread_actors import _stats
from serve_app.app import build_app
from stickyray.config import parse_config

RESULTS = Path(__file__).parent / "results"
APP = "bench-runs"
OVER = {"completed", "failed"}  # a run's last statuses
RATIO = "queued / posted turns per second"


async def measure_runs(base: str, threads: int, follow_ups: int) -> dict[str, Any]:
    """Submit every follow-up of ``threads`` live conversations as runs; wait for them all."""
    ids = [f"rn-{uuid.uuid4().hex[:10]}" for _ in range(threads)]
    connector = aiohttp.TCPConnector(limit=threads)
    timeout = aiohttp.ClientTimeout(total=300)
    prefix = f"/{APP}/v1/threads"
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as http:

        async def call(method: str, path: str, **body: Any) -> dict[str, Any]:
            async with http.request(method, path, **body) as response:
                text = await response.text()
                if response.status not in (200, 202):
                    raise RuntimeError(f"{path}: HTTP {response.status}: {text[:300]}")
                out: dict[str, Any] = json.loads(text)
                return out

        # Accepting a run with nothing else in flight: one client, one run at a time.
        alone: list[float] = []
        for i in range(30):
            started = time.perf_counter()
            body = {"text": f"for {i} people", "message_id": f"a{i}"}
            await call("POST", f"{prefix}/rn-alone/runs", json=body)
            alone.append(time.perf_counter() - started)
        deadline = time.monotonic() + 300
        while True:  # they are done before the load starts (a failure shows below)
            if (await call("GET", f"{prefix}/rn-alone/runs/a29"))["status"] in OVER:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the 30 runs sent one at a time did not finish in 300 s")
            await asyncio.sleep(0.5)
        # Every thread is live first, as for the posted messages.
        await asyncio.gather(
            *(call("POST", f"{prefix}/{t}/messages", json={"text": "book a table"}) for t in ids)
        )
        accept: list[float] = []

        async def submit(thread: str, i: int) -> None:
            started = time.perf_counter()
            body = {"text": f"for {i + 2} people", "message_id": f"f{i}"}
            await call("POST", f"{prefix}/{thread}/runs", json=body)
            accept.append(time.perf_counter() - started)

        async def submit_all(thread: str) -> None:
            for i in range(follow_ups):  # a thread's runs go in one after another
                await submit(thread, i)

        start, started_at = time.perf_counter(), time.time()
        await asyncio.gather(*(submit_all(t) for t in ids))
        submitted = time.perf_counter() - start
        # A thread's runs finish in order: poll each thread's last one, as a client would.
        last = f"f{follow_ups - 1}"
        waiting = set(ids)
        deadline = time.monotonic() + 600
        while waiting:
            order = sorted(waiting)
            found = await asyncio.gather(*(call("GET", f"{prefix}/{t}/runs/{last}") for t in order))
            waiting -= {t for t, r in zip(order, found, strict=True) if r["status"] in OVER}
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(f"{len(waiting)} threads' runs did not finish in 600 s")
            if waiting:
                await asyncio.sleep(0.5)
        records = {
            (t, f"f{i}"): await call("GET", f"{prefix}/{t}/runs/f{i}")
            for t in ids
            for i in range(follow_ups)
        }
    failed = [k for k, r in records.items() if r["status"] != "completed"]
    if failed:
        raise RuntimeError(f"{len(failed)} runs failed, e.g. {records[failed[0]]}")
    for t in ids:  # turn 1 is the first message; each thread's runs took turns 2.. in order
        turns = [records[(t, f"f{i}")]["result"]["turn"] for i in range(follow_ups)]
        if turns != list(range(2, follow_ups + 2)):
            raise RuntimeError(f"{t}: runs out of order: {turns}")
    finished = max(r["finished_at"] for r in records.values())
    first = min(r["created_at"] for r in records.values())
    # Up to the last run's end, not the poll that saw it: the polling's pace is no cost.
    elapsed = finished - started_at
    return {
        "threads": threads,
        "turns": threads * follow_ups,
        "turns_per_s": threads * follow_ups / elapsed,
        "submit_s": submitted,
        "accept_alone_s": _stats(alone),
        "accept_s": _stats(accept),
        "queued_to_last_finished_s": finished - first,
        "attempts": sum(r["attempts"] for r in records.values()),
    }


def run(quick: bool = False, latency_s: float = 0.2) -> dict[str, Any]:
    """Deploy one app, measure posted messages, then the same load as runs."""
    threads, follow_ups = (20, 3) if quick else (100, 5)
    config = json.loads(json.dumps(TEAM))
    config["threads"] = {"hosting": "pooled", "pool_size": 2}
    config["runs"] = {"max_in_flight": threads}
    team = parse_config(config, Path("<bench>"))
    with bench_cluster(latency_s) as (_, settings, port):
        serve.run(build_app(team, settings, app_name=APP), name=APP, route_prefix=f"/{APP}")
        base = f"http://127.0.0.1:{port}"
        posted = asyncio.run(
            measure_throughput(
                base, lambda t: f"/{APP}/v1/threads/{t}/messages", threads, follow_ups
            )
        )
        queued = asyncio.run(measure_runs(base, threads, follow_ups))
    return {
        "latency_s": latency_s,
        "quick": quick,
        "machine": f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "posted": posted,
        "queued": queued,
        "ratios": {
            "queued / posted turns per second": queued["turns_per_s"] / posted["turns_per_s"]
        },
    }


def report(result: dict[str, Any]) -> str:
    """The result as a table."""
    posted, queued = result["posted"], result["queued"]
    ms = lambda s: f"{s * 1000:.1f} ms"  # noqa: E731
    lines = [
        f"queued runs vs posted messages on {result['machine']}, fake LLM latency "
        f"{result['latency_s'] * 1000:.0f} ms, {posted['threads']} conversations x "
        f"{posted['turns'] // posted['threads']} follow-ups",
        "",
        "| | posted messages | queued runs |",
        "| --- | --- | --- |",
        f"| turns per second | {posted['turns_per_s']:.1f} | {queued['turns_per_s']:.1f} |",
        f"| accepting a run, one client (p50 / p99) | | {ms(queued['accept_alone_s']['p50'])} / "
        f"{ms(queued['accept_alone_s']['p99'])} |",
        f"| accepting a run, {posted['threads']} clients (p50 / p99) | | "
        f"{ms(queued['accept_s']['p50'])} / {ms(queued['accept_s']['p99'])} |",
        f"| all {queued['turns']} runs submitted in | | {queued['submit_s']:.2f} s |",
        f"| deliveries per run | | {queued['attempts'] / queued['turns']:.2f} |",
        "",
        f"{RATIO}: {result['ratios'][RATIO]:.2f}",
    ]
    return "\n".join(lines)


def main(quick: bool = False) -> int:
    """Run, print the table, write ``results/runs.json``."""
    result = run(quick=quick)
    print(report(result))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "runs.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0
