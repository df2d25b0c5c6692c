"""`stickyray check` and `stickyray serve` reject bad files and arguments before starting."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest
import yaml

from stickyray.chat import run_chat
from stickyray.cli import main as cli
from stickyray.config import sample_config_path
from stickyray.serve_command import StopRequests
from tests.conftest import free_port


def test_check_resolves_tools(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = yaml.safe_load(sample_config_path().read_text())
    config["specialists"][0]["tools"] = ["no_such_tool"]
    path = tmp_path / "agents.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli(["check", str(path)]) == 2
    # Named with its file, as a schema error is.
    assert f"{path}: agent 'invoices' tools: unknown tool 'no_such_tool'" in (
        capsys.readouterr().err
    )
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
    assert f"{path}: agent 'invoices' would offer two tools named {intent!r}" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_serve_rejects_a_port_out_of_range(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli(["serve", "--port", port])
    assert exit_.value.code == 2
    assert "not a port number (1-65535)" in capsys.readouterr().err


def test_serve_refuses_webhooks_it_could_not_sign(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before Ray starts: nothing is listening, nothing was started."""
    config = yaml.safe_load(sample_config_path().read_text())
    config["runs"] = {"webhook_urls": ["https://hooks.example.com/stickyray/"]}
    path = tmp_path / "agents.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.delenv("STICKYRAY_WEBHOOK_SECRET", raising=False)
    assert cli(["serve", "--config", str(path)]) == 2
    assert "STICKYRAY_WEBHOOK_SECRET must be set" in capsys.readouterr().err
    monkeypatch.setenv("STICKYRAY_WEBHOOK_SECRET", "whsec_tooshort")
    assert cli(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "STICKYRAY_WEBHOOK_SECRET: must be whsec_" in err and "tooshort" not in err


def test_chat_refuses_a_thread_id_the_server_would(capsys: pytest.CaptureFixture[str]) -> None:
    # Checked before connecting: nothing listens on the URL.
    assert cli(["chat", "alice#2", "--url", "http://127.0.0.1:9"]) == 2
    assert "thread id 'alice#2'" in capsys.readouterr().err


def test_serve_refuses_the_dashboards_address_as_ray_address(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray's job tools read RAY_ADDRESS as the dashboard's http:// address; ray.init cannot."""
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert cli(["serve"]) == 2
    assert "RAY_ADDRESS: must be auto, local, HOST:PORT" in capsys.readouterr().err
    monkeypatch.setenv("RAY_ADDRESS", "https://admin:s3cret@head:8265")
    assert cli(["serve"]) == 2
    err = capsys.readouterr().err
    assert "s3cret" not in err and "https://***@head:8265" in err


@pytest.mark.parametrize("url", ["http://[::1", "127.0.0.1:8000", "http://"])
def test_chat_refuses_a_url_it_cannot_send_to(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Checked before the first line is read: a line is waiting, and nothing is sent.
    assert run_chat(url, "t1", stdin=io.StringIO("hello\n")) == 2
    err = capsys.readouterr().err
    assert f"stickyray: --url {url!r}: " in err
    assert "give the server's address, e.g. http://127.0.0.1:8000" in err


def test_chat_skips_a_line_that_is_not_utf8(capsys: pytest.CaptureFixture[str]) -> None:
    """Python reads such bytes as lone surrogates, which no JSON body can carry."""
    # Not sent, so nothing needs to listen on the URL; the chat goes on to the end of input.
    assert run_chat("http://127.0.0.1:9", "t1", stdin=io.StringIO("caf\udce9\n")) == 0
    assert "not UTF-8, so it was not sent" in capsys.readouterr().err


def no_memory_team() -> dict:
    config = yaml.safe_load(sample_config_path().read_text())
    for agent in [config["supervisor"], *config["specialists"]]:
        agent.pop("memory", None)
    return config


def serve_without_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> int:
    """``stickyray serve`` of the sample team without memory, on the given Redis."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    path = tmp_path / "agents.yaml"
    path.write_text(yaml.safe_dump(no_memory_team()))
    return cli(["serve", "--config", str(path)])


def test_serve_names_a_ray_cluster_it_cannot_join(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
) -> None:
    """What ray.init raises for RAY_ADDRESS=auto with no cluster: a message, exit 2."""
    import ray

    def no_cluster(**_: object) -> None:
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "init", no_cluster)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert serve_without_memory(tmp_path, monkeypatch, redis_url) == 2
    err = capsys.readouterr().err
    assert "cannot join the Ray cluster at RAY_ADDRESS=auto: Could not find any" in err


@pytest.mark.timeout(60)
def test_serve_says_at_once_that_no_cluster_answers_at_ray_address(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
) -> None:
    """ray.init retried a HOST:PORT with nothing behind it for about 14 minutes."""
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", address)
    assert serve_without_memory(tmp_path, monkeypatch, redis_url) == 2
    err = capsys.readouterr().err
    assert f"cannot join the Ray cluster at RAY_ADDRESS={address}: nothing answers there" in err


def test_serve_refuses_a_port_something_else_listens_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new local cluster's Serve could not listen there, yet the app would deploy and the
    address printed would reach another server (a second stickyray serve, say)."""
    import ray

    def no_ray(**_: object) -> None:
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("STICKYRAY_DATA_DIR", str(tmp_path / "data"))
    path = tmp_path / "agents.yaml"
    path.write_text(yaml.safe_dump(no_memory_team()))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert cli(["serve", "--config", str(path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen at http://127.0.0.1:{port}: Address already in use" in err
    assert not (tmp_path / "data" / "redis").exists()  # refused before anything started


def test_serve_refuses_its_embedded_redis_on_a_cluster_of_several_nodes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded Redis listens on a unix socket of this machine: thread actors placed on
    the cluster's other nodes could never reach their checkpoints."""
    import ray
    from ray import serve

    def no_serve(**_: object) -> None:
        raise RuntimeError("Serve started on a cluster its checkpoints are out of reach of")

    monkeypatch.setattr(ray, "init", lambda **_: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(serve, "start", no_serve)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}, {"Alive": False}])
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("STICKYRAY_DATA_DIR", str(tmp_path / "data"))
    path = tmp_path / "agents.yaml"
    path.write_text(yaml.safe_dump(no_memory_team()))
    assert cli(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "the Ray cluster at RAY_ADDRESS has 2 nodes, but REDIS_URL is unset" in err
    assert not (tmp_path / "data" / "redis" / "redis.sock").exists()  # stopped again


def test_serve_never_repeats_the_ray_addresss_password(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
) -> None:
    """Ray's own reason may quote the address it could not reach."""
    import ray

    address = "ray://admin:s3cret@head:10001"

    def unreachable(**_: object) -> None:
        raise ConnectionError(f"ray client connection to {address} timed out")

    monkeypatch.setattr(ray, "init", unreachable)
    monkeypatch.setenv("RAY_ADDRESS", address)
    assert serve_without_memory(tmp_path, monkeypatch, redis_url) == 2
    err = capsys.readouterr().err
    assert "s3cret" not in err
    assert "RAY_ADDRESS=ray://***@head:10001: ray client connection to ray://***@head:10001" in err


def test_chat_refuses_a_key_no_header_carries(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STICKYRAY_API_KEY", "cl\u00e9")
    assert cli(["chat", "alice", "--url", "http://127.0.0.1:9"]) == 2
    assert "STICKYRAY_API_KEY must be printable ASCII" in capsys.readouterr().err


def test_stop_requests_during_start_up_wait_then_abort(capfd: pytest.CaptureFixture[str]) -> None:
    stop = StopRequests()
    stop.request()  # the first waits for the app to be up...
    assert "Ctrl-C again to abort now" in capfd.readouterr().err  # written to fd 2: no lock
    with pytest.raises(KeyboardInterrupt):  # ...a second aborts the start-up
        stop.request()
    stop.settled()  # what the clean-up does first: it must not be cut short
    stop.request()
    stop.wait()  # the request made during start-up stops the server once it is up
    up = StopRequests()
    up.settled()
    up.request()  # once up, a request stops it, whatever came before
    up.request()
    up.wait()


@pytest.mark.parametrize(("host", "fix"), [("0.0.0.0 ", "without spaces"), ("", "not be empty")])
def test_serve_refuses_a_host_nothing_can_bind_to(
    host: str, fix: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serve's proxy would fail on it after Ray started; "" is no request for the default."""
    monkeypatch.setenv("STICKYRAY_PORT", "eighty")  # a host let through starts nothing either
    with pytest.raises(SystemExit) as exit_:
        cli(["serve", "--host", host])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --host: {host!r} must" in err and fix in err


@pytest.mark.parametrize("command", [["serve"], ["memory", "reembed"]])
def test_a_config_from_stickyray_config_says_so_when_it_cannot_be_read(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
) -> None:
    missing = tmp_path / "agents.yaml"
    monkeypatch.setenv("STICKYRAY_CONFIG", str(missing))
    assert cli(command) == 2
    assert (
        f"stickyray: {missing} (from STICKYRAY_CONFIG): cannot read configuration"
        in capsys.readouterr().err
    )
    assert cli([*command, "--config", str(missing)]) == 2  # given on the command line
    assert f"stickyray: {missing}: cannot read" in capsys.readouterr().err


def test_a_tool_module_that_exits_as_it_loads_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script's sys.exit() would end `check` with its own words, naming no tool."""
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit('usage: run me')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = yaml.safe_load(sample_config_path().read_text())
    config["specialists"][0]["tools"] = ["exits_on_import:lookup"]
    path = tmp_path / "agents.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli(["check", str(path)]) == 2
    assert (
        "agent 'invoices' tools: tool 'exits_on_import:lookup': cannot import "
        "'exits_on_import': it calls sys.exit('usage: run me') as it loads"
    ) in capsys.readouterr().err
