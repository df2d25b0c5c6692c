"""Thread keys and user commands."""

from __future__ import annotations

import pickle

import pytest

from actors.commands import CHANGING, COMMANDS, Command, parse_command, run_command
from actors.key import ThreadKey
from stickyray.config import load_config
from stickyray.errors import CheckpointConflict, InvalidThreadKey, ProviderError, StoreUnavailable


def test_thread_key_validates_and_renders_once() -> None:
    key = ThreadKey.of("whatsapp:+34600111222")
    assert key.tenant == "default"
    assert key.actor_name == "thread/default/whatsapp:+34600111222"
    assert key.redis_key("checkpoint") == "stickyray:{default/whatsapp:+34600111222}:checkpoint"
    for bad in ("", "has space", "a/b", "x" * 129, "-leading"):
        with pytest.raises(InvalidThreadKey) as err:
            ThreadKey.of(bad)
        assert err.value.field == "thread_id"
    with pytest.raises(InvalidThreadKey):
        ThreadKey("bad tenant", "t1")


def test_thread_ids_cannot_end_in_a_newline() -> None:
    for bad in ("alice\n", "alice\nbob", "\nalice"):
        with pytest.raises(InvalidThreadKey):
            ThreadKey.of(bad)
        with pytest.raises(InvalidThreadKey):
            ThreadKey(tenant=bad, thread_id="alice")


def test_errors_survive_pickling() -> None:
    for exc in (
        InvalidThreadKey("thread_id", "a b", "no spaces"),
        CheckpointConflict("default/t", 3, 5),
        StoreUnavailable("redis", "connection refused"),
        ProviderError("openai", "triage", "timeout"),
    ):
        again = pickle.loads(pickle.dumps(exc))
        assert type(again) is type(exc) and str(again) == str(exc)


def test_parse_command() -> None:
    assert parse_command("/supervisor") == Command("supervisor")
    assert parse_command("  /STATUS  ") == Command("status")
    assert parse_command("/supervisor.") == Command("supervisor")
    assert parse_command("/help!?") == Command("help")
    assert parse_command("/foo bar baz") == Command("foo", "bar baz")
    assert parse_command("/reset my\npassword ") == Command("reset", "my\npassword")
    assert parse_command("/path/to/file is broken") is None
    assert parse_command("/status.txt is missing") is None
    assert parse_command("hello /status") is None
    assert parse_command("/") is None


@pytest.mark.timeout(10)
def test_a_long_run_of_spaces_is_parsed_in_one_pass() -> None:
    """Parsing runs in the thread actor: a lazy match backtracking over every space of a
    200,000-space message would hold its event loop for minutes, not milliseconds."""
    spaces = " " * 200_000
    assert parse_command(f"/a x{spaces}y") == Command("a", f"x{spaces}y")
    assert parse_command(f"/status{spaces}") == Command("status")


@pytest.mark.parametrize("name", sorted(CHANGING))
def test_a_command_that_changes_the_thread_takes_no_text_after_it(name: str) -> None:
    """ "/reset my password" is a question more likely than a wish to lose the thread."""
    team = load_config(None)
    out = run_command(name, active_agent="bookings", turns=4, team=team, after="my password")
    assert not out.changes_state and f"Send /{name} on its own" in out.reply
    status = run_command("status", active_agent="bookings", turns=4, team=team, after="please")
    assert "bookings" in status.reply


def test_the_commands_that_change_the_thread_are_the_changing_ones() -> None:
    """A reset keeps the answers of CHANGING commands: it must name every one."""
    team = load_config(None)
    for name in COMMANDS:
        out = run_command(name, active_agent="bookings", turns=4, team=team)
        assert out.changes_state == (name in CHANGING)


def test_commands_against_state() -> None:
    team = load_config(None)
    out = run_command("supervisor", active_agent="bookings", turns=4, team=team)
    assert out.back_to_supervisor and not out.clear_buffer and "triage" in out.reply
    # Stored even with nothing to leave, so a superseded incarnation cannot confirm it.
    already = run_command("supervisor", active_agent=None, turns=4, team=team)
    assert already.changes_state and "already talking" in already.reply
    status = run_command("status", active_agent="bookings", turns=4, team=team)
    assert "bookings" in status.reply and "4" in status.reply and not status.changes_state
    reset = run_command("reset", active_agent="bookings", turns=4, team=team)
    assert reset.back_to_supervisor and reset.clear_buffer
    agents = run_command("agents", active_agent=None, turns=0, team=team).reply
    assert all(name in agents for name in ("triage", "invoices", "bookings", "support"))
    unknown = run_command("bogus", active_agent=None, turns=0, team=team).reply
    assert "Unknown command /bogus" in unknown and "/help" in unknown
