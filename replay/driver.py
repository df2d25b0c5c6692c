"""Driving a replay: each dialogue sent through the HTTP API as a fresh thread, its user
turns in order, dialogues at once; what happened to each turn is a ``TurnRecord``.

It drives the same ingress and thread directory as live traffic. The job that deploys the
app and writes the report around it is ``replay.job``.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
from pydantic import BaseModel, Field

from replay.dataset import Dialogue
from stickyray.config import TeamConfig

__all__ = ["TurnRecord", "replay_dialogues", "turn_record"]

log = logging.getLogger(__name__)


class TurnRecord(BaseModel):
    """What happened to one replayed user turn."""

    dialogue_id: str
    index: int
    labels: list[str] = Field(default_factory=list)
    agent: str | None = None
    supervisor_called: bool = False
    agents_called: list[str] = Field(default_factory=list)
    handoffs: int = 0
    returns: int = 0
    latency_s: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    # Each agent's Usage as the API gives it: tokens, requests, cost_usd (null without pricing).
    usage_by_agent: dict[str, dict[str, int | float | None]] = Field(default_factory=dict)
    status: str = "completed"
    error: str | None = None
    # A turn the thread took as a command (``/supervisor``...): answered, but not routed,
    # so it carries no labels and is not scored.
    command: str | None = None


def turn_record(
    dialogue: Dialogue, index: int, body: dict, latency: float, supervisor: str
) -> TurnRecord:
    """The record of turn ``index`` of ``dialogue`` from the turn the API answered."""
    handoffs = body.get("handoffs", [])
    agent = body.get("agent")
    called = [h["from"] for h in handoffs] + ([agent] if agent else [])
    command = body.get("command")
    return TurnRecord(
        dialogue_id=dialogue.dialogue_id,
        index=index,
        labels=[] if command else dialogue.turns[index].labels,
        command=command,
        agent=agent,
        supervisor_called=supervisor in called,
        agents_called=called,
        handoffs=len(handoffs),
        returns=sum(1 for h in handoffs if h["to"] == supervisor),
        latency_s=latency,
        input_tokens=body.get("usage", {}).get("input_tokens", 0),
        output_tokens=body.get("usage", {}).get("output_tokens", 0),
        usage_by_agent=body.get("usage_by_agent", {}),
        status=body.get("status", "completed"),
        error=body.get("error"),
    )


async def replay_dialogues(
    url: str,
    dialogues: list[Dialogue],
    team: TeamConfig,
    concurrency: int,
    run_id: str,
    scope: str,
    api_key: str | None = None,
) -> list[TurnRecord]:
    """Replay every dialogue as its own thread; ``concurrency`` dialogues at a time.

    ``api_key``: the app's ``STICKYRAY_API_KEY``, if it has one.

    ``scope`` is the app's thread pool scope (``actors.directory.pool_scope``), used to close
    each thread as soon as its dialogue ends and to stop the pool's hosts at the end.
    """
    from actors.directory import passivate_thread, release_pool
    from actors.key import ThreadKey

    supervisor = team.supervisor.name

    records: list[TurnRecord] = []
    done = 0
    started = time.monotonic()
    gate = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, position: int, dialogue: Dialogue) -> None:
        nonlocal done
        # Thread and message ids come from positions, not from the dialogue id, which may
        # hold characters a thread id may not.
        thread = f"replay-{run_id}-{position}"
        async with gate:
            for index, turn in enumerate(dialogue.turns):
                start = time.perf_counter()
                try:
                    response = await client.post(
                        f"/v1/threads/{thread}/messages",
                        json={"text": turn.user, "message_id": f"m{index}"},
                    )
                    response.raise_for_status()
                    body = response.json()
                except (httpx.HTTPError, ValueError) as exc:
                    if isinstance(exc, httpx.HTTPStatusError):
                        error = _refusal(exc.response)
                    else:
                        error = f"{type(exc).__name__}: {exc}"
                    records.append(
                        TurnRecord(
                            dialogue_id=dialogue.dialogue_id,
                            index=index,
                            labels=turn.labels,
                            status="error",
                            error=_shortened(error),
                        )
                    )
                    continue
                records.append(
                    turn_record(dialogue, index, body, time.perf_counter() - start, supervisor)
                )
            # The conversation is over: free its actor now rather than at the idle timeout.
            try:
                await passivate_thread(ThreadKey.of(thread), team, scope)
            except Exception:  # it still closes at its idle timeout; the replay goes on
                log.warning("could not close thread %s", thread, exc_info=True)
        done += 1
        if done % 50 == 0 or done == len(dialogues):
            rate = len(records) / max(time.monotonic() - started, 1e-9)
            print(
                f"replayed {done}/{len(dialogues)} dialogues, {len(records)} turns "
                f"({rate:.1f} turns/s)",
                flush=True,
            )

    try:
        # Room for every dialogue in flight, with headroom: beyond httpx's default of 100, a
        # larger --concurrency would make requests wait in the client, and the wait would
        # count as turn latency.
        limits = httpx.Limits(max_connections=max(100, 2 * concurrency))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        async with httpx.AsyncClient(
            base_url=url, timeout=120, limits=limits, headers=headers
        ) as client:
            await asyncio.gather(*(one(client, i, d) for i, d in enumerate(dialogues)))
    finally:
        await release_pool(team, scope)
    records.sort(key=lambda r: (r.dialogue_id, r.index))
    return records


def _refusal(response: httpx.Response) -> str:
    """The status of an error answer and what the ingress said about it.

    The ingress puts its message in ``error`` (``detail`` too, for FastAPI's shape); a proxy
    in front of it may answer with anything, so its text is kept instead.
    """
    try:
        body = response.json()
    except ValueError:
        body = None
    said = next(
        (
            body[key]
            for key in ("error", "detail")
            if isinstance(body, dict) and isinstance(body.get(key), str) and body[key]
        ),
        None,
    )
    if said is None:
        said = response.text or response.reason_phrase
    return f"HTTP {response.status_code}: {' '.join(said.split())}"


# Room for the ingress's own messages; a proxy's error page, or a validation answer naming
# many fields, is cut: each failed turn keeps its error in turns.jsonl.
_ERROR_CHARS = 500


def _shortened(error: str) -> str:
    return error if len(error) <= _ERROR_CHARS else error[: _ERROR_CHARS - 3] + "..."
