"""agents.yaml validation: errors name the file, the field and what is wrong."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import yaml

from stickyray.config import ModelPrice, TeamConfig, load_config, sample_config_path
from stickyray.errors import ConfigError
from stickyray.settings import check_ray_address, load_settings
from stickyray.testing import FakeLLMServer
from stickyray.turns import Usage
from tests.e2e.teams import openai_team


def load_config_text(text: str) -> TeamConfig:
    with tempfile.TemporaryDirectory() as folder:
        return load_config(write(Path(folder), text))


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "agents.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_sample_config_loads() -> None:
    team = load_config(None)
    assert team.supervisor.name == "triage"
    assert {s.name for s in team.specialists} == {"invoices", "bookings", "support"}
    assert team.handoff_targets("triage") == ["invoices", "bookings", "support"]
    assert team.handoff_targets("invoices") == ["support"]
    assert team.can_return("bookings") and not team.can_return("triage")
    assert sample_config_path().exists()


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda t: t["supervisor"].update(temprature=1), "supervisor.temprature: Extra inputs"),
        (lambda t: t["specialists"][0].update(handoffs=["ghost"]), "unknown agent 'ghost'"),
        (lambda t: t["specialists"][0].update(handoffs=["invoices"]), "lists itself"),
        (lambda t: t["specialists"][1].update(name="invoices"), "used twice"),
        (lambda t: t["specialists"][1].update(autoscaling_config={"max_replicas": 2}), "not both"),
        (
            lambda t: t["specialists"][0].update(
                num_replicas=None,
                autoscaling_config={"min_replicas": 1, "max_replicas": 2, "initial_replicas": 5},
            ),
            "initial_replicas (5) must be between min_replicas (1) and max_replicas (2)",
        ),
        (lambda t: t["specialists"][2].pop("model"), "model is required"),
        (lambda t: t["specialists"][2].update(provider="gemini"), "specialists.2.provider"),
        (lambda t: t["supervisor"].update(name="Bad Name"), "supervisor.name"),
        (lambda t: t["threads"].update(buffer_size=0), "threads.buffer_size"),
        (lambda t: t.update(specialists=[]), "specialists"),
        (lambda t: t.update(embedder={"num_replicas": 0}), "embedder.num_replicas"),
        (lambda t: t["specialists"][0].update(handoffs=["triage"]), "lists the supervisor"),
        (lambda t: t["threads"].update(idle_timeout_s=float("inf")), "finite number"),
        (lambda t: t["supervisor"].update(tool_timeout_s=float("nan")), "finite number"),
        (
            lambda t: t["specialists"][0].update(
                intents=[{"name": "Pay", "required_slots": ["date"], "optional_slots": ["date"]}]
            ),
            "specialists.0.intents.0: slot 'date' is listed twice",
        ),
        (
            lambda t: t["specialists"][0].update(
                intents=[{"name": "Pay", "required_slots": ["party size"]}]
            ),
            "specialists.0.intents.0.required_slots.0",
        ),
    ],
)
def test_bad_configs_name_the_field(tmp_path: Path, mutate, expected: str) -> None:
    team = openai_team()
    mutate(team)
    path = write(tmp_path, team)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "supervisor: [unclosed"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- a list"))
    with pytest.raises(ConfigError, match="the file is empty"):
        load_config(write(tmp_path, "# nothing yet\n"))


def test_a_key_given_twice_is_an_error_not_the_last_one(tmp_path: Path) -> None:
    """YAML keeps the last: the first list's agents would vanish without a word."""
    team = (
        "supervisor: {name: triage, description: Routes}\n"
        "specialists: [{name: a, description: A}]\n"
        "specialists: [{name: b, description: B}]\n"
    )
    with pytest.raises(ConfigError, match="key 'specialists' is given twice") as err:
        load_config(write(tmp_path, team))
    assert "line 3" in str(err.value)
    # A merge key is no repetition: the keys written next to it override the merged ones.
    merged = (
        "supervisor: &base {name: triage, description: Routes}\n"
        "specialists: [{<<: *base, name: a}]\n"
    )
    assert load_config(write(tmp_path, merged)).specialists[0].description == "Routes"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("? [a, b]\n: 1\n", "a list cannot be a key"),
        ("supervisor: {? {a: 1} : x}\n", "a dict cannot be a key"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply to read"),
    ],
)
def test_yaml_that_is_no_configuration_is_an_error_not_a_crash(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_the_readmes_reference_agents_yaml_is_valid() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Configuration: `agents.yaml`", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    team = load_config_text(example)
    assert {s.name for s in team.specialists} == {"invoices", "bookings", "support"}


def test_the_readmes_agents_yaml_snippets_are_valid_in_the_reference() -> None:
    """Each fragment (memory, runs) added to the reference, agents merged by name."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = [part.split("```", 1)[0] for part in readme.split("```yaml\n")[1:]]
    reference = yaml.safe_load(
        readme.split("## Configuration: `agents.yaml`", 1)[1]
        .split("```yaml\n", 1)[1]
        .split("```", 1)[0]
    )
    fragments = [yaml.safe_load(block) for block in blocks]
    fragments = [f for f in fragments if f != reference]
    assert {key for f in fragments for key in f} >= {"memory", "runs"}
    for fragment in fragments:
        config = copy.deepcopy(reference)
        for key, value in fragment.items():
            if key != "specialists":
                config[key] = value
                continue
            for agent in value:
                (same,) = [s for s in config["specialists"] if s["name"] == agent["name"]]
                same.update(agent)
        load_config_text(yaml.safe_dump(config))


def test_environment_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STICKYRAY_PORT", "eighty")
    with pytest.raises(ConfigError, match="STICKYRAY_PORT"):
        load_settings()
    monkeypatch.setenv("STICKYRAY_PORT", "8080")
    monkeypatch.setenv("REDIS_URL", "redis://example:6379/0")
    settings = load_settings()
    assert settings.port == 8080 and settings.redis_url == "redis://example:6379/0"


def test_only_the_documented_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # Generic names that containers and other tools set must not move or expose the server.
    for name, value in (("HOST", "0.0.0.0"), ("PORT", "5000"), ("DATA_DIR", "/elsewhere")):
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert (settings.host, settings.port, settings.data_dir) == (
        "127.0.0.1",
        8000,
        Path(".stickyray"),
    )


def test_an_empty_variable_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "STICKYRAY_CONFIG", "REDIS_URL", "STICKYRAY_PORT"):
        monkeypatch.setenv(name, "")
    settings = load_settings()
    assert settings.openai_api_key is None  # not an empty key every call would fail with
    assert settings.config is None  # not the current directory
    assert (settings.redis_url, settings.port) == (None, 8000)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("STICKYRAY_REDIS_APPENDFSYNC", "sometimes"),
        ("REDIS_URL", "localhost:6379"),
        ("DATABASE_URL", "localhost:5432/db"),
        ("DATABASE_URL", "postgresql://u:p@[bad/db"),
        ("STICKYRAY_LLM_TIMEOUT_S", "inf"),  # every model call would fail
        ("STICKYRAY_LLM_TIMEOUT_S", "1e400"),
        ("STICKYRAY_LLM_TIMEOUT_S", "nan"),
        ("OPENAI_BASE_URL", "api.openai.com/v1"),
        ("ANTHROPIC_BASE_URL", "ftp://example.com"),
        ("OPENAI_API_KEY", "sk-from-a-file\n"),
        ("ANTHROPIC_API_KEY", "sk-ant two words"),
        ("STICKYRAY_API_KEY", "cl\u00e9"),  # no HTTP header carries it
    ],
)
def test_bad_values_are_caught_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name) as err:
        load_settings()
    if name.endswith("_KEY"):  # a credential is never echoed
        assert value.split()[0] not in str(err.value)


def test_a_database_password_is_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    """libpq's keyword form has no '@' to mask before: its password= is masked."""
    monkeypatch.setenv("DATABASE_URL", "host=db.internal user=app password=hunter2 dbname=m")
    with pytest.raises(ConfigError, match="DATABASE_URL") as err:
        load_settings()
    assert "hunter2" not in str(err.value) and "password=***" in str(err.value)


@pytest.mark.parametrize(
    ("name", "value", "fix"),
    [
        ("OPENAI_BASE_URL", "http://127.0.0.1:8080/v1\n", "without spaces, line breaks"),
        ("ANTHROPIC_BASE_URL", " https://api.anthropic.com", "without spaces, line breaks"),
        ("OPENAI_BASE_URL", "http:// 127.0.0.1/v1", "without spaces, line breaks"),
        ("OPENAI_BASE_URL", "http://127.0.0.1\t:8080/v1", "without spaces, line breaks"),
        ("OPENAI_BASE_URL", "http://", "must name a host"),
        ("ANTHROPIC_BASE_URL", "https://:443", "must name a host"),
        ("TELEGRAM_API_BASE", "https://user@", "must name a host"),
        ("OPENAI_BASE_URL", "http://127.0.0.1:99999/v1", "is not a URL"),
        ("ANTHROPIC_BASE_URL", "https://api.anthropic.com/v1", "drop the /v1"),
        ("ANTHROPIC_BASE_URL", "http://127.0.0.1:8080/proxy/v1/", "drop the /v1"),
    ],
)
def test_a_base_url_the_sdks_cannot_call_stops_the_start_saying_what_to_fix(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, fix: str
) -> None:
    """Taken, it would fail each agent's replica as it starts, inside Ray, or every call
    (Anthropic's SDK adds /v1 itself: /v1/v1/messages is a 404)."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"{name}: [^;]*{fix}"):
        load_settings()


def test_the_base_urls_the_fake_llm_prints_are_taken(
    monkeypatch: pytest.MonkeyPatch, fake_llm_server: FakeLLMServer
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", fake_llm_server.openai_base_url)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_llm_server.anthropic_base_url + "/")
    settings = load_settings()
    assert (settings.openai_base_url, settings.anthropic_base_url) == (
        fake_llm_server.openai_base_url,
        fake_llm_server.anthropic_base_url + "/",
    )


@pytest.mark.parametrize(
    "address", ["auto", "local", "10.0.0.5:6379", "head.internal:6379", "ray://head:10001"]
)
def test_ray_addresses_ray_init_takes_are_taken(address: str) -> None:
    check_ray_address(address)


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "not an address", "head"])
def test_a_ray_address_ray_init_refuses_is_named(address: str) -> None:
    with pytest.raises(ConfigError, match="RAY_ADDRESS: must be auto, local, HOST:PORT"):
        check_ray_address(address)


def test_a_config_that_is_not_utf8_says_so(tmp_path: Path) -> None:
    path = tmp_path / "agents.yaml"
    path.write_bytes("supervisor: {description: caf\u00e9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_memory_settings(tmp_path: Path) -> None:
    team = load_config(None)
    assert team.uses_memory and team.memory.embedding_dimension == 384
    assert team.buffer_limit("bookings") == 12 and team.buffer_limit(None) == 20
    data = openai_team()
    data["memory"] = {"embedder": "local", "dimension": 1536}
    with pytest.raises(ConfigError, match="384 dimensions"):
        load_config(write(tmp_path, data))
    data["memory"] = {"embedder": "openai", "dimension": 256}
    data["specialists"][0]["memory"] = {"top_k": 100}
    with pytest.raises(ConfigError, match="specialists.0.memory.top_k"):
        load_config(write(tmp_path, data))
    # text-embedding-3-large's 3072 would fail later, creating pgvector's HNSW index.
    data["specialists"][0]["memory"] = {}
    data["memory"] = {"embedder": "openai", "dimension": 3072}
    with pytest.raises(ConfigError, match="memory.dimension: .* less than or equal to 2000"):
        load_config(write(tmp_path, data))


def test_only_a_specialist_that_can_move_runs_the_precheck(tmp_path: Path) -> None:
    team = openai_team()
    team["routing"] = {"precheck": True}
    team["specialists"][1]["can_return_to_supervisor"] = False  # bookings: no handoffs either
    loaded = load_config(write(tmp_path, team))
    assert loaded.prechecks("invoices") and loaded.prechecks("support")
    assert not loaded.prechecks("bookings"), "it could not act on the check"
    assert not loaded.prechecks("triage")


def test_the_embedder_scales_as_configured(tmp_path: Path) -> None:
    from serve_app.app import build_app
    from stickyray.settings import Settings

    sample = yaml.safe_load(sample_config_path().read_text())
    team = load_config(write(tmp_path, sample | {"embedder": {"num_replicas": 3}}))
    app = build_app(team, Settings(REDIS_URL="redis://localhost:1"))
    # The ingress takes the embedder it shares with the agents among its arguments.
    (embedder,) = [
        arg._bound_deployment
        for arg in app._bound_deployment.init_args
        if getattr(arg, "_bound_deployment", None) and arg._bound_deployment.name == "Embedder"
    ]
    assert embedder.num_replicas == 3
    assert embedder.max_ongoing_requests == 256
    assert embedder.ray_actor_options["num_cpus"] == 0


def test_pricing_covers_every_paid_model(tmp_path: Path) -> None:
    data = openai_team(model="gpt-a")
    data["specialists"][0].update(model="gpt-b")
    data["specialists"][2].update(provider="offline", model=None)
    assert load_config(write(tmp_path, data)).price_of("triage") is None  # no pricing: no cost
    data["pricing"] = {"gpt-a": {"input": 0.15, "output": 0.6}}
    with pytest.raises(
        ConfigError, match=r"pricing: no price for model 'gpt-b' \(agent 'invoices'\)"
    ):
        load_config(write(tmp_path, data))
    for bad in (-1, float("inf"), 1e308):
        data["pricing"]["gpt-b"] = {"input": bad, "output": 1}
        with pytest.raises(ConfigError, match="pricing.gpt-b.input"):
            load_config(write(tmp_path, data))
    data["pricing"]["gpt-b"] = {"input": 2.5, "output": 10}
    team = load_config(write(tmp_path, data))
    assert team.price_of("invoices") == ModelPrice(input=2.5, output=10)
    assert team.price_of("support") == ModelPrice(input=0, output=0)  # offline: no paid model
    usage = Usage(input_tokens=1_000, output_tokens=200, requests=1)
    priced = usage.priced(2.5, 10)
    assert priced.cost_usd == pytest.approx(0.0045)
    assert (priced + Usage()).cost_usd == pytest.approx(0.0045)  # nothing spent adds nothing
    assert (Usage() + priced + priced).cost_usd == pytest.approx(0.009)
    assert (priced + usage).cost_usd is None  # tokens with no price: the cost is unknown
    assert (usage + priced).cost_usd is None
    assert (usage + usage).cost_usd is None and (Usage() + Usage()).cost_usd is None


def test_prompt_cache_tokens_are_charged_at_their_own_prices(tmp_path: Path) -> None:
    data = openai_team(model="gpt-a")
    data["pricing"] = {"gpt-a": {"input": 3, "output": 15, "cached_input": 0.3, "cache_write": 6}}
    price = load_config(write(tmp_path, data)).price_of("triage")
    assert price is not None
    # 10,000 input tokens: 7,000 read from the cache, 2,000 written to it, 1,000 fresh.
    usage = Usage(
        input_tokens=10_000,
        output_tokens=100,
        requests=1,
        cached_input_tokens=7_000,
        cache_write_tokens=2_000,
    )
    cost = (1_000 * 3 + 7_000 * 0.3 + 2_000 * 6 + 100 * 15) / 1e6
    assert price.charge(usage).cost_usd == pytest.approx(cost)
    assert (price.charge(usage) + price.charge(usage)).cost_usd == pytest.approx(2 * cost)
    assert (usage + usage).cached_input_tokens == 14_000
    assert (usage + usage).cache_write_tokens == 4_000
    # Without their prices, cache reads and writes cost what input does.
    plain = ModelPrice(input=3, output=15)
    assert plain.charge(usage).cost_usd == pytest.approx((10_000 * 3 + 100 * 15) / 1e6)
    data["pricing"]["gpt-a"]["cached_input"] = -1
    with pytest.raises(ConfigError, match="pricing.gpt-a.cached_input"):
        load_config(write(tmp_path, data))


def test_pricing_covers_the_paid_embedding_model(tmp_path: Path) -> None:
    data = openai_team(model="gpt-a")
    data["pricing"] = {"gpt-a": {"input": 0.15, "output": 0.6}}
    data["specialists"][1]["memory"] = {"short_window": 6}
    local = load_config(write(tmp_path, data))
    assert local.embedding_price() == ModelPrice(input=0, output=0)  # the local model is free
    data["memory"] = {"embedder": "openai", "embedding_model": "emb-x"}
    with pytest.raises(
        ConfigError, match=r"pricing: no price for the embedding model 'emb-x' \(memory"
    ):
        load_config(write(tmp_path, data))
    data["pricing"]["emb-x"] = {"input": 0.02, "output": 0}
    assert load_config(write(tmp_path, data)).embedding_price() == ModelPrice(input=0.02, output=0)
    del data["pricing"]
    assert load_config(write(tmp_path, data)).embedding_price() is None


def test_a_ray_address_refused_never_repeats_its_password() -> None:
    with pytest.raises(ConfigError, match="RAY_ADDRESS") as err:
        check_ray_address("https://admin:s3cret@head:8265")
    assert "s3cret" not in str(err.value) and "'https://***@head:8265'" in str(err.value)
