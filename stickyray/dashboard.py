"""The Grafana dashboard of stickyray's metrics (``stickyray dashboard``).

Built with Ray's own dashboard factory, so it has what Ray's dashboards have: the
``datasource`` variable, the ``Cluster`` filter (``ray_io_cluster``), and the
``RAY_GRAFANA_STICKYRAY_DASHBOARD_UID`` / ``..._GLOBAL_FILTERS`` overrides. An ``App``
variable picks the Serve application (``stickyray``, ``replay-<id>``). Every query sums over
Ray's per-process labels, as the README's Metrics section says to.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from ray.dashboard.modules.metrics.dashboards.common import DashboardConfig, Panel, Target

__all__ = ["DASHBOARD", "dashboard_json", "metric_names"]

# Each query's label matchers: the chosen apps, and Ray's global filters (Cluster).
_APPS = 'app=~"$App",{global_filters}'


def _rate(metric: str, by: str, extra: str = "") -> str:
    """Per-second rate of ``metric`` by ``by``, over 5 minutes."""
    matchers = f"{extra},{_APPS}" if extra else _APPS
    return f"sum by ({by}) (rate({metric}{{{{{matchers}}}}}[5m]))"


def _quantiles(metric: str, by: str = "") -> list[Target]:
    """p50, p95 and p99 of the histogram ``metric`` (by ``by`` too, if given)."""
    group = f"le, {by}" if by else "le"
    return [
        Target(
            expr=f"histogram_quantile({q}, sum by ({group}) "
            f"(rate({metric}_bucket{{{{{_APPS}}}}}[5m])))",
            legend=f"p{round(q * 100)}" + (f" {{{{{by}}}}}" if by else ""),
        )
        for q in (0.5, 0.95, 0.99)
    ]


# Lines, not stacked areas: for series that do not add up (a rate beside its failures,
# percentiles, a ratio). The others stack, their total being meaningful.
_lines = functools.partial(Panel, fill=0, stack=False)

PANELS = [
    _lines(
        id=1,
        title="Turns per second, by agent",
        description="Turns stored, by the agent that answered (none: no agent answered).",
        unit="ops",
        targets=[
            Target(
                expr=_rate("ray_stickyray_turns_total", "agent", 'status="completed"'),
                legend="{{agent}}",
            ),
            Target(
                expr=_rate("ray_stickyray_turns_total", "agent", 'status="failed"'),
                legend="failed: {{agent}}",
            ),
        ],
    ),
    _lines(
        id=2,
        title="Turn latency",
        description="From starting a turn (after accepting its message) to storing it.",
        unit="s",
        targets=_quantiles("ray_stickyray_turn_seconds"),
    ),
    _lines(
        id=3,
        title="Supervisor decisions per turn",
        description="Turns in which the supervisor was called, over all turns: what sticky "
        "routing saves (1 = the supervisor on every turn).",
        unit="short",
        targets=[
            Target(
                expr=f"sum(rate(ray_stickyray_supervisor_decisions_total{{{{{_APPS}}}}}[5m])) "
                f"/ sum(rate(ray_stickyray_turns_total{{{{{_APPS}}}}}[5m]))",
                legend="decisions per turn",
            )
        ],
    ),
    Panel(
        id=4,
        title="Handoffs per second",
        description="Handoffs from one agent to another; to the supervisor is a specialist "
        "handing a conversation back.",
        unit="ops",
        targets=[
            Target(
                expr=_rate("ray_stickyray_handoffs_total", "from_agent, to_agent"),
                legend="{{from_agent}} → {{to_agent}}",
            )
        ],
    ),
    _lines(  # the cache's tokens are part of the input ones: they do not add up
        id=5,
        title="Model tokens per second",
        description="Tokens of model requests (and OpenAI embedding requests), by model; "
        "of the input, those the prompt cache read or wrote.",
        unit="short",
        targets=[
            Target(
                expr=_rate("ray_stickyray_llm_tokens_total", "model, direction"),
                legend="{{model}} {{direction}}",
            ),
            Target(
                expr=_rate("ray_stickyray_llm_cache_tokens_total", "model, use"),
                legend="{{model}} input, cache {{use}}",
            ),
        ],
    ),
    Panel(
        id=6,
        title="Model cost per hour (USD)",
        description="US dollars at agents.yaml's pricing (empty without it), by agent and model.",
        unit="currencyUSD",
        targets=[
            Target(
                expr=_rate("ray_stickyray_llm_cost_usd_total", "agent, model") + " * 3600",
                legend="{{agent}} {{model}}",
            )
        ],
    ),
    _lines(
        id=7,
        title="Model requests and failures per second",
        description="Model requests by agent; agent calls whose provider failed after its "
        "retries; and requests whose reply reported no token usage (their cost is unknown).",
        unit="reqps",
        targets=[
            Target(expr=_rate("ray_stickyray_llm_requests_total", "agent"), legend="{{agent}}"),
            Target(
                expr=_rate("ray_stickyray_agent_failures_total", "agent, model"),
                legend="failed: {{agent}} {{model}}",
            ),
            Target(
                expr=_rate("ray_stickyray_llm_unmeasured_requests_total", "agent, model"),
                legend="no usage: {{agent}} {{model}}",
            ),
        ],
    ),
    Panel(
        id=8,
        title="Queued runs finished per second",
        description="Queued runs by outcome: completed, failed, cancelled.",
        unit="ops",
        targets=[Target(expr=_rate("ray_stickyray_runs_total", "status"), legend="{{status}}")],
    ),
    _lines(
        id=9,
        title="Queued run wait",
        description="From being queued until a worker started delivering the run.",
        unit="s",
        targets=_quantiles("ray_stickyray_run_wait_seconds"),
    ),
    _lines(
        id=10,
        title="Channel messages and replies per second",
        description="Messages the Telegram and WhatsApp webhooks took, and replies sent back "
        "(run webhooks count as channel webhook).",
        unit="ops",
        targets=[
            Target(
                expr=_rate("ray_stickyray_channel_messages_total", "channel, outcome"),
                legend="in {{channel}} {{outcome}}",
            ),
            Target(
                expr=_rate("ray_stickyray_channel_replies_total", "channel, status"),
                legend="out {{channel}} {{status}}",
            ),
        ],
    ),
]

DASHBOARD = DashboardConfig(
    name="STICKYRAY",
    default_uid="stickyrayDashboard",
    panels=PANELS,
    standard_global_filters=['ray_io_cluster=~"$Cluster"'],
    # An absolute path: the factory joins it to its own directory, which keeps it as is.
    base_json_file_name=str(Path(__file__).with_name("grafana_dashboard_base.json")),
)


def dashboard_json() -> str:
    """The dashboard, as Grafana imports or provisions it."""
    # Ray's dashboards are built by this function of its own factory (pinned Ray release).
    from ray.dashboard.modules.metrics.grafana_dashboard_factory import (
        _generate_grafana_dashboard,
    )

    # Annotated as returning the content; it returns (content, uid), as its callers expect.
    generated: Any = _generate_grafana_dashboard(DASHBOARD)
    content, _uid = generated
    return str(content)


def metric_names() -> set[str]:
    """The metrics the dashboard's queries read, as Prometheus names them."""
    return {
        name
        for panel in DASHBOARD.panels
        for target in panel.targets
        for name in re.findall(r"\bray_stickyray_\w+", target.expr)
    }
