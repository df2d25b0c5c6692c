"""Tools an agent can call: resolved from ``agents.yaml`` names, described by JSON schema.

A tool is a plain Python function with type hints. ``agents.yaml`` names it either by a
built-in name (``current_time``) or by import path (``mypackage.tools:lookup_order``).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import re
import threading
import typing
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ConfigDict, ValidationError, create_model

from providers.model import ToolSpec
from stickyray.agent_config import AgentConfig
from stickyray.config import TeamConfig
from stickyray.errors import ConfigError

__all__ = [
    "Tool",
    "ToolError",
    "ToolOutcome",
    "check_tools",
    "intent_tools",
    "resolve_tool",
    "resolve_tools",
]


class ToolError(Exception):
    """A tool reference cannot be resolved."""


# Threads of one sync tool: a call still running past its timeout keeps its thread (a thread
# cannot be stopped). Each tool has threads of its own, so a backend that never answers uses
# up only its tool's, never the event loop's default executor, which the model clients need
# too (aiohttp resolves host names there). Calls beyond them wait for a thread, within their
# own timeout.
MAX_THREADS_PER_TOOL = 8


class _ToolBusy(Exception):
    """Every thread of a sync tool is held by a call that ran past its timeout."""


class _Attempt:
    """Whether a tool call started: one that timed out waiting for a thread never ran."""

    started = False


class _Lane:
    """The threads of one sync tool function, and how many hold calls past their timeout."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(MAX_THREADS_PER_TOOL, thread_name_prefix="stickyray-tool")
        self._lock = threading.Lock()
        self.stuck = 0

    def _unstuck(self, _: Future[Any]) -> None:
        with self._lock:
            self.stuck -= 1

    async def call(
        self, func: Callable[..., Any], kwargs: dict[str, Any], attempt: _Attempt
    ) -> Any:
        with self._lock:
            # Waiting would only run out the caller's timeout too: nothing frees a thread
            # but a backend that answers at last.
            if self.stuck >= MAX_THREADS_PER_TOOL:
                raise _ToolBusy(self.stuck)
        attempt.started = True  # until it is known not to have
        future = self._pool.submit(func, **kwargs)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # its timeout, or the turn's end
            # Not started: it is dropped and never runs. Running: it keeps its thread.
            attempt.started = not future.cancel()
            if attempt.started:
                with self._lock:
                    self.stuck += 1
                future.add_done_callback(self._unstuck)
            raise


_LANES: dict[Callable[..., Any], _Lane] = {}


@dataclass(frozen=True)
class ToolOutcome:
    """What a tool call gives the model, and whether the tool's function started (it may
    then have done something, even if it failed); refused arguments, or a call that never
    got a thread, did nothing."""

    text: str
    ran: bool


@dataclass(frozen=True)
class Tool:
    """A callable with the schema the model sees."""

    name: str
    description: str
    func: Callable[..., Any]
    # A JSON schema given outright (intents); otherwise it comes from the signature.
    parameters: dict[str, Any] | None = None

    def spec(self) -> ToolSpec:
        """The ToolSpec offered to the model."""
        parameters = self.parameters if self.parameters is not None else self._schema()
        return ToolSpec(name=self.name, description=self.description, parameters=parameters)

    def _args_model(self) -> Any:
        # Hints resolved in the function's own module: with ``from __future__ import
        # annotations`` they are strings that mean nothing here.
        hints = typing.get_type_hints(self.func, include_extras=True)
        fields: dict[str, Any] = {}
        takes_any = False  # **kwargs: any other name the model gives goes there
        for param in inspect.signature(self.func).parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                takes_any = takes_any or param.kind == param.VAR_KEYWORD
                continue  # *args / **kwargs: nothing a model can name
            default = param.default if param.default is not inspect.Parameter.empty else ...
            fields[param.name] = (hints.get(param.name, Any), default)
        # A name the function does not take is refused, not dropped: {"orderId": "A-1"}
        # for cancel_order(order_id="latest") must not cancel the latest order.
        config = ConfigDict(extra="allow" if takes_any else "forbid")
        return create_model(f"{self.name}_args", __config__=config, **fields)

    def _optional(self) -> set[str]:
        """The parameters with a default: a null for one of them means "not given"."""
        params = inspect.signature(self.func).parameters.values()
        return {p.name for p in params if p.default is not inspect.Parameter.empty}

    def _schema(self) -> dict[str, Any]:
        schema = self._args_model().model_json_schema()
        schema.pop("title", None)
        return schema

    async def run(self, arguments: dict[str, Any], timeout_s: float | None = None) -> str:
        """Validate arguments, call the function, render the result as text for the model.

        Errors become text too: the model can correct itself, the turn does not fail. So does
        a call still running after ``timeout_s``.
        """
        return (await self.call(arguments, timeout_s)).text

    async def call(self, arguments: dict[str, Any], timeout_s: float | None = None) -> ToolOutcome:
        """``run``, also saying whether the function started."""
        if self.parameters is not None:
            # A schema given outright (intents): only its properties, and null is absent.
            known = self.parameters.get("properties", {})
            unknown = sorted(set(arguments) - set(known))
            if unknown:
                return self._refused(f"has no {', '.join(unknown)}; it takes {', '.join(known)}")
            kwargs = {k: v for k, v in arguments.items() if v is not None}
            missing = [n for n in self.parameters.get("required", []) if n not in kwargs]
            if missing:
                return self._refused(f"needs {', '.join(missing)}")
        else:
            optional = self._optional()
            given = {k: v for k, v in arguments.items() if v is not None or k not in optional}
            try:
                args = self._args_model().model_validate(given)
            except ValidationError as exc:
                return ToolOutcome(
                    f"error: invalid arguments for {self.name}: {exc.errors()}", False
                )
            kwargs = {name: getattr(args, name) for name in type(args).model_fields}
            kwargs |= args.model_extra or {}
        deadline = asyncio.timeout(timeout_s)
        attempt = _Attempt()
        try:
            async with deadline:
                result = await self._call(kwargs, attempt)
            # A result that cannot be shown is the tool's failure too (a repr that raises).
            return ToolOutcome(result if isinstance(result, str) else repr(result), True)
        except _ToolBusy as busy:
            return self._refused(
                f"is not answering: {busy} earlier calls are still running; do not call it "
                "again in this conversation turn"
            )
        # SystemExit too: a tool's argparse or sys.exit() must not stop the replica's loop.
        except (Exception, SystemExit) as exc:  # a failure is reported to the model, not raised
            if not deadline.expired():  # not a TimeoutError the tool raised itself
                failed = f"error: {self.name} failed: {type(exc).__name__}: {exc}"
                return ToolOutcome(failed, attempt.started)
            if not attempt.started:
                return self._refused(
                    f"did not start within {timeout_s:g} s, its earlier calls still running; "
                    "it did not run"
                )
            # A function running in a thread cannot be stopped, and may still do its work.
            return ToolOutcome(
                f"error: {self.name} did not finish within {timeout_s:g} s; it may still "
                "complete, so check before calling it again",
                True,
            )

    def _refused(self, why: str) -> ToolOutcome:
        return ToolOutcome(f"error: {self.name} {why}", False)

    async def _call(self, kwargs: dict[str, Any], attempt: _Attempt) -> Any:
        if inspect.iscoroutinefunction(self.func):
            attempt.started = True
            return await self.func(**kwargs)
        lane = _LANES.get(self.func)
        if lane is None:
            lane = _LANES[self.func] = _Lane()
        result = await lane.call(self.func, kwargs, attempt)
        if inspect.isawaitable(result):  # a sync wrapper (a decorator) around an async tool
            result = await result
        return result


def current_time(timezone: str = "UTC") -> str:
    """The current date and time in ISO 8601 (only UTC is supported)."""
    if timezone.upper() != "UTC":
        return f"only UTC is supported, not {timezone}"
    return datetime.now(UTC).isoformat(timespec="seconds")


BUILTIN_TOOLS: dict[str, Callable[..., Any]] = {"current_time": current_time}
# What OpenAI and Anthropic accept as a tool name.
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def resolve_tool(ref: str) -> Tool:
    """A built-in name or ``module:function`` to a Tool; ToolError says what is wrong."""
    if ref in BUILTIN_TOOLS:
        func = BUILTIN_TOOLS[ref]
    elif ":" in ref:
        module_name, _, attr = ref.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # a bad name, or any error the module raises as it loads
            raise ToolError(f"tool {ref!r}: cannot import {module_name!r}: {exc}") from None
        except SystemExit as exc:  # a script's sys.exit() would end start-up in its words
            raise ToolError(
                f"tool {ref!r}: cannot import {module_name!r}: it calls sys.exit({exc.code!r}) "
                "as it loads"
            ) from None
        found = getattr(module, attr, None)
        if not callable(found):
            raise ToolError(f"tool {ref!r}: {module_name!r} has no function {attr!r}")
        func = found
    else:
        known = ", ".join(sorted(BUILTIN_TOOLS))
        raise ToolError(f"unknown tool {ref!r}: use a built-in ({known}) or 'module:function'")
    name = getattr(func, "__name__", "")
    if not _TOOL_NAME.fullmatch(name):
        # A lambda is "<lambda>", a functools.partial has no name: the model needs one.
        raise ToolError(
            f"tool {ref!r}: needs a function named with 1-64 letters, digits, _ or -, "
            f"got {name or type(func).__name__!r}"
        )
    description = inspect.getdoc(func) or name
    tool = Tool(name=name, description=description.splitlines()[0], func=func)
    try:
        tool.spec()  # built now, not in a replica after Ray has started
    except Exception as exc:  # pydantic cannot describe a parameter type as JSON schema
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ToolError(
            f"tool {ref!r}: its parameters cannot be described to the model: {why}"
        ) from None
    return tool


def resolve_tools(refs: list[str]) -> list[Tool]:
    """Resolve every reference of one agent."""
    return [resolve_tool(ref) for ref in refs]


def intent_tools(agent: AgentConfig) -> list[Tool]:
    """One tool per intent of ``agent``; calling it records the request (no backend is wired)."""
    tools = []
    for intent in agent.intents:
        slots = [*intent.required_slots, *intent.optional_slots]
        parameters = {
            "type": "object",
            "properties": {
                slot: {"type": "string", "description": agent.slots.get(slot, slot)}
                for slot in slots
            },
            "required": list(intent.required_slots),
        }

        tools.append(
            Tool(
                name=intent.name,
                description=intent.description or intent.name,
                func=_recorder(intent.name),
                parameters=parameters,
            )
        )
    return tools


def _recorder(intent: str) -> Callable[..., str]:
    # The intent is closed over, not a parameter: no argument the model sends can rename it.
    def record(**values: Any) -> str:
        filled = ", ".join(f"{k}={v}" for k, v in sorted(values.items()))
        return f"{intent} recorded ({filled or 'no details'})"

    return record


def check_tools(team: TeamConfig) -> None:
    """Resolve every agent's tools now, so a bad reference or a clash stops start-up."""
    from serve_app.agent import check_tool_names  # it builds on this module

    for agent in team.agents:
        try:
            tools = resolve_tools(agent.tools) + intent_tools(agent)
        except ToolError as exc:
            raise ConfigError(f"agent {agent.name!r} tools: {exc}") from None
        check_tool_names(agent, team, tools)
