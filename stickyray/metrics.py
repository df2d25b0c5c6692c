"""Prometheus metrics of turns and model calls, recorded through Ray's metrics API.

Every Ray process records into its node's Ray metrics agent, which serves all of them on
the node's metrics export port, in the Prometheus text format, with Ray's ``ray_`` prefix.
Ray labels each series with the process that recorded it (``WorkerId``; sum over it) and
keeps a counter's series after that process has exited. So turn metrics are not recorded in
thread actors, one process per thread, where the series would grow with every thread ever
served: each thread sends its turns, without waiting, to one ``TurnMetricsSink`` actor,
which records them. Agent replicas are few and long-lived, and record their model calls
themselves. Outside Ray, nothing is recorded.

Labels name the Serve application (``stickyray``, or a replay's ``replay-<id>`` on the same
cluster), agents and models: all come from the deployment, so the number of series stays
bounded however many threads and users there are.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from stickyray.turns import TurnResult, Usage

__all__ = [
    "SINK_NAME",
    "RUN_WAIT_BUCKETS",
    "TURN_SECONDS_BUCKETS",
    "TurnMetricsSink",
    "TurnReporter",
    "metrics_url",
    "record_channel_message",
    "record_model_calls",
    "record_reply",
    "record_run",
    "record_turn",
]

log = logging.getLogger(__name__)

# From a turn with no model call (the offline provider) to one that waited on several slow
# ones: with the defaults one call timing out on every retry takes 4 min, and a turn may make
# several, so the top buckets keep p99 readable through a provider outage.
TURN_SECONDS_BUCKETS = [
    *(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
    *(300.0, 600.0, 1800.0),
]
# A queued run can wait for longer (a burst, an outage retried for up to an hour).
RUN_WAIT_BUCKETS = [*TURN_SECONDS_BUCKETS, 3600.0]


@dataclass(frozen=True)
class _TurnMetrics:
    turns: Any
    seconds: Any
    decisions: Any
    handoffs: Any


@dataclass(frozen=True)
class _ModelMetrics:
    requests: Any
    tokens: Any
    cache_tokens: Any
    cost: Any
    failures: Any
    unmeasured: Any


@functools.cache
def _turn_metrics() -> _TurnMetrics:
    # Ray metrics belong to the process that creates them: made on first use, in the actor.
    from ray.util.metrics import Counter, Histogram

    return _TurnMetrics(
        turns=Counter(
            "stickyray_turns_total",
            "Turns run, by the agent that answered and whether it completed or failed",
            tag_keys=("app", "agent", "status"),
        ),
        seconds=Histogram(
            "stickyray_turn_seconds",
            "Time from accepting a message to storing its turn, by the agent that answered",
            boundaries=TURN_SECONDS_BUCKETS,
            tag_keys=("app", "agent"),
        ),
        decisions=Counter(
            "stickyray_supervisor_decisions_total",
            "Turns in which the supervisor was called (routing decisions paid for)",
            tag_keys=("app", "supervisor"),
        ),
        handoffs=Counter(
            "stickyray_handoffs_total",
            "Handoffs between agents; to the supervisor is a specialist handing back",
            tag_keys=("app", "from_agent", "to_agent"),
        ),
    )


@functools.cache
def _model_metrics() -> _ModelMetrics:
    from ray.util.metrics import Counter

    return _ModelMetrics(
        requests=Counter(
            "stickyray_llm_requests_total",
            "Model requests (one per model response), by agent and model",
            tag_keys=("app", "agent", "model"),
        ),
        tokens=Counter(
            "stickyray_llm_tokens_total",
            "Model tokens by agent, model and direction (input or output)",
            tag_keys=("app", "agent", "model", "direction"),
        ),
        cache_tokens=Counter(
            "stickyray_llm_cache_tokens_total",
            "Input tokens the vendor's prompt cache read or wrote (part of the input tokens), "
            "by agent, model and use (read or write)",
            tag_keys=("app", "agent", "model", "use"),
        ),
        cost=Counter(
            "stickyray_llm_cost_usd_total",
            "What model calls cost in US dollars, at agents.yaml's pricing (absent without it)",
            tag_keys=("app", "agent", "model"),
        ),
        failures=Counter(
            "stickyray_agent_failures_total",
            "Agent calls that could not answer (the provider failed after its retries)",
            tag_keys=("app", "agent", "model"),
        ),
        unmeasured=Counter(
            "stickyray_llm_unmeasured_requests_total",
            "Model requests whose reply reported no token usage (part of the requests): their "
            "tokens count as 0 and their cost is unknown",
            tag_keys=("app", "agent", "model"),
        ),
    )


def record_turn(
    app: str,
    agent: str,
    status: str,
    seconds: float,
    supervisor: str | None,
    handoffs: list[tuple[str, str]],
) -> None:
    """Count one stored turn of ``app``.

    ``supervisor`` names the supervisor when it was called in the turn (a routing decision),
    else None; ``handoffs`` are (from, to) pairs.
    """
    try:
        metrics = _turn_metrics()
        metrics.turns.inc(tags={"app": app, "agent": agent, "status": status})
        metrics.seconds.observe(max(seconds, 0.0), tags={"app": app, "agent": agent})
        if supervisor is not None:
            metrics.decisions.inc(tags={"app": app, "supervisor": supervisor})
        for source, target in handoffs:
            tags = {"app": app, "from_agent": source, "to_agent": target}
            metrics.handoffs.inc(tags=tags)
    except Exception:  # a metric never fails a turn
        log.debug("could not record turn metrics", exc_info=True)


class TurnMetricsSink:
    """The one process that records every thread's turn metrics (see the module doc)."""

    def record(
        self,
        app: str,
        agent: str,
        status: str,
        seconds: float,
        supervisor: str | None,
        handoffs: list[tuple[str, str]],
    ) -> None:
        """See :func:`record_turn`."""
        record_turn(app, agent, status, seconds, supervisor, handoffs)


# Detached, so it outlives the thread actors that create it; restarted if it dies (its
# counters then start again from zero, which Prometheus's rate() takes as a reset).
SINK_NAME = "metrics/turns"
_SINK_OPTIONS: dict[str, Any] = {
    "name": SINK_NAME,
    "namespace": "stickyray",  # the runtime's namespace, as actors.directory.NAMESPACE
    "get_if_exists": True,
    "lifetime": "detached",
    "num_cpus": 0,
    "max_restarts": -1,
}


class TurnReporter:
    """A thread's turn observer: sends each stored turn to the sink and never waits.

    A turn that called the supervisor (it is among the turn's agents) is a routing decision.
    """

    def __init__(self, app: str, supervisor: str) -> None:
        self._app = app
        self._supervisor = supervisor
        self._sink: Any = None

    def __call__(self, result: TurnResult, seconds: float) -> None:
        import ray

        if not ray.is_initialized():
            return
        try:
            if self._sink is None:
                self._sink = ray.remote(TurnMetricsSink).options(**_SINK_OPTIONS).remote()
            self._sink.record.remote(
                self._app,
                result.agent or "none",
                result.status,
                seconds,
                self._supervisor if self._supervisor in result.usage_by_agent else None,
                [(h.from_agent, h.to) for h in result.handoffs],
            )
        except Exception:  # a metric never fails a turn; the next turn looks the sink up again
            self._sink = None
            log.debug("could not report turn metrics", exc_info=True)


def record_model_calls(
    app: str, agent: str, model: str, usage: Usage, failed: bool = False
) -> None:
    """Count what one agent call of ``app`` spent on its model."""
    try:
        metrics = _model_metrics()
        tags = {"app": app, "agent": agent, "model": model}
        # Ray's counters take only positive increments.
        if usage.requests:
            metrics.requests.inc(usage.requests, tags=tags)
        for direction, tokens in (("input", usage.input_tokens), ("output", usage.output_tokens)):
            if tokens:
                metrics.tokens.inc(tokens, tags={**tags, "direction": direction})
        for use, tokens in (
            ("read", usage.cached_input_tokens),
            ("write", usage.cache_write_tokens),
        ):
            if tokens:
                metrics.cache_tokens.inc(tokens, tags={**tags, "use": use})
        if usage.unmeasured_requests:
            metrics.unmeasured.inc(usage.unmeasured_requests, tags=tags)
        if usage.cost_usd:
            metrics.cost.inc(usage.cost_usd, tags=tags)
        if failed:
            metrics.failures.inc(tags=tags)
    except Exception:
        log.debug("could not record model metrics", exc_info=True)


@dataclass(frozen=True)
class _RunMetrics:
    runs: Any
    wait: Any


@functools.cache
def _run_metrics() -> _RunMetrics:
    from ray.util.metrics import Counter, Histogram

    return _RunMetrics(
        runs=Counter(
            "stickyray_runs_total",
            "Queued runs finished, by the status of their turn (failed: also undeliverable)",
            tag_keys=("app", "status"),
        ),
        wait=Histogram(
            "stickyray_run_wait_seconds",
            "Time a queued run waited, from being queued until a worker started delivering it",
            boundaries=RUN_WAIT_BUCKETS,
            tag_keys=("app",),
        ),
    )


@dataclass(frozen=True)
class _ChannelMetrics:
    messages: Any
    replies: Any


@functools.cache
def _channel_metrics() -> _ChannelMetrics:
    from ray.util.metrics import Counter

    return _ChannelMetrics(
        messages=Counter(
            "stickyray_channel_messages_total",
            "Messages a channel webhook received, by outcome (queued, duplicate, ignored: "
            "nothing the agent can read, or over threads.max_message_bytes)",
            tag_keys=("app", "channel", "outcome"),
        ),
        replies=Counter(
            "stickyray_channel_replies_total",
            "Replies sent to a channel, by status (sent, failed: refused or given up)",
            tag_keys=("app", "channel", "status"),
        ),
    )


def record_channel_message(app: str, channel: str, outcome: str, count: int = 1) -> None:
    """Count ``count`` messages that ``channel``'s webhook received, by ``outcome``."""
    if count <= 0:
        return
    try:
        _channel_metrics().messages.inc(
            count, tags={"app": app, "channel": channel, "outcome": outcome}
        )
    except Exception:
        log.debug("could not record channel metrics", exc_info=True)


def record_reply(app: str, channel: str, status: str) -> None:
    """Count a reply to ``channel`` that was sent, or failed for good."""
    try:
        _channel_metrics().replies.inc(tags={"app": app, "channel": channel, "status": status})
    except Exception:
        log.debug("could not record channel metrics", exc_info=True)


def record_run(app: str, status: str | None = None, waited: float | None = None) -> None:
    """Count a queued run of ``app`` that finished with ``status``, or that ``waited``."""
    try:
        metrics = _run_metrics()
        if status is not None:
            metrics.runs.inc(tags={"app": app, "status": status})
        if waited is not None:
            metrics.wait.observe(max(waited, 0.0), tags={"app": app})
    except Exception:
        log.debug("could not record run metrics", exc_info=True)


def metrics_url() -> str | None:
    """The Prometheus endpoint of this node's Ray metrics agent (None if Ray has none)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None
