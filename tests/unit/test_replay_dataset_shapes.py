"""Dialogues and agents files in shapes the replay does not read, and blank labels: each is
refused or skipped with a message that says what to fix, never read wrong in silence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from replay import job
from replay.dataset import Dialogue, load_dialogues, load_team, team_from_agents
from replay.driver import TurnRecord
from replay.report import summarize
from stickyray.errors import ConfigError

TEAM = team_from_agents([{"name": "Hotels_1"}, {"name": "Taxi_1"}], Path("agents.json"))
DIALOGUES = [
    {"dialogue_id": name, "turns": [{"user": "book a hotel", "services": ["Hotels_1"]}]}
    for name in ("a", "b", "c")
]


def agents_file(tmp_path: Path) -> Path:
    agents = tmp_path / "agents.json"
    agents.write_text(json.dumps([{"name": "Hotels_1"}, {"name": "Taxi_1"}]))
    return agents


@pytest.mark.parametrize(
    "text",
    [
        # A pretty JSON export: one object per line, inside [ and ].
        "[\n" + ",\n".join(json.dumps(d) for d in DIALOGUES) + "\n]\n",
        "\n\ufeff  " + json.dumps(DIALOGUES) + "\n",  # on one line, after a blank line and a BOM
        json.dumps(DIALOGUES, indent=2),
    ],
)
def test_a_json_array_is_refused_with_how_to_convert_it(tmp_path: Path, text: str) -> None:
    dialogues = tmp_path / "export.json"
    dialogues.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        job.check_inputs(
            dialogues, agents_file(tmp_path), tmp_path / "out", 1, None, environment=False
        )
    message = str(refused.value)
    assert "JSON Lines, one dialogue object per line" in message
    assert "jq -c '.[]' export.json > export.jsonl" in message


def test_the_conversion_never_writes_over_its_input(tmp_path: Path) -> None:
    dialogues = tmp_path / "d.jsonl"
    dialogues.write_text(json.dumps(DIALOGUES))
    with pytest.raises(ConfigError, match=r"jq -c '\.\[\]' d\.jsonl > d-lines\.jsonl"):
        load_dialogues(dialogues)


def test_a_line_that_is_not_an_object_says_one_object_per_line(tmp_path: Path) -> None:
    dialogues = tmp_path / "d.jsonl"
    dialogues.write_text(json.dumps(DIALOGUES[0]) + "\n" + json.dumps(DIALOGUES[1:]) + "\n")
    read, skipped = load_dialogues(dialogues)
    assert [d.dialogue_id for d in read] == ["a"]
    assert [(s.line, s.error) for s in skipped] == [
        (2, "line: expected one dialogue object per line (JSON Lines)")
    ]


@pytest.mark.parametrize("name", ["agents.jsn", "agents", "agents.yaml"])
def test_an_agents_list_without_the_json_suffix_says_how_to_use_it(
    tmp_path: Path, name: str
) -> None:
    agents = tmp_path / name
    shutil.copyfile(agents_file(tmp_path), agents)
    with pytest.raises(ConfigError) as refused:
        load_team(agents)
    message = str(refused.value)
    assert "a list of services, which is read from a .json file" in message
    assert "rename it" in message and "or write an agents.yaml" in message


def test_blank_labels_are_dropped_and_unknown_ones_quoted() -> None:
    dialogue = Dialogue.model_validate(
        {
            "dialogue_id": "a",
            "turns": [
                {"user": "book a room", "services": [" Hotels_1 ", ""]},
                {"user": "thanks, that's all", "services": [""]},
                {"user": "ok bye", "services": [" ", "\t"]},
            ],
        }
    )
    assert [turn.labels for turn in dialogue.turns] == [["hotels_1"], [], []]
    assert job._label_warnings(TEAM, [dialogue]) == []
    records = [
        TurnRecord(dialogue_id="a", index=i, labels=turn.labels, agent="hotels_1")
        for i, turn in enumerate(dialogue.turns)
    ]
    report = summarize(TEAM, [dialogue], records, [], 1.0)
    # The turns with only blank labels are unlabelled, not routing errors.
    assert report["labelled_turns"] == 1
    assert report["routing"]["accuracy"] == 1.0
    assert report["routing"]["unknown_labels"] == {}
    odd = Dialogue.model_validate(
        {"dialogue_id": "b", "turns": [{"user": "hi", "services": ["Hotels, 9", "taxi 2"]}]}
    )
    assert job._label_warnings(TEAM, [odd]) == [
        "labels that name no agent, scored as wrong: 'hotels, 9', 'taxi 2'"
    ]
