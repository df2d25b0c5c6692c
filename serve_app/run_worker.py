"""The run worker: the Serve deployment that drains the app's run queue.

One replica per app (``RunWorker``), so Serve starts it with the app and its config,
restarts it if it fails, replaces it on a deploy and stops it when the app is deleted. What
it does with the queue is ``serve_app.runs.RunDispatcher``'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from actors.directory import ThreadDirectory, pool_scope
from actors.redis_store import connect_redis
from actors.run_queue import RunQueue
from serve_app.channel_sender import ChannelSender
from serve_app.runs import RunDispatcher, cancel_until_done
from serve_app.webhooks import WebhookSender
from stickyray.config import TeamConfig
from stickyray.settings import Settings

__all__ = ["RUN_WORKER_DEPLOYMENT", "RunWorker"]

RUN_WORKER_DEPLOYMENT = "RunWorker"


class RunWorker:
    """The Serve deployment that runs the app's ``RunDispatcher``; it takes no requests."""

    async def __init__(  # type: ignore[misc]
        self, team: TeamConfig, settings: Settings, agent_handles: dict[str, Any], app: str
    ) -> None:
        assert settings.redis_url, "the CLI resolves the Redis URL before deploying"
        self._closed = False
        self._directory = ThreadDirectory(
            team, settings.redis_url, agent_handles, scope=pool_scope(app, team), app=app
        )
        self._redis = connect_redis(settings.redis_url)
        self._sender = ChannelSender(settings)
        secret = settings.webhook_secret
        self._webhooks = WebhookSender(
            secret.get_secret_value() if secret is not None else None, team.runs.webhook_urls
        )
        self._dispatcher = RunDispatcher(
            RunQueue(self._redis, app, team.runs),
            self._directory.send,
            max_in_flight=team.runs.max_in_flight,
            app=app,
            give_up_after_s=team.runs.give_up_after_s,
            send_reply=self._sender.send,
            send_webhook=self._webhooks.send,
            reply_give_up_after_s=team.runs.reply_give_up_after_s,
        )
        self._task = asyncio.get_running_loop().create_task(self._dispatcher.run())

    async def check_health(self) -> None:
        """Serve restarts a replica whose dispatcher stopped (a bug: outages are retried)."""
        if self._task.done():
            error = None if self._task.cancelled() else self._task.exception()
            raise RuntimeError(f"the run dispatcher stopped: {error!r}")

    def __del__(self) -> Coroutine[Any, Any, None] | None:
        """Stop delivering (the runs in hand stay queued) and give the lease up; once.

        Serve awaits what this returns when it stops the replica.
        """
        if getattr(self, "_closed", True):
            return None
        self._closed = True
        return self._close()

    async def _close(self) -> None:
        self._dispatcher.stop()
        await asyncio.wait([self._task], timeout=10)
        await cancel_until_done([self._task])  # if it did not stop in time
        await self._redis.aclose()
        await self._sender.aclose()
        await self._webhooks.aclose()
