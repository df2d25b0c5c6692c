"""Replays as real Ray jobs on the session's cluster, through the Jobs API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors.directory import NAMESPACE
from replay.submit import submit_replay
from stickyray.cli import main as cli

pytestmark = pytest.mark.slow

DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "sgd-dev"


def named_actors() -> list[str]:
    import ray

    return [
        e["name"]
        for e in ray.util.list_named_actors(all_namespaces=True)
        if e["namespace"] == NAMESPACE
    ]


@pytest.fixture(scope="module")
def slice_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 recorded dialogues with three bad lines among them, one id no thread id could be."""
    lines = (DATASETS / "dialogues.jsonl").read_text().splitlines()[:20]
    first = json.loads(lines[0])
    lines[0] = json.dumps({**first, "dialogue_id": "café #1 / from the web"})
    lines.insert(3, '{"dialogue_id": "broken", "turns": [')
    lines.insert(10, '{"dialogue_id": "no-turns", "turns": []}')
    lines.append(lines[-1])  # a repeated dialogue id
    path = tmp_path_factory.mktemp("replay") / "slice.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_replay_job_writes_a_report_that_matches_its_turns(
    ray_cluster: str, serve_url: str, slice_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    code = submit_replay(
        slice_file, DATASETS / "agents.json", out, address=ray_cluster, concurrency=4
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("# Replay report")
    assert (out / "routing.png").read_bytes()[:4] == b"\x89PNG"
    assert report["dialogues"] == 20
    assert [s["line"] for s in report["skipped_lines"]] == [4, 11, 23]
    turns = [json.loads(line) for line in (out / "turns.jsonl").read_text().splitlines()]
    assert report["turns"] == len(turns) > 0
    labelled = [t for t in turns if t["labels"]]
    right = sum(1 for t in labelled if t["agent"] in t["labels"])
    assert report["labelled_turns"] == len(labelled)
    assert report["routing"]["accuracy"] == round(right / len(labelled), 4)
    assert {t["dialogue_id"] for t in turns} >= {"café #1 / from the web"}
    decisions = sum(1 for t in turns if t["supervisor_called"])
    assert report["routing"]["supervisor_decisions"] == decisions
    assert decisions >= 20, "every dialogue starts with a supervisor decision"
    for key in ("per_service", "per_domain", "confusion", "handoffs", "returns_to_supervisor"):
        assert key in report["routing"]
    assert set(report["latency_ms"]) == {"p50", "p95", "p99"}
    assert "supervisor" in report["agent_calls"]
    # Each supervisor decision is one request to its (offline) model.
    assert report["llm_calls"]["supervisor"] == report["agent_calls"]["supervisor"]
    assert len(report["strategies"]) == 3
    assert report["errors"] == 0
    # The job replayed on pooled hosts and stopped them when it was done.
    assert not [
        n for n in named_actors() if n.startswith(("threadhost/replay-", "thread/default/replay-"))
    ]


def test_missing_agents_file_fails_before_submitting(
    slice_file: Path, tmp_path: Path, capsys
) -> None:
    code = cli(["replay", str(slice_file), "--agents", str(tmp_path / "nope.json")])
    assert code == 2
    assert "agents file not found" in capsys.readouterr().err
    assert (
        cli(["replay", str(tmp_path / "none.jsonl"), "--agents", str(DATASETS / "agents.json")])
        == 2
    )


def test_an_out_folder_that_cannot_be_created_fails_before_submitting(
    slice_file: Path, tmp_path: Path, capsys
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    argv = ["replay", str(slice_file), "--agents", str(DATASETS / "agents.json")]
    assert cli([*argv, "--out", str(blocker / "report")]) == 2
    assert "--out" in capsys.readouterr().err


def test_an_agents_yaml_with_long_term_memory_replays(
    ray_cluster: str, serve_url: str, tmp_path: Path
) -> None:
    """The sample team (offline, with memory) replays; the job brings its own Postgres."""
    from stickyray.config import sample_config_path

    dialogues = tmp_path / "two.jsonl"
    dialogues.write_text(
        json.dumps(
            {
                "dialogue_id": "d1",
                "turns": [
                    {"user": "I want to book a table for two tonight", "services": ["bookings"]},
                    {"user": "yes, at 8pm", "services": ["bookings"]},
                ],
            }
        )
        + "\n"
        + json.dumps(
            {
                "dialogue_id": "d2",
                "turns": [{"user": "I was charged twice on my invoice", "services": ["invoices"]}],
            }
        )
        + "\n"
    )
    out = tmp_path / "report"
    code = submit_replay(dialogues, sample_config_path(), out, address=ray_cluster)
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["dialogues"], report["turns"], report["errors"]) == (2, 3, 0)
    assert report["routing"]["accuracy"] == 1.0
