"""`stickyray serve` on a cluster whose Serve already listens elsewhere: an error, not a wrong URL.

Ray is not started: ray.init and Serve's calls are replaced by recorders.
"""

from __future__ import annotations

import signal
import types
from pathlib import Path

import pytest
import yaml

from stickyray.cli import main as cli
from stickyray.config import sample_config_path
from stickyray.serve_command import http_mismatch


def test_serve_at_the_address_asked_for_is_no_mismatch() -> None:
    assert http_mismatch("0.0.0.0", 9000, "0.0.0.0", 9000) is None


@pytest.mark.parametrize(("host", "port"), [("0.0.0.0", 8000), ("127.0.0.1", 9000)])
def test_serve_elsewhere_is_named_with_the_ways_out(host: str, port: int) -> None:
    said = http_mismatch(host, port, "127.0.0.1", 8000)
    assert said is not None
    assert "already running on this cluster at http://127.0.0.1:8000" in said
    assert f"cannot serve at http://{host}:{port}" in said
    assert "(--host 127.0.0.1 --port 8000)" in said and "`serve shutdown`" in said


def test_serve_with_http_off_is_named() -> None:
    said = http_mismatch("127.0.0.1", 8000, None, 8000)
    assert said is not None and "with HTTP off" in said and "`serve shutdown`" in said


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> dict[str, list]:
    """A joined cluster whose Serve listens on 127.0.0.1:8000; records Serve's calls."""
    import ray
    from ray import serve
    from ray.serve import context
    from ray.serve.config import HTTPOptions

    calls: dict[str, list] = {"start": [], "run": [], "delete": []}

    def run(*args: object, **kwargs: object) -> None:
        calls["run"].append(kwargs)
        raise RuntimeError("stop here")  # else serve would wait for Ctrl-C

    running = types.SimpleNamespace(http_config=HTTPOptions(host="127.0.0.1", port=8000))
    monkeypatch.setattr(signal, "signal", lambda *_: None)
    monkeypatch.setattr(ray, "init", lambda **_: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(serve, "start", lambda **kw: calls["start"].append(kw))
    monkeypatch.setattr(serve, "run", run)
    monkeypatch.setattr(serve, "delete", lambda name: calls["delete"].append(name))
    monkeypatch.setattr(context, "_get_global_client", lambda: running)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    monkeypatch.setenv("REDIS_URL", redis_url)
    return calls


def serve_argv(tmp_path: Path, host: str, port: int) -> list[str]:
    """`stickyray serve` of the sample without memory (no Postgres), at ``host``:``port``."""
    config = yaml.safe_load(sample_config_path().read_text())
    for agent in [config["supervisor"], *config["specialists"]]:
        agent.pop("memory", None)
    path = tmp_path / "agents.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["serve", "--config", str(path), "--host", host, "--port", str(port)]


def test_serve_stops_before_deploying_when_serve_listens_elsewhere(
    cluster: dict[str, list], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(serve_argv(tmp_path, "0.0.0.0", 9000)) == 2
    out, err = capsys.readouterr()
    assert cluster["start"] == [{"http_options": {"host": "0.0.0.0", "port": 9000}}]
    assert "stickyray: Serve is already running on this cluster at http://127.0.0.1:8000" in err
    assert "serving" not in out
    assert cluster["run"] == [], "nothing deployed"
    assert cluster["delete"] == [], "the app running there is not this run's to delete"


def test_serve_deploys_when_serve_listens_where_asked(
    cluster: dict[str, list], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        cli(serve_argv(tmp_path, "127.0.0.1", 8000)) == 1
    )  # the recorder's RuntimeError: the app could not start
    assert "already running" not in capsys.readouterr().err
    assert len(cluster["run"]) == 1 and cluster["delete"] == ["stickyray"]
