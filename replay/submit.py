"""``stickyray replay``: check the inputs, submit the replay as a Ray job, follow its logs."""

from __future__ import annotations

import asyncio
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from replay.job import check_inputs
from stickyray.errors import ConfigError

__all__ = ["submit_replay"]


def _dashboard(address: str | None) -> str:
    if not address:
        raise RuntimeError("the Ray cluster has no dashboard, so no Jobs API")
    return address if address.startswith("http") else f"http://{address}"


def _submit(client: Any, entrypoint: str, name: str, timeout_s: float = 120.0) -> str:
    # A freshly started cluster answers "No available agent" until its job agent is up.
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    while True:
        try:
            job_id: str = client.submit_job(
                entrypoint=entrypoint, metadata={"kind": "stickyray-replay", "dialogues": name}
            )
            return job_id
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def submit_replay(
    dialogues: Path,
    agents: Path,
    out: Path,
    address: str | None = None,
    concurrency: int = 8,
    limit: int | None = None,
    hosting: str = "pooled",
) -> int:
    """Submit the replay job and wait for it; the exit code says whether it succeeded.

    ``address`` is the Ray dashboard (Jobs API) address, e.g. ``http://head:8265``; without
    one, a local Ray cluster is started for the duration of the replay.
    """
    # Everything the user can get wrong is checked here, before anything is submitted.
    try:
        # A job on a given cluster reads that cluster's environment: its keys are checked there.
        check_inputs(dialogues, agents, out, concurrency, limit, environment=address is None)
    except ConfigError as exc:
        print(f"stickyray: {exc}", file=sys.stderr)
        return 2

    import ray
    from ray.job_submission import JobStatus, JobSubmissionClient

    started_here = address is None
    if address is None:
        context = ray.init(address="local", namespace="stickyray", logging_level=logging.WARNING)
        address = context.dashboard_url
    try:
        client = JobSubmissionClient(_dashboard(address))
        command = [
            sys.executable,
            "-m",
            "replay.job",
            "--dialogues",
            str(dialogues.resolve()),
            "--agents",
            str(agents.resolve()),
            "--out",
            str(out.resolve()),
            "--concurrency",
            str(concurrency),
            "--hosting",
            hosting,
        ]
        if limit is not None:
            command += ["--limit", str(limit)]
        job_id = _submit(client, shlex.join(command), dialogues.name)
        print(
            f"stickyray: submitted replay job {job_id} to {_dashboard(address)} "
            "(see it in the dashboard's Jobs view)",
            flush=True,
        )

        async def follow() -> None:
            async for chunk in client.tail_job_logs(job_id):
                print(chunk, end="", flush=True)

        asyncio.run(follow())
        status = client.get_job_status(job_id)
        print(f"stickyray: replay job {job_id} {status.value}", flush=True)
        return 0 if status == JobStatus.SUCCEEDED else 1
    finally:
        if started_here:
            ray.shutdown()
