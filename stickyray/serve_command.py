"""``stickyray serve``: the embedded servers when their URLs are unset, a local Ray cluster
when ``RAY_ADDRESS`` is, the app deployed, and serving until Ctrl-C or SIGTERM (or until an
embedded server stops), then a clean shutdown."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from stickyray.config_files import in_file
from stickyray.errors import ConfigError

__all__ = ["StopRequests", "http_mismatch", "run_serve"]

log = logging.getLogger("stickyray")


def run_serve(args: argparse.Namespace) -> int:
    """`stickyray serve`: start what is missing, deploy the app, and serve until stopped."""
    from providers.factory import check_providers
    from serve_app.tools import check_tools
    from stickyray.config_files import load_team
    from stickyray.settings import check_ray_address, load_settings, masked
    from stickyray.webhooks import check_webhooks

    # Everything that can be wrong in the user's files is checked before Ray starts.
    try:
        settings = load_settings()
        check_ray_address(settings.ray_address)
        _reach_ray(settings.ray_address)
        path, team = load_team(args.config, settings.config)
    except ConfigError as exc:
        print(f"stickyray: {exc}", file=sys.stderr)
        return 2
    try:
        check_providers(team, settings)
        check_tools(team)
        check_webhooks(team, settings)
    except ConfigError as exc:
        print(f"stickyray: {in_file(exc, path)}", file=sys.stderr)
        return 2
    host = args.host if args.host is not None else settings.host
    port = args.port or settings.port
    if not settings.ray_address:
        # A new local cluster's Serve could not listen there, yet the app would deploy, and
        # the requests sent to the address printed would reach whatever holds it.
        taken = _port_taken(host, port)
        if taken is not None:
            print(f"stickyray: {taken}", file=sys.stderr)
            return 2

    import ray
    from ray import serve

    from serve_app.app import APP_NAME, build_app
    from stickyray.embedded_redis import EmbeddedRedis
    from stickyray.metrics import metrics_url

    embedded: EmbeddedRedis | None = None
    postgres: Any = None
    redis_url = settings.redis_url
    what = "embedded Redis"
    # From here on, Ctrl-C and SIGTERM go through StopRequests: the first one during
    # start-up stops the app once it is up, a second aborts, stopping what started.
    stop = StopRequests()
    deploying = False
    code = 0
    stop.catch_signals()
    try:
        if redis_url is None:
            embedded = EmbeddedRedis(settings.data_dir / "redis", settings.redis_appendfsync)
            redis_url = embedded.start()
            print(f"stickyray: embedded Redis with data in {settings.data_dir / 'redis'}")
        settings = settings.model_copy(update={"redis_url": redis_url})
        if team.uses_memory:
            what = "long-term memory (DATABASE_URL or the embedded Postgres)"
            settings, postgres = _start_memory(team, settings)
    except BaseException as exc:
        # Ray has not started: say what could not start and why, and leave nothing running.
        stop.settled()
        if embedded is not None:
            embedded.stop()
        if isinstance(exc, KeyboardInterrupt):
            print("stickyray: start-up aborted; stopped what started", file=sys.stderr)
            return 130
        if not isinstance(exc, Exception):
            raise
        if stop.requested:
            # A terminal's Ctrl-C reaches the whole process group: it also killed the
            # server's own start-up commands (initdb, pg_ctl), which is why this step failed.
            log.debug("start of %s failed after a stop request: %s", what, exc)
            print("stickyray: start-up interrupted; stopped what started", file=sys.stderr)
            return 130
        print(f"stickyray: cannot start {what}: {exc}", file=sys.stderr)
        return 2

    try:
        try:
            # RAY_ADDRESS unset: a new local cluster, never a stranger's found by accident.
            ray.init(
                address=settings.ray_address or "local",
                namespace="stickyray",
                logging_level=logging.WARNING,
            )
            # ray.init puts in its own SIGTERM handler (sys.exit(15)), which would skip the
            # clean shutdown below: SIGTERM must stop the app as Ctrl-C does.
            stop.catch_signals()
        except ConnectionError as exc:  # RAY_ADDRESS names a cluster that is not there
            address = settings.ray_address
            reason = str(exc)
            if address:  # Ray's reason may quote the address, password and all
                reason = reason.replace(address, masked(address))
            print(
                f"stickyray: cannot join the Ray cluster at RAY_ADDRESS={masked(address)}: "
                f"{reason}",
                file=sys.stderr,
                flush=True,
            )
            return 2
        if settings.ray_address:
            unreachable = _embedded_beyond_this_node(embedded, postgres)
            if unreachable is not None:
                print(f"stickyray: {unreachable}", file=sys.stderr, flush=True)
                return 2
        serve.start(http_options={"host": host, "port": port})
        # Serve already running on the cluster keeps its own host and port (Ray only logs
        # that the new ones are ignored): the app would not be where we say it is.
        conflict = http_mismatch(host, port, *_serve_http())
        if conflict is not None:
            print(f"stickyray: {conflict}", file=sys.stderr, flush=True)
            return 2
        deploying = True
        serve.run(build_app(team, settings), name=APP_NAME, route_prefix="/")
        stop.settled()
        print(
            f"stickyray: serving {path} at http://{host}:{port} (docs at /docs); Ctrl-C to stop",
            flush=True,
        )
        for channel, on in (
            ("telegram", settings.telegram_bot_token is not None),
            ("whatsapp", settings.whatsapp_access_token is not None),
        ):
            if on:
                webhook = f"http://{host}:{port}/v1/channels/{channel}/webhook"
                print(f"stickyray: {channel} webhook at {webhook}", flush=True)
                if settings.api_key is None:
                    print(
                        f"stickyray: warning: {channel} is on and STICKYRAY_API_KEY is not set: "
                        "whoever reaches the API can read and reset the chats",
                        file=sys.stderr,
                        flush=True,
                    )
        metrics = metrics_url()
        if metrics is not None:
            print(f"stickyray: Prometheus metrics (ray_stickyray_*) at {metrics}", flush=True)
        failure = stop.wait(lambda: _dead_server(embedded, postgres), _SERVER_CHECK_S)
        if failure is None:
            print("stickyray: shutting down", flush=True)
        else:  # exit non-zero, so a supervisor starts serve (and the server) again
            print(f"stickyray: {failure}; shutting down", file=sys.stderr, flush=True)
            code = 1
    except KeyboardInterrupt:
        print("stickyray: start-up aborted; stopping what started", file=sys.stderr, flush=True)
        return 130
    except RuntimeError as exc:  # serve.run: a deployment that failed to start
        print(f"stickyray: the app could not start: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        stop.settled()  # a Ctrl-C during the clean-up must not cut it short
        if ray.is_initialized():
            if settings.ray_address:
                if deploying:  # else the app of that name is another run's, left alone
                    serve.delete(APP_NAME)
            else:
                serve.shutdown()
            ray.shutdown()
        if embedded is not None:
            embedded.stop()
        if postgres is not None:
            postgres.stop()
    return code


def _port_taken(host: str, port: int, grace_s: float = 5.0) -> str | None:
    """What is wrong when ``host``:``port`` cannot be listened on (another serve, say).

    A serve that just stopped may leave its proxy's socket a moment longer (its processes
    exit after it): a port held for ``grace_s`` is taken."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            with socket.create_server((host, port), family=family):
                return None
        except socket.gaierror as exc:  # a host name that does not resolve
            reason = str(exc.strerror or exc)
        except OSError as exc:
            reason = str(exc.strerror or exc)
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
        return (
            f"cannot listen at http://{host}:{port}: {reason} (another stickyray serve?); "
            "stop what holds it, or serve elsewhere with --port or STICKYRAY_PORT"
        )


def _embedded_beyond_this_node(embedded: Any, postgres: Any) -> str | None:
    """What is wrong when the cluster joined has other nodes and an embedded server runs:
    it listens on this machine only (a unix socket), so the thread actors and agents Ray
    places on the others could not reach it."""
    import ray

    unset = [name for name, on in (("REDIS_URL", embedded), ("DATABASE_URL", postgres)) if on]
    if not unset:
        return None
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if nodes <= 1:
        return None
    names = " and ".join(unset)
    return (
        f"the Ray cluster at RAY_ADDRESS has {nodes} nodes, but {names} "
        f"{'is' if len(unset) == 1 else 'are'} unset: the embedded servers listen on this "
        f"machine only, where the other nodes' thread actors and agents cannot reach them; set "
        f"{names} to servers every node reaches"
    )


def _reach_ray(address: str | None) -> None:
    """ConfigError unless something listens at a HOST:PORT ``RAY_ADDRESS``: ray.init would
    retry for about 14 minutes before saying no cluster is there."""
    from stickyray.settings import masked

    if not address or address in ("auto", "local") or address.startswith("ray://"):
        return  # those fail fast in ray.init, or time out in Ray Client's own time
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
            pass
    except OSError as exc:
        raise ConfigError(
            f"cannot join the Ray cluster at RAY_ADDRESS={masked(address)}: nothing answers "
            f"there ({exc.strerror or exc}): start its head (`ray start --head`) or unset "
            "RAY_ADDRESS for a local cluster"
        ) from None


def _serve_http() -> tuple[str | None, int]:
    """The host and port the Serve instance this process is connected to listens on."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()  # raises, rather than None, when no Serve runs
    if client is None:
        raise RuntimeError("Ray Serve is not running")
    config = client.http_config
    return config.host, config.port


def http_mismatch(host: str, port: int, running_host: str | None, running_port: int) -> str | None:
    """What stops serving at ``host``:``port`` when Serve on the cluster listens at
    ``running_host``:``running_port`` (host None: HTTP off); None if nothing does."""
    if (running_host, running_port) == (host, port):
        return None
    fix = "shut Serve down on the cluster (`serve shutdown`, which deletes every app on it)"
    if running_host is None:
        return f"Serve is already running on this cluster with HTTP off: {fix} and start again"
    return (
        f"Serve is already running on this cluster at http://{running_host}:{running_port} and "
        f"keeps that host and port, so it cannot serve at http://{host}:{port}: serve there "
        f"(--host {running_host} --port {running_port}), or {fix} and start again"
    )


# How often the serve loop checks that the embedded servers still run.
_SERVER_CHECK_S = 5.0
# The longest a stop request waits to be noticed while serving.
_TICK_S = 0.1


class StopRequests:
    """Ctrl-C and SIGTERM while serving, and during start-up.

    Once up, a request stops the server. During start-up the first request waits for the
    app to be up, so the shutdown runs against a settled deployment; a second one aborts
    the start-up at once (a deployment that never becomes healthy would otherwise hold the
    command until it is killed, leaving its servers behind).

    ``request`` runs in a signal handler, between two bytecodes of whatever the main thread
    was doing: it takes no lock (the main thread may hold it, as ``Event.wait`` holds its
    Condition's, and would then never get it back). It sets plain flags, and ``wait`` polls.
    """

    def __init__(self) -> None:
        self._requested = False
        self._up = False

    @property
    def requested(self) -> bool:
        """Whether a stop was requested."""
        return self._requested

    def catch_signals(self) -> None:
        """Route SIGINT and SIGTERM here (again after anything that replaced the handlers)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.request())

    def request(self) -> None:
        """Called from the signal handler."""
        if self._up:
            self._requested = True
        elif self._requested:
            raise KeyboardInterrupt
        else:
            self._requested = True
            # os.write, not print: sys.stderr's buffer has a lock the main thread may hold.
            try:
                os.write(2, b"stickyray: stopping once the app is up; Ctrl-C again to abort now\n")
            except OSError:
                pass  # no stderr: the stop is no less requested

    def settled(self) -> None:
        """The app is up, or being stopped: from now on a request aborts nothing."""
        self._up = True

    def wait(
        self, check: Callable[[], str | None] = lambda: None, every_s: float = _SERVER_CHECK_S
    ) -> str | None:
        """Until a stop is requested (None; at once if one came during start-up), or until
        ``check``, called every ``every_s``, names a reason to stop (that reason)."""
        next_check = time.monotonic() + every_s
        while not self._requested:
            # A signal's handler runs when this sleep is interrupted; the sleep then goes on
            # for what is left of its tick, so a stop is seen within one tick.
            time.sleep(_TICK_S)
            if time.monotonic() >= next_check:
                reason = check()
                if reason is not None:
                    return reason
                next_check = time.monotonic() + every_s
        return None


def _dead_server(embedded: Any, postgres: Any) -> str | None:
    """Which embedded server stopped while serving, if one did (every request needing it
    would fail until serve is started again)."""
    if embedded is not None and not embedded.running():
        return f"the embedded Redis (data in {embedded.data_dir}) stopped while serving"
    if postgres is not None and not postgres.running():
        return f"the embedded Postgres (data in {postgres.data_dir}) stopped while serving"
    return None


def _start_memory(team: Any, settings: Any) -> tuple[Any, Any]:
    """Start the embedded Postgres when DATABASE_URL is unset, and run the migrations."""
    from memory.embedded_postgres import prepare_database

    data_dir = settings.data_dir / "postgres"
    url, postgres = prepare_database(
        settings.database_url, data_dir, team.memory.embedding_dimension, team.memory.embedder_id
    )
    if postgres is not None:
        print(f"stickyray: embedded Postgres with data in {data_dir}")
    return settings.model_copy(update={"database_url": url}), postgres
