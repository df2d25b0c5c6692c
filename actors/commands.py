"""User commands handled inside the thread actor, with no model call."""

from __future__ import annotations

import re
from dataclasses import dataclass

from stickyray.config import TeamConfig

__all__ = ["CHANGING", "COMMANDS", "Command", "CommandOutcome", "parse_command", "run_command"]

# A command is a single slash-word, maybe ended by punctuation ("/supervisor."), maybe followed
# by more text. "/path/to/file broke" does not match, so pasted paths still reach the agents.
# Matched against the stripped text with a greedy tail: a lazy tail before trailing spaces
# backtracks over them, taking time in the square of their number inside the thread actor.
_COMMAND = re.compile(r"/([A-Za-z][A-Za-z_-]*)[.!?]*(?:\s+(.*))?", re.DOTALL)

COMMANDS: dict[str, str] = {
    "supervisor": "go back to the supervisor; your next message is routed again",
    "status": "show which agent is active and how many turns this thread has",
    "reset": "forget the active agent and the recent messages of this thread",
    "agents": "list the agents and what they do",
    "help": "show this help",
}


# The commands that change the thread: their answers are stored under their message ids.
CHANGING = frozenset({"supervisor", "reset"})


@dataclass(frozen=True)
class Command:
    """A command as typed: its lower-cased name and the text after it ("" if none)."""

    name: str
    after: str = ""


@dataclass(frozen=True)
class CommandOutcome:
    """What a command replies and how it changes the thread."""

    reply: str
    back_to_supervisor: bool = False
    clear_buffer: bool = False

    @property
    def changes_state(self) -> bool:
        """Whether the thread must be checkpointed afterwards."""
        return self.back_to_supervisor or self.clear_buffer


def parse_command(text: str) -> Command | None:
    """The command ``text`` is, or None."""
    match = _COMMAND.fullmatch(text.strip())
    return Command(match.group(1).lower(), match.group(2) or "") if match else None


def _help() -> str:
    lines = ["Commands:"] + [f"  /{name} - {what}" for name, what in COMMANDS.items()]
    return "\n".join(lines)


def run_command(
    name: str, *, active_agent: str | None, turns: int, team: TeamConfig, after: str = ""
) -> CommandOutcome:
    """Carry out command ``name`` against a thread's state.

    A command that changes the thread takes no text ``after`` it: "/reset my password" is
    more likely a question than a wish to lose the conversation, so it changes nothing and
    says how to do either. One that only reads ignores what follows.
    """
    supervisor = team.supervisor.name
    if name in CHANGING and after:
        if name == "reset":
            return CommandOutcome(
                "Nothing was reset: /reset takes no text after it. Send /reset on its own to "
                "clear this thread, or write your message without the leading '/'."
            )
        return CommandOutcome(
            "Nothing changed: /supervisor takes no text after it. Send /supervisor on its "
            "own, then your message, and the supervisor routes that message."
        )
    if name == "supervisor":
        if active_agent is None:
            # Stored all the same: the write is fenced, so an incarnation that missed a handoff
            # cannot confirm "already with the supervisor" while the thread stays elsewhere.
            return CommandOutcome(
                f"You are already talking to the supervisor ({supervisor}).",
                back_to_supervisor=True,
            )
        return CommandOutcome(
            f"Leaving {active_agent}. Your next message goes to the supervisor ({supervisor}).",
            back_to_supervisor=True,
        )
    if name == "status":
        agent = active_agent or f"{supervisor} (supervisor)"
        return CommandOutcome(f"Active agent: {agent}. Turns so far: {turns}.")
    if name == "reset":
        return CommandOutcome(
            "Thread reset: the active agent and recent messages are cleared.",
            back_to_supervisor=True,
            clear_buffer=True,
        )
    if name == "agents":
        lines = [f"  {supervisor} (supervisor) - {team.supervisor.description}"]
        lines += [f"  {s.name} - {s.description}" for s in team.specialists]
        return CommandOutcome("Agents:\n" + "\n".join(lines))
    if name == "help":
        return CommandOutcome(_help())
    return CommandOutcome(f"Unknown command /{name}.\n{_help()}")
