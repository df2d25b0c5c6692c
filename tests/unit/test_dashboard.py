"""The Grafana dashboard: valid PromQL over the metrics stickyray defines, every one shown."""

from __future__ import annotations

import json
import re
from pathlib import Path

import promql_parser
import pytest

import stickyray.metrics
from stickyray.cli import main as cli
from stickyray.dashboard import dashboard_json, metric_names


def declared() -> dict[str, str]:
    """The metrics stickyray.metrics defines, by kind, as Ray exports them (``ray_``)."""
    source = Path(stickyray.metrics.__file__).read_text()
    found = re.findall(r'(Counter|Histogram)\(\s*"(stickyray_\w+)"', source)
    return {f"ray_{name}": kind for kind, name in found}


def test_the_dashboard_reads_every_metric_and_only_those() -> None:
    metrics = declared()
    assert len(metrics) >= 12  # the table of the README's Metrics section
    wanted = {f"{name}_bucket" if kind == "Histogram" else name for name, kind in metrics.items()}
    assert metric_names() == wanted


def test_the_dashboard_is_grafana_json_with_valid_queries() -> None:
    dashboard = json.loads(dashboard_json())
    assert dashboard["uid"] == "stickyrayDashboard" and dashboard["title"] == "stickyray"
    variables = [v["name"] for v in dashboard["templating"]["list"]]
    assert variables == ["datasource", "App", "Cluster"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels) == 10
    for panel in panels:
        assert panel["datasource"] == "${datasource}" and panel["targets"]
        for target in panel["targets"]:
            expr = target["expr"]
            promql_parser.parse(expr)  # raises on a syntax error
            assert 'app=~"$App"' in expr and 'ray_io_cluster=~"$Cluster"' in expr
        # The cache's tokens are part of the input tokens: stacked, they would count twice.
        if any("llm_cache_tokens_total" in target["expr"] for target in panel["targets"]):
            assert not panel["stack"], panel["title"]


def test_the_command_writes_the_dashboard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "stickyray_grafana_dashboard.json"
    monkeypatch.setenv("RAY_GRAFANA_STICKYRAY_DASHBOARD_UID", "ours")  # Ray's own override
    assert cli(["dashboard", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["uid"] == "ours"
    assert cli(["dashboard", "--out", str(tmp_path / "missing" / "d.json")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_turn_latency_buckets_reach_past_a_model_call_that_times_out_on_every_retry() -> None:
    """Otherwise p95/p99 sit at the top bucket through the outages they should show."""
    from stickyray.metrics import RUN_WAIT_BUCKETS, TURN_SECONDS_BUCKETS
    from stickyray.settings import Settings

    defaults = Settings()
    one_call = defaults.llm_timeout_s * (defaults.llm_max_retries + 1)
    assert TURN_SECONDS_BUCKETS[-1] >= 2 * one_call  # a supervisor and a specialist
    assert TURN_SECONDS_BUCKETS == sorted(set(TURN_SECONDS_BUCKETS))
    assert RUN_WAIT_BUCKETS == sorted(set(RUN_WAIT_BUCKETS))
    assert RUN_WAIT_BUCKETS[-1] >= 3600  # runs.give_up_after_s's default
