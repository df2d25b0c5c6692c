"""The replay report's files: Markdown that dataset labels cannot break, UTF-8 on any locale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from replay.dataset import team_from_agents
from replay.driver import TurnRecord
from replay.report import write_report

ROOT = Path(__file__).resolve().parents[2]
TEAM = team_from_agents([{"name": "Hotels_1"}, {"name": "Taxi_1"}], Path("agents.json"))


def table_rows(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("|")]


def cells(row: str) -> int:
    """Cells of a table row as GitHub's Markdown splits it: on each ``|`` not escaped."""
    return row.replace("\\\\", "").replace("\\|", "").count("|") - 1


@pytest.mark.parametrize(
    ("label", "shown"),
    [
        ("a|b", r"a\|b"),
        ("a\nb", "a b"),
        (r"a\|b", r"a\\\|b"),  # a backslash of its own is escaped too
        ("a\r\n| x | y |", r"a \| x \| y \|"),
    ],
)
def test_a_label_with_a_pipe_or_line_break_stays_in_its_table_cell(
    tmp_path: Path, label: str, shown: str
) -> None:
    records = [TurnRecord(dialogue_id="d", index=0, labels=[label], agent="hotels_1")]
    write_report(tmp_path, TEAM, [], records, [], 1.0)
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    rows = table_rows(markdown)
    # Every table keeps its header's cell count (3, 2, 2, 3 and 5 here), row by row.
    headers = [i for i, row in enumerate(rows) if i + 1 < len(rows) and "| ---" in rows[i + 1]]
    for start, end in zip(headers, [*headers[1:], len(rows)], strict=True):
        assert {cells(row) for row in rows[start:end]} == {cells(rows[start])}, markdown
    assert f"| {shown} | 0.000 |" in markdown  # its row of the per-service table


# Writes a report with non-ASCII labels and dialogue ids, in a process whose locale encodes
# text as ASCII.
_WRITER = """
import sys
from pathlib import Path
from replay.dataset import team_from_agents
from replay.driver import TurnRecord
from replay.report import write_report

team = team_from_agents([{"name": "Hotels_1"}], Path("agents.json"))
turn = TurnRecord(dialogue_id="caf\\u00e9", index=0, labels=["h\\u00f4tels_1"], agent="hotels_1")
write_report(Path(sys.argv[1]), team, [], [turn], [], 1.0)
"""


def test_the_report_is_written_as_utf8_whatever_the_locale(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHON"))}
    env |= {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, "-c", _WRITER, str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-600:]
    assert "| h\u00f4tels_1 |" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    turns = (tmp_path / "out" / "turns.jsonl").read_text(encoding="utf-8")
    assert json.loads(turns)["dialogue_id"] == "caf\u00e9"
