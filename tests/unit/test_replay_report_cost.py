"""The report's cost never understates what was spent, and a new report replaces an old one."""

from __future__ import annotations

import base64
import io
import tarfile
from pathlib import Path

from replay.dataset import team_from_agents
from replay.driver import TurnRecord
from replay.report import summarize, unpack_report, write_report

TEAM = team_from_agents([{"name": "Hotels_1"}, {"name": "Taxi_1"}], Path("agents.json"))


def usage(cost: float | None, requests: int = 1, unmeasured: int = 0) -> dict:
    return {
        "input_tokens": 10,
        "output_tokens": 5,
        "requests": requests,
        "cost_usd": cost,
        "unmeasured_requests": unmeasured,
    }


def turn(index: int, **usage_by_agent: dict) -> TurnRecord:
    return TurnRecord(
        dialogue_id="d",
        index=index,
        labels=["hotels_1"],
        agent="hotels_1",
        usage_by_agent=usage_by_agent,
    )


def test_a_cost_with_unmeasured_requests_is_unknown_not_too_low(tmp_path: Path) -> None:
    records = [
        turn(0, hotels_1=usage(0.01), taxi_1=usage(0.02)),
        # The vendor reported no usage for these: their cost is unknown.
        turn(1, hotels_1=usage(None, requests=5, unmeasured=5)),
        # Nothing spent costs nothing, priced or not.
        turn(2, taxi_1=usage(None, requests=0) | {"input_tokens": 0, "output_tokens": 0}),
    ]
    report = write_report(tmp_path, TEAM, [], records, [], 1.0)
    assert report["cost_usd"] == {
        "total": None,
        "by_agent": {"hotels_1": None, "taxi_1": 0.02},
        "unmeasured_requests": {"hotels_1": 5},
    }
    markdown = (tmp_path / "report.md").read_text()
    assert "Cost at the agents file's pricing: unknown, rather than too low" in markdown
    assert "requests of unknown cost: hotels_1 5" in markdown
    assert "| unknown |" in markdown and "| 0.0200 |" in markdown
    measured = summarize(TEAM, [], records[:1], [], 1.0)["cost_usd"]
    assert measured == {
        "total": 0.03,
        "by_agent": {"hotels_1": 0.01, "taxi_1": 0.02},
        "unmeasured_requests": {},
    }


def packed(**files: bytes) -> str:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name.replace("_", "."))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_new_report_replaces_the_old_ones_files_and_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name in ("report.json", "report.md", "routing.png", "turns.jsonl", "notes.txt"):
        (out / name).write_text("old")
    (out / "plots").mkdir()
    # This run sent no chart: the last run's must not pass for this one's.
    assert unpack_report(packed(report_json=b"{}", report_md=b"# new"), out) == [
        "report.json",
        "report.md",
    ]
    assert sorted(p.name for p in out.iterdir()) == [
        "notes.txt",
        "plots",
        "report.json",
        "report.md",
    ]
    assert (out / "report.json").read_text() == "{}"
    assert (out / "notes.txt").read_text() == "old"
