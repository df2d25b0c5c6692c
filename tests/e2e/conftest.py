"""End-to-end fixtures: one local Ray cluster with Serve for the session, apps per module."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from memory.postgres import PostgresMemoryStore
from stickyray.config import TeamConfig, parse_config
from stickyray.settings import Settings
from tests.conftest import free_port

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.util.state import list_actors  # noqa: E402

from actors.directory import NAMESPACE  # noqa: E402
from actors.key import ThreadKey  # noqa: E402
from actors.thread_actor import ThreadActor  # noqa: E402
from serve_app.app import build_app  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A local Ray cluster for the session; yields its dashboard (Jobs API) address."""
    # A job's `python` is this interpreter, as on a cluster whose environment has stickyray
    # (cluster.yaml starts Ray from its virtualenv), even when pytest runs unactivated.
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
    # Worker logs stay in Ray's log files (and the dashboard) instead of flooding test output.
    context = ray.init(
        address="local", namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False
    )
    yield f"http://{context.dashboard_url}"
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_url(ray_cluster: str) -> Iterator[str]:
    """Serve's HTTP proxy on a free port of the session's cluster."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def kill_thread_actors() -> int:
    """Kill every thread actor and thread host (they are detached, so nothing else would)."""
    killed = 0
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == NAMESPACE and entry["name"].startswith(("thread/", "threadhost/")):
            try:
                ray.kill(ray.get_actor(entry["name"], namespace=NAMESPACE))
                killed += 1
            except ValueError:
                pass
    return killed


def sigkill_actor(name: str) -> bool:
    """SIGKILL the worker process of the one live actor ``name``; False unless exactly one."""
    found = list_actors(filters=[("name", "=", name), ("state", "=", "ALIVE")], detail=True)
    if len(found) != 1 or found[0].pid is None:
        return False
    os.kill(found[0].pid, signal.SIGKILL)
    return True


def start_usurper(thread_id: str, team: TeamConfig, redis_url: str) -> Any:
    """A second, unnamed incarnation of a thread, as a zombie or a split brain would make.

    Typed Any: ray's stubs do not see ThreadActor's methods as remote methods.
    """
    return (
        ray.remote(ThreadActor)
        .options(name=f"usurper-{uuid.uuid4().hex[:6]}", namespace=NAMESPACE, num_cpus=0)
        .remote(ThreadKey.of(thread_id), team, redis_url, {}, "usurper")
    )


def live_thread_actors(thread_id: str | None = None) -> list[str]:
    """Names of live thread actors (for one thread id when given)."""
    names = [
        e["name"]
        for e in ray.util.list_named_actors(all_namespaces=True)
        if e["namespace"] == NAMESPACE and e["name"].startswith("thread/")
    ]
    if thread_id is not None:
        names = [n for n in names if n.rsplit("/", 1)[-1] == thread_id]
    return names


def thread_hosts(app_name: str) -> list[str]:
    """Names of the live thread hosts of one app (pooled hosting)."""
    return sorted(
        e["name"]
        for e in ray.util.list_named_actors(all_namespaces=True)
        if e["namespace"] == NAMESPACE and e["name"].startswith(f"threadhost/{app_name}/")
    )


@dataclass
class App:
    """A deployed stickyray app and an HTTP client for it."""

    name: str
    url: str
    team: TeamConfig

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def async_client(self, timeout: float = 60.0) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=timeout)


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def deploy(serve_url: str, settings: Settings) -> Iterator[Callable[[dict], App]]:
    """Deploy apps from config dicts; they and their thread actors go at module end."""
    names: list[str] = []

    def _deploy(config: dict, name: str | None = None) -> App:
        team = parse_config(config, source=__import__("pathlib").Path("<test>"))
        if team.uses_memory:
            asyncio.run(_migrate(settings.database_url, team.memory.embedding_dimension))
        name = name or app_name()
        serve.run(build_app(team, settings, app_name=name), name=name, route_prefix=f"/{name}")
        names.append(name)
        return App(name=name, url=f"{serve_url}/{name}", team=team)

    yield _deploy
    for name in names:
        serve.delete(name)
    kill_thread_actors()


async def _migrate(url: str | None, dimension: int) -> None:
    """What ``stickyray serve`` does before deploying: the memory store's migrations."""
    assert url is not None
    async with PostgresMemoryStore.from_url(url, dimension=dimension) as store:
        await store.setup()


def app_name() -> str:
    """A Serve application name no other test uses."""
    return f"t{uuid.uuid4().hex[:8]}"


def new_thread() -> str:
    """A thread id no other test uses."""
    return f"th-{uuid.uuid4().hex[:12]}"
