"""``stickyray replay``: check the inputs, submit the replay as a Ray job, follow its logs.

The inputs go with the job as its working directory; the report comes back in its log.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from replay.job import REFUSED_LINE, REPORT_LINE, check_inputs
from replay.report import unpack_report
from stickyray.errors import ConfigError

__all__ = ["submit_replay"]


def _dashboard(address: str | None) -> str:
    if not address:
        raise RuntimeError("the Ray cluster has no dashboard, so no Jobs API")
    return address if address.startswith("http") else f"http://{address}"


def _submit(
    client: Any, entrypoint: str, name: str, working_dir: str, timeout_s: float = 120.0
) -> str:
    # A freshly started cluster answers "No available agent" until its job agent is up.
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    while True:
        try:
            job_id: str = client.submit_job(
                entrypoint=entrypoint,
                runtime_env={"working_dir": working_dir},
                metadata={"kind": "stickyray-replay", "dialogues": name},
            )
            return job_id
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def _stage(dialogues: Path, agents: Path, folder: Path) -> list[str]:
    """Copy the inputs into the job's working directory; returns their arguments."""
    shutil.copyfile(dialogues, folder / "dialogues.jsonl")
    # The suffix says how the agents file is read (.json list or agents.yaml).
    staged_agents = f"agents{agents.suffix.lower() or '.yaml'}"
    shutil.copyfile(agents, folder / staged_agents)
    return ["--dialogues", "dialogues.jsonl", "--agents", staged_agents]


class _LogPrinter:
    """Prints a job's log as it comes, whole lines only, minus the packed report's line.

    ``refused`` says whether the job refused its inputs (on the cluster, with the cluster's
    environment): that is the user's to fix, like a check that fails here.
    """

    def __init__(self) -> None:
        self._partial = ""
        self.refused = False

    def feed(self, chunk: str) -> None:
        *lines, self._partial = (self._partial + chunk).split("\n")
        for line in lines:
            self._line(line)

    def close(self) -> None:
        if self._partial:
            self._line(self._partial)
        self._partial = ""

    def _line(self, line: str) -> None:
        if line.startswith(REPORT_LINE):
            return
        self.refused = self.refused or line.startswith(REFUSED_LINE)
        # The job writes UTF-8; a terminal whose encoding cannot show a label gets it escaped.
        encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
        print(line.encode(encoding, "backslashreplace").decode(encoding), flush=True)


def _fetch_report(client: Any, job_id: str, out: Path) -> bool:
    """Unpack the report the job printed into ``out``; False if it printed none (or one
    without its report.json)."""
    packed = [
        line[len(REPORT_LINE) :]
        for line in client.get_job_logs(job_id).splitlines()
        if line.startswith(REPORT_LINE)
    ]
    if not packed:
        return False
    # An archive without the report itself (from another version's job, say) is none.
    return "report.json" in unpack_report(packed[-1], out)


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
    one, a local Ray cluster is started for the duration of the replay. The inputs travel
    with the job (its working directory) and the report comes back in its log, so the
    cluster needs no access to this machine's files, and ``out`` is on this machine.
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
        try:
            client = JobSubmissionClient(_dashboard(address))
        except (OSError, RuntimeError, ValueError) as exc:  # requests' errors are OSErrors
            print(
                f"stickyray: cannot reach the Ray Jobs API at {address}: {exc}. "
                "--address takes the dashboard's address (http://HEAD:8265) of a running cluster",
                file=sys.stderr,
            )
            return 2
        with tempfile.TemporaryDirectory(prefix="stickyray-replay-") as staging:
            # A cluster started here runs this interpreter; another runs its own `python`.
            python = sys.executable if started_here else "python"
            command = [python, "-m", "replay.job", *_stage(dialogues, agents, Path(staging))]
            command += ["--out", "report", "--report-to-log"]
            command += ["--concurrency", str(concurrency), "--hosting", hosting]
            if limit is not None:
                command += ["--limit", str(limit)]
            job_id = _submit(client, shlex.join(command), dialogues.name, staging)
        print(
            f"stickyray: submitted replay job {job_id} to {_dashboard(address)} "
            "(see it in the dashboard's Jobs view)",
            flush=True,
        )
        printer = _LogPrinter()

        async def follow() -> None:
            async for chunk in client.tail_job_logs(job_id):
                printer.feed(chunk)
            printer.close()

        asyncio.run(follow())
        status = client.get_job_status(job_id)
        # A job that failed after the replay (in the baselines) still sends what it has.
        fetched = _fetch_report(client, job_id, out)
        if fetched:
            print(f"stickyray: report in {out}", flush=True)
        print(f"stickyray: replay job {job_id} {status.value}", flush=True)
        if status == JobStatus.SUCCEEDED and not fetched:
            # Nothing to show for a replay that ran: never a silent success.
            print(
                f"stickyray: the job succeeded but its log holds no report (no line starting "
                f"{REPORT_LINE.strip()!r}), so none was written to {out}. The cluster's "
                "stickyray may be another version than this one; `ray job logs "
                f"{job_id}` shows what the job printed",
                file=sys.stderr,
                flush=True,
            )
            return 1
        if status == JobStatus.SUCCEEDED:
            return 0
        return 2 if printer.refused else 1
    finally:
        if started_here:
            ray.shutdown()
