"""The replay job: deploy the agents, replay each dialogue as a fresh thread, write a report.

Run inside a Ray job (``stickyray replay`` submits it; ``ray job submit -- python -m
replay.job ...`` works too). It drives the same HTTP ingress and thread directory as live
traffic (``replay.driver``): each dialogue is a new thread, its user turns sent in order,
dialogues concurrently.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any, NamedTuple

from replay.dataset import Dialogue, SkippedLine, load_dialogues, load_team
from replay.driver import replay_dialogues
from stickyray.config import TeamConfig
from stickyray.errors import ConfigError

__all__ = [
    "REFUSED_LINE",
    "REPORT_LINE",
    "ReplayInputs",
    "check_inputs",
    "main",
]

log = logging.getLogger(__name__)

# The log line that carries the packed report (``--report-to-log``) starts with this.
REPORT_LINE = "stickyray-replay-report: "
# A job that refuses its inputs says why on a line that starts with this, so whoever
# submitted it can tell a user's mistake (exit 2) from a failure.
REFUSED_LINE = "replay: refused: "


def _serve_http_port(dashboard_url: str | None) -> int:
    """The HTTP port of the cluster's running Serve proxy (from the Serve REST API)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    if not dashboard_url:
        raise RuntimeError("the Ray cluster has no dashboard to ask for Serve's HTTP port")
    base = dashboard_url if dashboard_url.startswith("http") else f"http://{dashboard_url}"
    details = ServeSubmissionClient(base).get_serve_details()
    return int(details["http_options"]["port"])


class ReplayInputs(NamedTuple):
    """What a replay runs on, read and checked."""

    team: TeamConfig
    dialogues: list[Dialogue]
    skipped: list[SkippedLine]


def check_inputs(
    dialogues: Path,
    agents: Path,
    out: Path,
    concurrency: int,
    limit: int | None,
    *,
    environment: bool = True,
) -> ReplayInputs:
    """Everything a replay's user can get wrong, checked before anything is deployed.

    Raises ``ConfigError`` saying what to fix. ``out`` is tried, not kept: the folders made
    to try it are removed, so a replay that never runs leaves none behind.
    ``environment=False`` skips what depends on this process's environment (API keys,
    installed packages), for a job that will run with another machine's.
    """
    from memory.embedders import LocalEmbedder
    from providers.factory import check_providers
    from serve_app.tools import check_tools
    from stickyray.settings import load_settings

    if dialogues.is_dir():
        raise ConfigError(f"{dialogues} is a folder: give the dialogues file (JSON lines)")
    if not dialogues.is_file():
        raise ConfigError(f"dialogues file not found: {dialogues}")
    if concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {concurrency}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    team = load_team(agents)
    if environment:
        check_providers(team, load_settings())
        if not LocalEmbedder.installed():  # whatever the agents use, the baselines need it
            raise ConfigError(
                "the report's baselines route with the local embedding model: "
                f"{LocalEmbedder.INSTALL_HINT}"
            )
        # A tool's module may exist only on the cluster: the job resolves it there.
        check_tools(team)
    try:
        read, skipped = load_dialogues(dialogues, limit, team.threads.max_message_bytes)
    except OSError as exc:
        raise ConfigError(f"cannot read the dialogues file {dialogues}: {exc.strerror}") from None
    if not read:
        why = (
            f"all {len(skipped)} lines were skipped; the first, line {skipped[0].line}: "
            f"{skipped[0].error}"
            if skipped
            else "the file is empty"
        )
        raise ConfigError(f"{dialogues}: no dialogue to replay ({why})")
    made: list[Path] = []
    try:
        made = [folder for folder in (out, *out.parents) if not folder.exists()]  # deepest first
        out.mkdir(parents=True, exist_ok=True)
        # An existing folder may still refuse files: find out now, not after the replay.
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ConfigError(f"--out {out} cannot be a report folder: {exc}") from None
    finally:
        # The report makes them again when there is one to write.
        for folder in made:
            with suppress(OSError):
                folder.rmdir()
    return ReplayInputs(team, read, skipped)


def _label_warnings(team: TeamConfig, dialogues: list[Dialogue]) -> list[str]:
    """What is wrong with the labels the replay is scored against, before it runs."""
    labels = {label for d in dialogues for t in d.turns for label in t.labels}
    if not labels:
        # A misspelt field ("service") is ignored like any other field the format has not.
        return [
            'no turn has a label (a turn\'s "services"), so routing accuracy cannot be scored: '
            "the report shows n/a"
        ]
    unknown = sorted(labels - {a.name for a in team.agents})
    if unknown:
        # Quoted: a label with spaces or commas, or an odd character, stays readable.
        return [f"labels that name no agent, scored as wrong: {', '.join(map(repr, unknown))}"]
    return []


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m replay.job", description=__doc__)
    parser.add_argument("--dialogues", type=Path, required=True)
    parser.add_argument("--agents", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument(
        "--hosting",
        choices=["pooled", "actor"],
        default="pooled",
        help="threads.hosting for the replay (overrides the agents file)",
    )
    parser.add_argument(
        "--report-to-log",
        action="store_true",
        help="also print the report files on one log line, for `stickyray replay` to unpack "
        "on the machine it runs on",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="Serve's HTTP port if the job has to start Serve",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the replay job."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # The log repeats labels and paths from the user's files: where the locale cannot encode
    # them, an escape is better than a job lost to an encoding error.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        team, dialogues, skipped = check_inputs(
            args.dialogues, args.agents, args.out, args.concurrency, args.limit
        )
    except ConfigError as exc:
        print(f"{REFUSED_LINE}{exc}", file=sys.stderr, flush=True)
        return 2
    threads = team.threads.model_copy(update={"hosting": args.hosting})
    # A replay queues no runs: it calls no webhooks, and needs no secret to sign them.
    runs = team.runs.model_copy(update={"webhook_urls": []})
    team = team.model_copy(update={"threads": threads, "runs": runs})
    for line in skipped:
        print(f"replay: skipped line {line.line}: {line.error}", flush=True)
    for warning in _label_warnings(team, dialogues):
        print(f"replay: warning: {warning}", flush=True)
    print(
        f"replay: {len(dialogues)} dialogues, {sum(len(d.turns) for d in dialogues)} turns, "
        f"{len(team.specialists)} specialists",
        flush=True,
    )

    import ray
    from ray import serve

    from actors.directory import pool_scope
    from replay.report import figure, pack_report, write_report
    from serve_app.app import build_app
    from stickyray.embedded_redis import EmbeddedRedis
    from stickyray.settings import load_settings

    settings = load_settings()
    run_id = uuid.uuid4().hex[:8]
    app_name = f"replay-{run_id}"
    report: dict[str, Any] | None = None
    try:
        with ExitStack() as stack:
            # Embedded servers keep their data in a temporary folder: a replay's threads and
            # memories are not the deployment's.
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sr-")))
            if settings.redis_url is None:
                redis = EmbeddedRedis(tmp / "redis")
                settings = settings.model_copy(update={"redis_url": redis.start()})
                stack.callback(redis.stop)
            if team.uses_memory:
                from memory.embedded_postgres import prepare_database

                url, postgres = prepare_database(
                    settings.database_url,
                    tmp / "postgres",
                    team.memory.embedding_dimension,
                    team.memory.embedder_id,
                )
                if postgres is not None:
                    stack.callback(postgres.stop)
                settings = settings.model_copy(update={"database_url": url})
            context = ray.init(
                namespace="stickyray", logging_level=logging.WARNING, log_to_driver=False
            )
            stack.callback(ray.shutdown)
            serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})
            port = _serve_http_port(context.dashboard_url)
            started = time.monotonic()
            # Before serve.run: an app that fails to deploy is removed from the cluster too.
            stack.callback(serve.delete, app_name)
            serve.run(
                build_app(team, settings, app_name=app_name),
                name=app_name,
                route_prefix=f"/{app_name}",
            )
            print(
                f"replay: app {app_name} deployed in {time.monotonic() - started:.1f} s",
                flush=True,
            )
            started = time.monotonic()
            records = asyncio.run(
                replay_dialogues(
                    f"http://127.0.0.1:{port}/{app_name}",
                    dialogues,
                    team,
                    args.concurrency,
                    run_id,
                    pool_scope(app_name, team),
                    settings.api_key.get_secret_value() if settings.api_key is not None else None,
                )
            )
            elapsed = time.monotonic() - started
            # Written, and sent, before the teardown below: a failure to stop Serve, Ray or
            # the embedded servers, or a job killed while it hangs, loses no finished replay.
            written = write_report(args.out, team, dialogues, records, skipped, elapsed)
            if args.report_to_log:
                print(f"{REPORT_LINE}{pack_report(args.out)}", flush=True)
            report = written
    except Exception:
        if report is None:
            raise
        # Only the teardown can fail once the report is out: the replay's results stay.
        log.warning(
            "cleaning up after the replay failed; the report is in %s", args.out, exc_info=True
        )
    from replay.baselines import baselines

    # A failure in the baselines fails the job, but the report above is written (and sent).
    started = time.monotonic()
    compared = baselines(team, dialogues)
    report = write_report(args.out, team, dialogues, records, skipped, elapsed, compared)
    print(f"replay: baselines computed in {time.monotonic() - started:.0f} s", flush=True)
    if args.report_to_log:  # sent again, with the baselines: the last one is unpacked
        print(f"{REPORT_LINE}{pack_report(args.out)}", flush=True)
    print(
        f"replay: accuracy {figure(report['routing']['accuracy'])}, "
        f"{report['routing']['supervisor_decisions_per_turn']:.3f} supervisor decisions/turn, "
        f"{elapsed:.0f} s; report in {args.out}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
