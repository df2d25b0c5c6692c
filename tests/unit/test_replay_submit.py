"""The replay command's side of a job's log: what it prints, and what it makes of it."""

from __future__ import annotations

import io
import sys

import pytest

from replay.job import REFUSED_LINE, REPORT_LINE
from replay.submit import _LogPrinter


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
