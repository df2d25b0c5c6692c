"""Values that parse but could not work: errors before anything starts, naming the field or
the variable and what to write instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from stickyray.config import MAX_TTL_S, TeamConfig, load_config
from stickyray.errors import ConfigError
from stickyray.settings import Settings, check_host, load_settings, masked
from tests.e2e.teams import openai_team


def load(tmp_path: Path, data: dict[str, Any] | str) -> TeamConfig:
    path = tmp_path / "agents.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return load_config(path)


TEAM = "supervisor: {name: triage, description: Routes}\nspecialists: [{name: a, description: A}]\n"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (
            "  slots: {date: 2025-02-30}\n",
            3,
            "'2025-02-30' is not a valid date (day is out of range for month): quote it",
        ),
        (
            "threads:\n  buffer_size: !!int twenty\n",
            4,
            "'twenty' is not a valid int (invalid literal for int() with base 10: 'twenty'): "
            "correct the value, or remove its !!int tag",
        ),
        ("threads: {idle_timeout_s: !!float soon}\n", 3, "'soon' is not a valid float"),
        ("routing: {precheck: !!bool maybe}\n", 3, "'maybe' is not a valid bool: correct"),
        ("runs: {x: !!timestamp later}\n", 3, "'later' is not a valid date: correct"),
    ],
)
def test_a_scalar_yaml_cannot_read_names_its_line_not_a_traceback(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    """PyYAML raises a plain ValueError (or KeyError...) for these, not a YAMLError."""
    if text.startswith("  "):  # a key of the specialist
        text = TEAM.replace("A}]\n", "A,\n") + text.replace("  ", "    ", 1) + "  }]\n"
    else:
        text = TEAM + text
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    assert "agents.yaml: not valid YAML: " in str(err.value)
    assert message in str(err.value) and f"line {line}," in str(err.value)


def test_a_quoted_date_is_text(tmp_path: Path) -> None:
    text = TEAM.replace("A}]", "A, slots: {date: '2025-02-30'}}]")
    assert load(tmp_path, text).agent("a").slots == {"date": "2025-02-30"}


@pytest.mark.parametrize(
    ("section", "field", "too_long"),
    [
        ("threads", "checkpoint_ttl_s", 10**16),
        ("threads", "message_id_ttl_s", 10**16),
        ("runs", "result_ttl_s", 10**16),
        ("threads", "idle_timeout_s", 1e300),
    ],
)
def test_an_expiry_redis_would_refuse_is_an_error(
    tmp_path: Path, section: str, field: str, too_long: float
) -> None:
    """Redis answers "invalid expire time" to every write past its clock's range."""
    data = openai_team()
    data.setdefault(section, {})[field] = too_long
    with pytest.raises(ConfigError, match=f"{section}.{field}: Input should be less than"):
        load(tmp_path, data)
    data[section][field] = 30 * 24 * 3600 if field == "idle_timeout_s" else MAX_TTL_S
    if field == "idle_timeout_s":  # the state must outlive a thread left open that long
        data[section]["checkpoint_ttl_s"] = MAX_TTL_S
    assert getattr(getattr(load(tmp_path, data), section), field) == data[section][field]


@pytest.mark.parametrize(
    ("agent", "field", "value"),
    [
        ({"description": " "}, "specialists.0.description", "must not be blank"),
        ({"description": "\n"}, "specialists.0.description", "must not be blank"),
        ({"provider": "openai", "model": " "}, "specialists.0.model", "must not be blank"),
        (
            {"provider": "openai", "model": "gpt-4o-mini "},
            "specialists.0.model",
            "must not start or end with spaces: write 'gpt-4o-mini'",
        ),
    ],
)
def test_a_blank_name_or_description_is_an_error(
    tmp_path: Path, agent: dict[str, str], field: str, value: str
) -> None:
    data = {
        "supervisor": {"name": "triage", "description": "Routes."},
        "specialists": [{"name": "bookings", "description": "Bookings.", **agent}],
    }
    with pytest.raises(ConfigError, match=f"{field}: {value}"):
        load(tmp_path, data)


def test_a_blank_embedding_model_is_an_error(tmp_path: Path) -> None:
    data = openai_team()
    data["memory"] = {"embedder": "openai", "embedding_model": ""}
    with pytest.raises(ConfigError, match="memory.embedding_model: must not be blank"):
        load(tmp_path, data)
    data["memory"]["embedding_model"] = "text-embedding-3-large"
    assert load(tmp_path, data).memory.embedder_id == "openai/text-embedding-3-large"


def test_an_integer_with_an_exponent_says_how_to_write_it(tmp_path: Path) -> None:
    """YAML 1.1 reads 1e6 as text: the field's error alone would not say why."""
    data = openai_team()
    data["runs"] = {"max_queued": "1e6"}
    with pytest.raises(ConfigError) as err:
        load(tmp_path, data)
    assert "runs.max_queued: " in str(err.value)
    assert "(write integers without an exponent: 1000000 for 1e6)" in str(err.value)
    data["runs"] = {"max_queued": "many"}
    with pytest.raises(ConfigError) as err:
        load(tmp_path, data)
    assert "exponent" not in str(err.value)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis://:hunter2@redis.internal:637900", "Port out of range 0-65535"),
        ("redis://user:hunter2@[::1", "Invalid IPv6 URL"),
        ("redis://redis.internal:0", "port 0"),
        ("redis://redis.internal?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
    ],
)
def test_a_redis_url_redis_py_cannot_connect_to_is_refused_first(
    monkeypatch: pytest.MonkeyPatch, url: str, reason: str
) -> None:
    """redis-py would refuse it in a deployment, after Ray started."""
    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(ConfigError, match="REDIS_URL: is not a Redis URL") as err:
        load_settings()
    assert reason in str(err.value) and "hunter2" not in str(err.value)


def test_a_redis_urls_password_is_not_in_pythons_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    # urlsplit quotes the whole authority for characters that normalise to "@" or ":".
    monkeypatch.setenv("REDIS_URL", "redis://user:hunter\uff032@redis.internal:6379")
    with pytest.raises(ConfigError, match="REDIS_URL") as err:
        load_settings()
    assert "hunter" not in str(err.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:hunter2@db.internal:543200/memories",
        "postgresql://app:hunter2@[::1]:0/memories",
        "postgres://app:hunter2@db1:5432,db2:x/memories",
    ],
)
def test_a_database_url_with_no_port_a_server_has_is_refused_first(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """asyncpg would refuse it when the first agent replica opens its pool, after Ray."""
    monkeypatch.setenv("DATABASE_URL", url)
    refused = "DATABASE_URL: has port '[^']+': a port is 1-65535"
    with pytest.raises(ConfigError, match=refused) as err:
        load_settings()
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:pw@db.internal:5432/memories",
        "postgresql://app:pw@[::1]/memories",
        "postgres://app:pw@db1:5432,db2/memories",
        "postgresql:///memories?host=/var/run/postgresql",
    ],
)
def test_a_database_url_asyncpg_takes_is_taken(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("DATABASE_URL", url)
    assert load_settings().database_url == url


@pytest.mark.parametrize("url", ["redis://:pw@redis.internal:6379/0", "unix:///tmp/redis.sock"])
def test_a_redis_url_redis_py_takes_is_taken(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    assert load_settings().redis_url == url


@pytest.mark.parametrize(
    ("host", "fix"),
    [
        ("0.0.0.0 ", "without spaces, line breaks or control characters"),
        ("\t127.0.0.1", "without spaces, line breaks or control characters"),
        ("10.0.0.256", "must be an IP address"),
        ("[::1]", "without brackets"),
        ("my host", "without spaces"),
        ("-api.internal", "must be an IP address"),
    ],
)
def test_a_host_nothing_can_bind_to_is_refused(
    monkeypatch: pytest.MonkeyPatch, host: str, fix: str
) -> None:
    """Serve's proxy would fail to bind it only after Ray started."""
    monkeypatch.setenv("STICKYRAY_HOST", host)
    with pytest.raises(ConfigError, match=f"STICKYRAY_HOST: [^;]*{fix}"):
        load_settings()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "127.0.0.1", "localhost", "api_1.internal."])
def test_a_host_to_bind_to_is_taken(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    monkeypatch.setenv("STICKYRAY_HOST", host)
    assert load_settings().host == host == check_host(host)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("@my bot", "@my bot"),  # no URL: nothing to mask
        ("https://example.com/path@v2", "https://example.com/path@v2"),  # "@" in the path
        ("redis://:hunter2@redis.internal:6379", "redis://***@redis.internal:6379"),
        ("default:hunter2@redis.internal:6379", "***@redis.internal:6379"),  # scheme left out
    ],
)
def test_only_a_urls_user_info_is_masked(value: str, shown: str) -> None:
    assert masked(value) == shown


def test_a_bad_telegram_username_is_quoted_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEGRAM_BOT_USERNAME", "@my bot")
    with pytest.raises(ConfigError, match="TELEGRAM_BOT_USERNAME: .*got '@my bot'"):
        load_settings()


@pytest.mark.parametrize(
    ("threads", "message"),
    [
        (
            {"checkpoint_ttl_s": 7200, "idle_timeout_s": 7200},
            "threads: checkpoint_ttl_s (7200) must be above idle_timeout_s (7200)",
        ),
        (
            {"idle_timeout_s": 30 * 24 * 3600},  # the retention's default is 30 days too
            "raise checkpoint_ttl_s (an hour at least, 30 days by default) or lower idle_timeout_s",
        ),
        ({"checkpoint_ttl_s": 60}, "threads.checkpoint_ttl_s: Input should be greater than or"),
    ],
)
def test_a_retention_a_thread_still_open_could_outlive_is_an_error(
    tmp_path: Path, threads: dict[str, float], message: str
) -> None:
    """Stored state expiring under an open thread was gone mid-turn: the turn ran again from
    nothing, again and again, and the epoch restarted under the incarnation still open."""
    data = openai_team()
    data.setdefault("threads", {}).update(threads)
    with pytest.raises(ConfigError) as err:
        load(tmp_path, data)
    assert message in str(err.value)
    data["threads"]["checkpoint_ttl_s"] = 3600  # an hour, the least
    data["threads"]["idle_timeout_s"] = 3599
    assert load(tmp_path, data).threads.checkpoint_ttl_s == 3600


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("OPENAI_BASE_URL", "https://proxy-user:hunter2@proxy.example/v1"),
        ("ANTHROPIC_BASE_URL", "https://proxy-user:hunter2@proxy.example"),
        ("OPENAI_BASE_URL", "http://hunter2@127.0.0.1:8080/v1"),
    ],
)
def test_settings_refuse_credentials_in_an_llm_base_url_without_echoing_them(
    monkeypatch: pytest.MonkeyPatch, name: str, url: str
) -> None:
    """The SDKs send the key in a header: the HTTP client then refuses every call (OpenAI's
    with a ValueError that is not even a ProviderError)."""
    monkeypatch.setenv(name, url)
    with pytest.raises(
        ConfigError, match=f"{name}: must not hold credentials[^;]*remove them"
    ) as err:
        load_settings()
    assert "hunter2" not in str(err.value)
    # Built in code, the ValidationError's text does not show it either.
    with pytest.raises(ValidationError) as raw:
        Settings.model_validate({name: url})
    assert "hunter2" not in str(raw.value)


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("OPENAI_BASE_URL", "https://user:hunter2/x@api.example.com/v1"),
        ("TELEGRAM_API_BASE", "https://user:hunter2?x@api.telegram.example"),
        ("DATABASE_URL", "postgresql://user:hunter2/x@db.example/stickyray"),
        ("REDIS_URL", "redis://user:hunter2#x@redis.example:6379/0"),
    ],
)
def test_a_password_with_an_unencoded_slash_is_never_quoted(
    monkeypatch: pytest.MonkeyPatch, name: str, url: str
) -> None:
    """A "/", "?" or "#" ends a URL's authority: parsers read the password as host and port,
    and their errors ("port 'hunter2'") quoted it, as did the error's "(got ...)"."""
    monkeypatch.setenv(name, url)
    with pytest.raises(ConfigError, match=f"{name}: .*percent-encode them") as err:
        load_settings()
    assert "hunter2" not in str(err.value)
