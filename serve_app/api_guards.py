"""What the HTTP API checks before a route runs: the query parameters an endpoint takes, the
body's size, the API key, and HEAD answered as GET."""

import hmac

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.api_errors import http_exception, route_path
from serve_app.channels import CHANNELS_PREFIX

__all__ = ["install_guards", "known_query"]


def install_guards(api: FastAPI) -> None:
    """Add the middlewares that refuse a request before its route runs: the body's cap
    (``state.max_body_bytes``), the API key (``state.api_key``), and HEAD as GET.

    Install after the error handlers (``install_error_handlers``): the last middleware added
    is the outermost. ``known_query`` is not installed here: it is a dependency the app is
    built with, so that every route, the included routers' too, has it.
    """
    # Added after the error middleware and before the key check, so a request without the
    # key is refused before its body is read.
    api.add_middleware(_BodyCap)
    api.add_middleware(_ApiKey)
    api.add_middleware(_HeadAsGet)


async def known_query(request: Request) -> None:
    """Refuse a query parameter the endpoint does not take, or one given twice, as a body's
    unknown field is refused: a misspelt ``limt=1`` must not quietly return every run.

    What an endpoint takes is what its schema (``/docs``) lists. The channels' webhooks are
    left alone: their platforms add parameters as they see fit.
    """
    route = request.scope.get("route")
    path = str(getattr(route, "path", ""))
    if not path or path.startswith(CHANNELS_PREFIX) or not request.query_params:
        return
    operation = request.app.openapi()["paths"].get(path, {}).get(request.method.lower(), {})
    taken = {
        p["name"]: p.get("schema", {}).get("type") == "array"
        for p in operation.get("parameters", [])
        if p.get("in") == "query"
    }
    errors = []
    for name in dict.fromkeys(request.query_params.keys()):
        values = request.query_params.getlist(name)
        if name not in taken:
            known = ", ".join(sorted(taken)) or "none"
            errors.append(
                {
                    "type": "extra_forbidden",
                    "loc": ("query", name),
                    "msg": f"unknown parameter (this endpoint takes: {known})",
                    "input": values[0],
                }
            )
        elif len(values) > 1 and not taken[name]:
            errors.append(
                {
                    "type": "too_long",
                    "loc": ("query", name),
                    "msg": f"given {len(values)} times; it takes one value",
                    "input": values,
                }
            )
    if errors:
        raise RequestValidationError(errors)


class _BodyCap:
    """A body over the app's cap (``state.max_body_bytes``) gets 413 before the route reads
    it whole: by its Content-Length, or as soon as the stream passes the cap. The channels'
    webhooks cap their own bodies."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope.get("app")
        cap: int | None = getattr(app.state, "max_body_bytes", None) if app is not None else None
        if scope["type"] != "http" or cap is None or route_path(scope).startswith("/v1/channels/"):
            await self._app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        chunks: list[bytes] = []
        received = 0
        over = declared.isdigit() and int(declared) > cap
        while not over:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            over = received > cap
            if not message.get("more_body", False):
                break
        if over:
            refused = HTTPException(413, f"body: over the limit of {cap} bytes")
            response = await http_exception(Request(scope), refused)
            await response(scope, receive, send)
            return
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self._app(scope, replay, send)


class _ApiKey:
    """With ``STICKYRAY_API_KEY`` set, every /v1 route but the channels' webhooks (which
    authenticate the platform's call themselves) needs ``Authorization: Bearer <key>``;
    health checks and the docs stay open.

    A middleware, so that a request without the key is refused before its body is read.
    It sees the path as the router does (without the ``root_path`` Serve mounts it under).
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The app serving the request (as routes read request.app), which under Serve is
        # not necessarily this module's object.
        app = scope.get("app")
        key: str | None = getattr(app.state, "api_key", None) if app is not None else None
        if scope["type"] == "http" and key is not None:
            path = route_path(scope)
            if path.startswith("/v1/") and not path.startswith("/v1/channels/"):
                headers = dict(scope["headers"])
                scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
                # The scheme's case is free (RFC 9110); the key's is not.
                if scheme.lower() != b"bearer" or not hmac.compare_digest(token, key.encode()):
                    refused = HTTPException(
                        401,
                        "header Authorization: missing or wrong; send 'Bearer <STICKYRAY_API_KEY>'",
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                    response = await http_exception(Request(scope), refused)
                    await response(scope, receive, send)
                    return
        await self._app(scope, receive, send)


class _HeadAsGet:
    """HEAD answered as GET is, without the body (HTTP's rule; a load balancer's health
    check may use it): FastAPI's routes, unlike Starlette's, take only the methods they
    name. The outermost middleware, so a refusal to HEAD has no body either."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self._app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {**message, "body": b""}
            await send(message)

        await self._app({**scope, "method": "GET"}, receive, headers_only)
