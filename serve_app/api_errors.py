"""How the HTTP API answers errors: always JSON with the message in ``error``, an outage
(Redis, Ray, a model provider) as a 503 to retry, a wrong path or method with what to fix."""

import logging
import re
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.directory import root_cause
from actors.key import ID_PATTERN, ID_RULE
from stickyray.errors import (
    CheckpointConflict,
    MessageIdReused,
    ProviderError,
    RunQueueFull,
    StickyrayError,
    StoreUnavailable,
    ThreadFenced,
    ThreadPassivated,
    TurnPending,
)

__all__ = ["http_error", "http_exception", "install_error_handlers", "route_path"]

log = logging.getLogger(__name__)


def install_error_handlers(api: FastAPI) -> None:
    """Answer every error of ``api`` in its JSON shape: the handlers of validation and HTTP
    errors, and the middleware for whatever else a route raises.

    Install before the guards (``install_guards``): the last middleware added is the
    outermost, and the guards answer their refusals with ``http_exception`` themselves.
    """
    api.exception_handler(RequestValidationError)(_validation_error)
    api.exception_handler(StarletteHTTPException)(http_exception)
    api.add_middleware(_ErrorsAsJson)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # Name each field plainly ("body.text: ...") as well as FastAPI's structured detail; the
    # first few only, so a body of many mistakes does not get an answer many times its size.
    errors = exc.errors()
    shown = errors[:_ERRORS_SHOWN]
    messages = [_said(err) for err in shown]
    if len(errors) > len(shown):
        messages.append(f"and {len(errors) - len(shown)} more")
    return JSONResponse(
        status_code=422,
        content={"error": "; ".join(messages), "detail": _jsonable(shown)},
    )


_ERRORS_SHOWN = 20


def _said(err: Any) -> str:
    """One validation error as "field: what is wrong"."""
    loc = tuple(err.get("loc", ()))
    if err.get("type") == "json_invalid":
        # FastAPI puts the character where parsing stopped in the field's place (body.8).
        at = f" at character {loc[1]}" if len(loc) > 1 else ""
        why = (err.get("ctx") or {}).get("error") or err.get("msg")
        return f"body: not valid JSON ({why}{at})"
    message = err.get("msg")
    too_long = err.get("type") == "string_too_long" and loc[-1:] in (("thread_id",), ("user_id",))
    if too_long or (err.get("ctx") or {}).get("pattern") == ID_PATTERN:
        message = ID_RULE  # every id says the same, whichever endpoint checked it
    return f"{'.'.join(str(p) for p in loc)}: {message}"


async def http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """The answer to an HTTP error: its message in ``error`` (and in ``detail``)."""
    # Every 4xx and 5xx carries its message in "error", as validation errors do; "detail" is
    # kept for clients that read FastAPI's default shape.
    if exc.status_code == 400 and exc.detail == _UNPARSED:
        # FastAPI's answer to a body no JSON parser reads (invalid UTF-8, a number or a
        # nesting too large): a 422 naming the body, as for any other malformed JSON.
        cause = exc.__cause__
        why = f" ({type(cause).__name__})" if cause is not None else ""
        exc = StarletteHTTPException(422, f"body: not valid JSON{why}")
    elif exc.status_code == 405 and exc.detail == _NO_METHOD:
        # Starlette names the methods of the first route on the path; the path can have more.
        allowed = ", ".join(_allowed(request, exc))
        path = route_path(request.scope)
        exc = StarletteHTTPException(
            405,
            f"{request.method} {path}: method not allowed here (allowed: {allowed}); see /docs",
            {"Allow": allowed},
        )
    elif exc.status_code == 404 and exc.detail == _NO_ROUTE:
        exc = StarletteHTTPException(404, _unrouted(request), exc.headers)
    return JSONResponse(
        status_code=exc.status_code,
        content={"error": exc.detail, "detail": exc.detail},
        headers=exc.headers,
    )


_UNPARSED = "There was an error parsing the body"
# Starlette's answers when no route matches a path, or none takes its method.
_NO_ROUTE, _NO_METHOD = "Not Found", "Method Not Allowed"


def _allowed(request: Request, exc: StarletteHTTPException) -> list[str]:
    """Every method some endpoint takes on the request's path.

    Starlette's 405 names the methods of the first route on the path only; the API's schema
    lists every endpoint's.
    """
    methods = {m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()}
    path = route_path(request.scope)
    for template, operations in request.app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)), path):
            methods |= {m.upper() for m in operations}
    if "GET" in methods:
        methods.add("HEAD")  # Starlette answers HEAD wherever it answers GET
    return sorted(methods)


def _unrouted(request: Request) -> str:
    """What to fix in a request no route took."""
    path = route_path(request.scope)
    hint = ""
    if path.startswith(("/v1/threads/", "/v1/users/")):
        # A path segment ends at '/', escaped or not: "a%2Fb" is two segments.
        hint = " (a thread or user id has no '/', not even as %2F)"
    return f"{request.method} {path}: no such endpoint{hint}; see /docs"


class _ErrorsAsJson:
    """Answers whatever no route turned into an HTTP error in the API's shape, with outages
    (Redis, Ray, a model provider) as 503s to retry.

    A middleware rather than a handler for ``Exception``: Starlette re-raises after such a
    handler answers, so each error was logged twice and counted as a crashed request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, receive, send_tracked)
        except Exception as exc:
            if started:  # too late to answer: the client sees the connection end
                raise
            error = http_error(exc)  # logs what it cannot name, with its traceback
            where, named = f"{scope['method']} {scope['path']}", root_cause(exc)
            if error.status_code == 500 and isinstance(named, StickyrayError):
                log.error("%s: %s", where, error.detail, exc_info=exc)
            elif isinstance(named, StickyrayError | RayError):  # an outage, a conflict
                log.warning("%s: %s", where, error.detail)
            response = await http_exception(Request(scope), error)
            await response(scope, receive, send)


def route_path(scope: Scope) -> str:
    """The request's path as the router sees it: without the ``root_path`` Serve mounts the
    app under."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _jsonable(errors: Any) -> Any:
    out = []
    for err in errors:
        item = {k: v for k, v in err.items() if k in ("loc", "msg", "type")}
        out.append(item)
    return out


def http_error(exc: BaseException) -> HTTPException:
    """The HTTP error to answer a failure with; logs, with its traceback, one it cannot name."""
    cause = root_cause(exc)
    if isinstance(cause, RunQueueFull):
        return HTTPException(429, f"{cause}; retry later", headers={"Retry-After": "5"})
    if isinstance(cause, MessageIdReused):
        return HTTPException(422, f"body.message_id: {cause}")
    if isinstance(cause, StoreUnavailable):
        return HTTPException(503, f"{cause.store} is unavailable; the message was not processed")
    if isinstance(cause, CheckpointConflict):
        return HTTPException(409, f"{cause}; retry the message")
    if isinstance(cause, TurnPending):
        return HTTPException(503, f"{cause}: the thread is completing it; retry the message")
    if isinstance(cause, ThreadFenced | ThreadPassivated):
        # The thread moved while the directory kept redelivering: transient, like a restart.
        return HTTPException(503, f"the thread is moving: {cause}; retry the message")
    if isinstance(cause, ProviderError):
        return HTTPException(503, f"a model provider is unavailable: {cause}")
    if isinstance(cause, StickyrayError):
        return HTTPException(500, str(cause))
    if isinstance(cause, RayError):
        return HTTPException(503, f"the thread is temporarily unavailable: {type(cause).__name__}")
    log.exception("unexpected error in a turn", exc_info=cause)
    return HTTPException(500, f"internal error: {type(cause).__name__}")
