"""The replay job without Ray: what a refused turn records, what the job warns about, and
what checking the inputs leaves on disk."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

import actors.directory
from replay import job
from replay.dataset import Dialogue, team_from_agents
from replay.submit import submit_replay
from tests.conftest import free_port

TEAM = team_from_agents([{"name": "Hotels_1"}, {"name": "Taxi_1"}], Path("agents.json"))
TOO_LONG = "body.text: 17000 bytes is over the limit of 16384"
PROXY_PAGE = "<html>\n<head><title>502 Bad Gateway</title></head>\n" + "x" * 2000 + "</html>"


def answer(request: httpx.Request) -> httpx.Response:
    """The ingress's answers, one kind per thread (the replay numbers threads 0, 1, ...)."""
    thread = request.url.path.split("/")[3]
    if thread.endswith("-0"):  # the ingress's own shape
        return httpx.Response(413, json={"error": TOO_LONG, "detail": TOO_LONG})
    if thread.endswith("-1"):  # a validation error: "detail" is FastAPI's list
        return httpx.Response(422, json={"error": "body.text: Field required", "detail": [{}]})
    return httpx.Response(502, text=PROXY_PAGE)  # a proxy in front of the ingress


def test_a_refused_turn_records_the_status_and_the_ingress_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def nothing(*args: Any, **kwargs: Any) -> None:
        return None

    monkeypatch.setattr(actors.directory, "passivate_thread", nothing)
    monkeypatch.setattr(actors.directory, "release_pool", nothing)
    client = httpx.AsyncClient
    transport = httpx.MockTransport(answer)
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: client(transport=transport, **kw))
    dialogues = [
        Dialogue.model_validate({"dialogue_id": f"d{i}", "turns": [{"user": "hello"}]})
        for i in range(3)
    ]
    records = asyncio.run(job.replay_dialogues("http://ingress", dialogues, TEAM, 3, "r", "s"))
    errors = {r.dialogue_id: r.error for r in records}
    assert all(r.status == "error" for r in records)
    assert errors["d0"] == f"HTTP 413: {TOO_LONG}"
    assert errors["d1"] == "HTTP 422: body.text: Field required"
    # Any other answer keeps its text, on one line and cut short.
    assert errors["d2"] is not None and len(errors["d2"]) == 500
    assert errors["d2"].startswith("HTTP 502: <html> <head><title>502 Bad Gateway</title>")
    assert errors["d2"].endswith("xxx...")


def dialogues_with(turn: dict[str, Any]) -> list[Dialogue]:
    return [Dialogue.model_validate({"dialogue_id": "d", "turns": [turn, {"user": "/help"}]})]


def test_the_job_warns_when_no_turn_has_a_label() -> None:
    misspelt = dialogues_with({"user": "I need a hotel", "service": ["Hotels_1"]})
    [warning] = job._label_warnings(TEAM, misspelt)
    assert "no turn has a label" in warning and "accuracy cannot be scored" in warning
    labelled = dialogues_with({"user": "I need a hotel", "services": ["Hotels_1"]})
    assert job._label_warnings(TEAM, labelled) == []
    unknown = dialogues_with({"user": "I need a hotel", "services": ["Hotels_9"]})
    assert job._label_warnings(TEAM, unknown) == [
        "labels that name no agent, scored as wrong: 'hotels_9'"
    ]


def test_checking_the_inputs_leaves_no_report_folder_behind(tmp_path: Path) -> None:
    dialogues = tmp_path / "d.jsonl"
    dialogues.write_text(json.dumps({"dialogue_id": "a", "turns": [{"user": "x"}]}) + "\n")
    agents = tmp_path / "agents.json"
    agents.write_text('[{"name": "Hotels_1"}]')
    job.check_inputs(dialogues, agents, tmp_path / "a" / "b" / "out", 4, None, environment=False)
    assert not (tmp_path / "a").exists()
    # A folder that was there stays, with what it holds.
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    job.check_inputs(dialogues, agents, tmp_path / "kept", 4, None, environment=False)
    assert (tmp_path / "kept" / "notes.txt").read_text() == "mine"
    # Nor does a replay that could not be submitted.
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert submit_replay(dialogues, agents, tmp_path / "report", address=address) == 2
    assert not (tmp_path / "report").exists()


def test_a_locale_that_cannot_encode_the_users_names_costs_no_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="ascii"))
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(log, encoding="ascii"))
    missing = tmp_path / "caf\u00e9.jsonl"
    code = job.main(["--dialogues", str(missing), "--agents", "a.json", "--out", "out"])
    sys.stderr.flush()
    # Refused, as the name says, rather than lost to an encoding error.
    assert code == 2
    assert f"{job.REFUSED_LINE}dialogues file not found: " in log.getvalue().decode("ascii")
    assert "caf\\xe9.jsonl" in log.getvalue().decode("ascii")
