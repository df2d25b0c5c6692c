"""`stickyray bench` / `python -m bench` reject bad arguments before starting anything."""

from __future__ import annotations

import pytest

from stickyray.cli import main as cli


def test_an_unknown_benchmark_is_named_in_the_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli(["bench", "nope"])
    assert exit_.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("latency", ["-5", "0", "nan", "inf"])
def test_a_latency_that_is_no_wait_says_what_to_fix(latency: str, capsys) -> None:
    """0 failed after minutes of measuring (a division by it), nan in the fake's process."""
    with pytest.raises(SystemExit) as exit_:
        cli(["bench", "--quick", "--latency-ms", latency])
    assert exit_.value.code == 2
    assert f"--latency-ms must be a number above 0, not {float(latency)}" in (
        capsys.readouterr().err
    )


def test_a_latency_for_a_benchmark_that_takes_none_is_refused(capsys) -> None:
    """It was ignored: `runs` measured at its own 200 ms and said nothing."""
    with pytest.raises(SystemExit) as exit_:
        cli(["bench", "runs", "--latency-ms", "50"])
    assert exit_.value.code == 2
    assert "--latency-ms is for compare only" in capsys.readouterr().err
