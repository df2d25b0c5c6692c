"""HTTP routes of queued runs: a thread's open runs, one run, and cancelling one.

Queuing a run (POST /v1/threads/{thread_id}/runs) is the ingress's own route: it takes a
message as POST .../messages does. These read and cancel what the queue holds.
"""

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from actors.run_queue import RunQueue
from actors.run_records import RunRecord
from serve_app.api_errors import http_error
from serve_app.api_models import MessageIdPath, OpenRuns, ThreadIdPath, thread_key
from stickyray.errors import StoreUnavailable
from stickyray.metrics import record_run

__all__ = ["RunsState", "router"]

router = APIRouter(prefix="/v1/threads/{thread_id}/runs", tags=["runs"])


@dataclass(frozen=True)
class RunsState:
    """What the routes need from the ingress: the app's run queue, and its name."""

    queue: RunQueue
    app: str


def _runs(request: Request) -> RunsState:
    state: RunsState | None = getattr(request.app.state, "runs", None)
    if state is None:  # pragma: no cover - the ingress sets it before serving
        raise HTTPException(503, "runs are not ready")
    return state


Runs = Annotated[RunsState, Depends(_runs)]


@router.get("", response_model=OpenRuns)
async def get_open_runs(
    runs: Runs,
    thread_id: str = ThreadIdPath,
    limit: int = Query(default=100, ge=1, le=1000),
    after: str | None = Query(
        default=None, max_length=128, description="The last run of the previous page."
    ),
) -> OpenRuns:
    """The thread's runs that are queued or running, in the order they run (finished ones
    are its turns), from the one after run ``after``."""
    key = thread_key(thread_id)
    after = after or None  # "after=" is the first page, as in the README's example
    try:
        found = await runs.queue.open_runs(key, limit, after)
    except StoreUnavailable as exc:
        raise http_error(exc) from None
    if found is None:
        raise HTTPException(
            422, f"query.after: thread {thread_id!r} has no run {after!r} (or it expired)"
        )
    return OpenRuns(thread_id=thread_id, runs=found)


@router.get("/{message_id}", response_model=RunRecord)
async def get_run(
    runs: Runs, thread_id: str = ThreadIdPath, message_id: str = MessageIdPath
) -> RunRecord:
    """A queued run: its status and, once finished, its turn."""
    key = thread_key(thread_id)
    try:
        record = await runs.queue.get(key, message_id)
    except StoreUnavailable as exc:
        raise http_error(exc) from None
    if record is None:
        raise HTTPException(404, f"thread {thread_id!r} has no run {message_id!r}")
    return record


@router.post(
    "/{message_id}/cancel",
    response_model=RunRecord,
    responses={409: {"description": "The run started or finished: it cannot be cancelled"}},
)
async def cancel_run(
    runs: Runs, thread_id: str = ThreadIdPath, message_id: str = MessageIdPath
) -> RunRecord:
    """Take a run that has not started off the queue; it never runs (nor replies)."""
    key = thread_key(thread_id)
    try:
        record, cancelled = await runs.queue.cancel(key, message_id)
    except StoreUnavailable as exc:
        raise http_error(exc) from None
    if record is None:
        raise HTTPException(404, f"thread {thread_id!r} has no run {message_id!r}")
    if cancelled:
        record_run(runs.app, status="cancelled")
    elif record.status != "cancelled":
        why = "is running" if record.status == "running" else f"has {record.status}"
        raise HTTPException(
            409,
            f"run {message_id!r} of thread {thread_id!r} {why}: only a queued run can be cancelled",
        )
    return record
