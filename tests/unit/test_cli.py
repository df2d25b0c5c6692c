"""`stickyray check` and `stickyray serve` reject bad files and arguments before starting."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stickyray.cli import main as cli
from stickyray.config import sample_config_path


def test_check_resolves_tools(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = yaml.safe_load(sample_config_path().read_text())
    config["specialists"][0]["tools"] = ["no_such_tool"]
    path = tmp_path / "agents.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli(["check", str(path)]) == 2
    assert "agent 'invoices' tools: unknown tool 'no_such_tool'" in capsys.readouterr().err
    assert cli(["check", str(sample_config_path())]) == 0


@pytest.mark.parametrize(
    ("intent", "tools"),
    [("remember", []), ("current_time", ["current_time"]), ("transfer_to_bookings", [])],
)
def test_check_refuses_two_tools_with_one_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], intent: str, tools: list[str]
) -> None:
    config = yaml.safe_load(sample_config_path().read_text())
    invoices = config["specialists"][0]
    invoices["intents"] = [{"name": intent, "description": "an intent"}]
    invoices["tools"] = tools
    invoices["handoffs"] = ["bookings"]
    path = tmp_path / "agents.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli(["check", str(path)]) == 2
    assert f"two tools named {intent!r}" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_serve_rejects_a_port_out_of_range(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli(["serve", "--port", port])
    assert exit_.value.code == 2
    assert "not a port number (1-65535)" in capsys.readouterr().err
