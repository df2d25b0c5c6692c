"""The replay job with Ray and Serve replaced by fakes (nothing is started): a finished
replay's report is written, and sent, before the teardown, whose failure cannot lose it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import ray
from ray import serve

import replay.baselines
import serve_app.app
from replay import job
from replay.driver import TurnRecord
from replay.report import unpack_report


class Context:
    dashboard_url = "127.0.0.1:8265"


def test_a_failing_teardown_loses_no_finished_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # never contacted
    deleted: list[str] = []

    def delete(name: str) -> None:
        deleted.append(name)
        raise RuntimeError(f"timed out deleting app {name}")

    async def replayed(*args: Any, **kwargs: Any) -> list[TurnRecord]:
        return [TurnRecord(dialogue_id="a", index=0, labels=["hotels_1"], agent="hotels_1")]

    monkeypatch.setattr(ray, "init", lambda *a, **k: Context())
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(serve, "start", lambda *a, **k: None)
    monkeypatch.setattr(serve, "run", lambda *a, **k: None)
    monkeypatch.setattr(serve, "delete", delete)
    monkeypatch.setattr(serve_app.app, "build_app", lambda *a, **k: None)
    monkeypatch.setattr(job, "_serve_http_port", lambda url: 8000)
    monkeypatch.setattr(job, "replay_dialogues", replayed)
    # The baselines load the embedding model: not what this test is about.
    monkeypatch.setattr(replay.baselines, "baselines", lambda team, dialogues: {})
    dialogues = tmp_path / "d.jsonl"
    turn = {"user": "book a hotel room", "services": ["Hotels_1"]}
    dialogues.write_text(json.dumps({"dialogue_id": "a", "turns": [turn]}) + "\n")
    agents = tmp_path / "agents.json"
    agents.write_text('[{"name": "Hotels_1"}, {"name": "Taxi_1"}]')
    out = tmp_path / "report"
    argv = ["--dialogues", str(dialogues), "--agents", str(agents), "--out", str(out)]
    assert job.main([*argv, "--report-to-log"]) == 0
    assert deleted  # the teardown ran, and failed
    assert json.loads((out / "report.json").read_text())["routing"]["accuracy"] == 1.0
    # The submitter got it too: the report line printed before the teardown unpacks.
    lines = [
        line.removeprefix(job.REPORT_LINE)
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(job.REPORT_LINE)
    ]
    assert lines
    assert "report.json" in unpack_report(lines[0], tmp_path / "here")
