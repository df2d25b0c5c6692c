"""The replay command's side of a job's log: what it prints, and what it makes of it."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import ray.job_submission
from ray.job_submission import JobStatus

from replay.job import REFUSED_LINE, REPORT_LINE
from replay.report import pack_report
from replay.submit import _LogPrinter, submit_replay


def test_the_log_is_printed_in_whole_lines_without_the_report(capsys) -> None:
    printer = _LogPrinter()
    for chunk in ["replay: 2 dia", "logues\n", REPORT_LINE + "AAAA", "BBBB\nreplay: done", ""]:
        printer.feed(chunk)
    printer.close()
    assert capsys.readouterr().out == "replay: 2 dialogues\nreplay: done\n"


def test_a_job_that_refused_its_inputs_is_told_apart(capsys) -> None:
    printer = _LogPrinter()
    printer.feed("replay: 2 dialogues\n")
    assert not printer.refused
    printer.feed(f"{REFUSED_LINE}agent 'triage' uses provider openai: set OPENAI_API_KEY")
    printer.close()
    assert printer.refused
    assert "set OPENAI_API_KEY" in capsys.readouterr().out


def test_a_label_the_terminal_cannot_encode_is_escaped_not_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = io.BytesIO()
    terminal = io.TextIOWrapper(raw, encoding="ascii", write_through=True)
    monkeypatch.setattr(sys, "stdout", terminal)
    printer = _LogPrinter()
    printer.feed("replay: Réserver 日本\nreplay: done\n")
    printer.close()
    assert raw.getvalue().decode("ascii") == "replay: R\\xe9server \\u65e5\\u672c\nreplay: done\n"


class FakeJobs:
    """The Jobs API of a cluster whose one job succeeded, printing ``log``."""

    log = ""

    def __init__(self, address: str) -> None:
        self.address = address

    def submit_job(self, **kwargs: object) -> str:
        return "job-1"

    async def tail_job_logs(self, job_id: str) -> AsyncIterator[str]:
        yield self.log

    def get_job_status(self, job_id: str) -> JobStatus:
        return JobStatus.SUCCEEDED

    def get_job_logs(self, job_id: str) -> str:
        return self.log


def test_a_succeeded_job_that_sent_no_report_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dialogues = tmp_path / "d.jsonl"
    dialogues.write_text(json.dumps({"dialogue_id": "a", "turns": [{"user": "hi"}]}) + "\n")
    agents = tmp_path / "agents.json"
    agents.write_text('[{"name": "Hotels_1"}]')
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeJobs)
    monkeypatch.setattr(FakeJobs, "log", "replay: 1 dialogues\n")
    address = "http://head:8265"
    assert submit_replay(dialogues, agents, tmp_path / "out", address=address) == 1
    err = capsys.readouterr().err
    assert "the job succeeded but its log holds no report" in err
    assert "ray job logs job-1" in err
    # With the report in its log, the same job is a success, its report unpacked.
    (tmp_path / "sent").mkdir()
    (tmp_path / "sent" / "report.json").write_text("{}")
    monkeypatch.setattr(FakeJobs, "log", f"{REPORT_LINE}{pack_report(tmp_path / 'sent')}\n")
    assert submit_replay(dialogues, agents, tmp_path / "out", address=address) == 0
    assert (tmp_path / "out" / "report.json").read_text() == "{}"
    # A report line whose archive holds no report.json is no report: the old one stays.
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(FakeJobs, "log", f"{REPORT_LINE}{pack_report(tmp_path / 'empty')}\n")
    assert submit_replay(dialogues, agents, tmp_path / "out", address=address) == 1
    assert (tmp_path / "out" / "report.json").read_text() == "{}"
