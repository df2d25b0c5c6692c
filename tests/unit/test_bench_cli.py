"""`stickyray bench` / `python -m bench` reject bad arguments before starting anything."""

from __future__ import annotations

import pytest

from stickyray.cli import main as cli


def test_an_unknown_benchmark_is_named_in_the_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli(["bench", "nope"])
    assert exit_.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_a_negative_latency_says_what_to_fix(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli(["bench", "--quick", "--latency-ms", "-5"])
    assert exit_.value.code == 2
    assert "--latency-ms must be 0 or more" in capsys.readouterr().err
