"""Prometheus metrics of turns and model calls, recorded through Ray's metrics API.

Thread actors, thread hosts and agent replicas each record into their node's Ray metrics
agent, which serves every process's series on the node's metrics export port, in the
Prometheus text format, with Ray's ``ray_`` prefix and a ``WorkerId`` label per process
(sum over it). Outside Ray the calls do nothing, so the turn logic runs the same in tests.

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

__all__ = ["TURN_SECONDS_BUCKETS", "metrics_url", "record_model_calls", "record_turn"]

log = logging.getLogger(__name__)

# From a command's few milliseconds to a turn that waited on several slow model calls.
TURN_SECONDS_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]


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
    cost: Any
    failures: Any


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
    )


def record_turn(result: TurnResult, seconds: float, app: str, supervisor: str) -> None:
    """Count a turn this process ran for ``app`` (not a retried message's stored result)."""
    try:
        metrics = _turn_metrics()
        agent = result.agent or "none"
        metrics.turns.inc(tags={"app": app, "agent": agent, "status": result.status})
        metrics.seconds.observe(max(seconds, 0.0), tags={"app": app, "agent": agent})
        if supervisor in result.usage_by_agent:
            metrics.decisions.inc(tags={"app": app, "supervisor": supervisor})
        for handoff in result.handoffs:
            tags = {"app": app, "from_agent": handoff.from_agent, "to_agent": handoff.to}
            metrics.handoffs.inc(tags=tags)
    except Exception:  # a metric never fails a turn
        log.debug("could not record turn metrics", exc_info=True)


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
        if usage.cost_usd:
            metrics.cost.inc(usage.cost_usd, tags=tags)
        if failed:
            metrics.failures.inc(tags=tags)
    except Exception:
        log.debug("could not record model metrics", exc_info=True)


def metrics_url() -> str | None:
    """The Prometheus endpoint of this node's Ray metrics agent (None if Ray has none)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None
