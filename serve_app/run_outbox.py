"""The run worker's outbox half: the replies of finished runs, sent through their channels,
and the outcomes POSTed to their webhooks.

``RunDispatcher`` runs an ``Outbox`` while it holds the queue's lease; each message sent is
first checked against the lease, so a worker that lost it sends nothing more.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from actors.run_records import OutboundReply
from actors.run_replies import RunReplies
from actors.run_streams import LeaseLost
from serve_app.channel_sender import split_text
from stickyray.errors import ChannelSendFailed
from stickyray.metrics import record_reply
from stickyray.webhooks import WEBHOOK_CHANNEL, receiver_of, webhook_body, webhook_id

__all__ = ["BATCH", "Lease", "Outbox", "SendReply", "SendWebhook", "Stopping"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Sends a reply's text to the channel address a run was submitted with; returns the id the
# channel gave the message when a later report of its delivery names it by that id (a
# WhatsApp wamid), else None; raises ChannelSendFailed when the channel does not take it.
SendReply = Callable[[dict[str, Any], str], Awaitable[str | None]]
# POSTs a finished run's outcome (the body) to its webhook URL under a webhook id; raises
# ChannelSendFailed when the receiver does not take it.
SendWebhook = Callable[[str, str, bytes], Awaitable[None]]

BATCH = 100  # entries per read
_MAX_REPLIES_IN_HAND = 1000  # replies read and not sent yet: reading waits beyond this


class Stopping(Exception):
    """The dispatcher was asked to stop."""


class Lease(Protocol):
    """The queue's lease, as the worker holding it lends it to its outbox."""

    @property
    def token(self) -> str:
        """This worker's lease token."""

    @property
    def closing(self) -> bool:
        """Deliveries are being stopped: none may start."""

    def lose(self) -> None:
        """Note that the lease was lost: the worker stops its deliveries."""

    async def retrying(self, call: Callable[..., Awaitable[T]], *args: Any, **kw: Any) -> T:
        """``call(*args, **kw)``, again with backoff while Redis is unavailable."""

    async def pause(self, seconds: float) -> None:
        """Sleep, unless asked to stop (``Stopping``)."""

    async def still_leased(self) -> None:
        """Raise LeaseLost unless the lease is still held, extending it if so."""


@dataclass
class _Receiver:
    """A webhook receiver's share of the posting slots, the webhooks using it now, and since
    when its calls have been failing (None: the last one was taken)."""

    slots: asyncio.Semaphore
    users: int = 0
    failing_since: float | None = None


class _Both:
    """A slot of ``first``, then one of ``second``: waiting for the first holds neither."""

    def __init__(self, first: asyncio.Semaphore, second: asyncio.Semaphore) -> None:
        self._first = first
        self._second = second

    async def __aenter__(self) -> None:
        await self._first.acquire()
        try:
            await self._second.acquire()
        except BaseException:
            self._first.release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._second.release()
        self._first.release()


class Outbox:
    """Sends the outbox's replies, each chat's in order and chats at once, and the webhooks'
    outbox's outcomes, each thread's in order; a plain class, tested through the dispatcher.

    Replies and webhooks have slots of their own (``max_in_flight`` each), so slow receivers
    never hold a chat's reply back; and each webhook receiver (origin) a quarter of them at
    most, so one that is down does not hold every other receiver's webhooks back while its
    calls time out.
    """

    def __init__(
        self,
        replies: RunReplies,
        lease: Lease,
        *,
        max_in_flight: int,
        app: str = "",
        send_reply: SendReply | None = None,
        send_webhook: SendWebhook | None = None,
        reply_give_up_after_s: float = 600.0,
        retry_cap_s: float = 30.0,
        idle_wait_ms: int = 1000,
    ) -> None:
        self._box = replies
        self._lease = lease
        self._app = app
        self._send_reply = send_reply
        self._send_webhook = send_webhook
        self._reply_give_up_after_s = reply_give_up_after_s
        self._retry_cap_s = retry_cap_s
        self._idle_wait_ms = idle_wait_ms
        self._sending = asyncio.Semaphore(max_in_flight)
        self._posting = asyncio.Semaphore(max_in_flight)
        self._per_receiver = max(1, max_in_flight // 4)
        # By receiver_of(url); kept while in use or failing, so that its later webhooks share
        # the give-up time of the first failure.
        self._receivers: dict[str, _Receiver] = {}
        # The last reply of each chat (the address it goes to) in hand: the next one waits
        # for it; those in hand by outbox (True: the webhooks'), each read up to its own cap.
        self._reply_tails: dict[str, asyncio.Task[None]] = {}
        self._replies: dict[bool, dict[asyncio.Task[None], str]] = {False: {}, True: {}}

    def sends(self, *, webhooks: bool) -> bool:
        """Whether this outbox has a sender for the replies (or, with ``webhooks``, for the
        webhooks): without one, that outbox is left for a worker that has."""
        return (self._send_webhook if webhooks else self._send_reply) is not None

    def in_hand(self) -> list[asyncio.Task[None]]:
        """The sends in hand, of both outboxes."""
        return [*self._replies[False], *self._replies[True]]

    async def drain(self, *, webhooks: bool) -> None:
        """Send the outbox's replies (or the webhooks' outbox's) as the dispatcher delivers runs:
        each chat's in order, chats at once, reading on while replies wait (a chat the
        platform rate-limits holds up only itself; webhooks, in their own outbox, none)."""
        in_hand = self._replies[webhooks]
        try:
            after: str | None = "0"
            while after is not None:  # the replies the previous reader left
                replies, after, _ = await self._lease.retrying(
                    self._box.read,
                    self._lease.token,
                    BATCH,
                    after=after,
                    webhooks=webhooks,
                )
                for reply in replies:
                    self._send_later(reply, in_hand)
            seen = await self._lease.retrying(self._box.last_read, webhooks=webhooks)
            while True:
                while len(in_hand) >= _MAX_REPLIES_IN_HAND:
                    await asyncio.wait(list(in_hand), return_when=asyncio.FIRST_COMPLETED)
                replies, last, delivered = await self._lease.retrying(
                    self._box.read, self._lease.token, BATCH, seen=seen, webhooks=webhooks
                )
                entries = set(in_hand.values()) if replies else set()
                for reply in replies:
                    if reply.entry not in entries:
                        self._send_later(reply, in_hand)
                seen = last or delivered
                if last is None:
                    await self._lease.retrying(
                        self._box.wait, seen, self._idle_wait_ms, webhooks=webhooks
                    )
        except LeaseLost:
            self._lease.lose()

    def _send_later(self, reply: OutboundReply, in_hand: dict[asyncio.Task[None], str]) -> None:
        if self._lease.closing:
            return  # it stays in the outbox, for whoever reads next
        chat = json.dumps(reply.to, sort_keys=True)
        before = self._reply_tails.get(chat)
        task = asyncio.get_running_loop().create_task(self._send(reply, before))
        self._reply_tails[chat] = task
        in_hand[task] = reply.entry
        task.add_done_callback(lambda done: self._sent(chat, done, in_hand))

    def _sent(
        self, chat: str, task: asyncio.Task[None], in_hand: dict[asyncio.Task[None], str]
    ) -> None:
        in_hand.pop(task, None)
        if self._reply_tails.get(chat) is task:
            del self._reply_tails[chat]

    async def _send(self, reply: OutboundReply, before: asyncio.Task[None] | None) -> None:
        if before is not None:
            await asyncio.wait([before])
        try:
            error = await self._send_pieces(reply)
            await self._lease.retrying(self._box.done, self._lease.token, reply, error=error)
            channel = str(reply.to.get("channel", "unknown"))
            record_reply(self._app, channel, "failed" if error is not None else "sent")
        except LeaseLost:
            self._lease.lose()  # the reply stays in the outbox, for the worker with the lease
        except Stopping:
            pass  # the reply stays in the outbox, for the next worker
        except Exception:  # a bug: the reply stays, for the next worker to take over
            log.exception(
                "reply to %s of %s failed in the run worker", reply.message_id, reply.thread
            )

    async def _send_pieces(self, reply: OutboundReply) -> str | None:
        """Send the pieces of ``reply`` not sent yet, in order; None once all are sent, else
        why the rest could not be. Each piece sent is recorded in Redis, so a worker that
        takes over does not send it again. A webhook gets one piece: the run's record."""
        deadline: list[float] = []  # the reply's give-up time, from its first failure
        if reply.to.get("channel") == WEBHOOK_CHANNEL:
            return await self._send_outcome(reply, deadline)
        send_reply = self._send_reply
        if send_reply is None:
            return "no channel sender in this worker"
        pieces = split_text(reply.text)
        sent = await self._lease.retrying(self._box.pieces_sent, reply)
        named: list[str] = []  # the channel's id for the piece just sent, if it gave one

        async def send_piece(text: str) -> None:
            platform_id = await send_reply(reply.to, text)
            if platform_id:
                named.append(platform_id)

        for number in range(sent, len(pieces)):
            error = await self._send_until_done(
                reply, functools.partial(send_piece, pieces[number]), deadline, self._sending
            )
            if error is not None:
                if number > 0:
                    error += f" ({number} of {len(pieces)} pieces were sent)"
                return error
            while named:  # so that the channel's later report of a failure finds the run
                await self._lease.retrying(self._box.sent_as, reply, named.pop())
            if number + 1 < len(pieces):
                await self._lease.retrying(
                    self._box.piece_sent, self._lease.token, reply, number + 1
                )
        return None

    async def _send_outcome(self, reply: OutboundReply, deadline: list[float]) -> str | None:
        """POST the record of ``reply``'s finished run to its webhook; as ``_send_pieces``."""
        send_webhook = self._send_webhook
        if send_webhook is None:
            return "no webhook sender in this worker"
        record = await self._lease.retrying(self._box.record_of, reply)
        if record is None:
            log.warning(
                "webhook of %s of %s dropped: its record expired", reply.message_id, reply.thread
            )
            return "the run's record expired before its webhook took it"
        url, body = str(reply.to.get("url")), webhook_body(record)
        message_id = webhook_id(reply.record, reply.entry)
        origin = receiver_of(url)
        receiver = self._receivers.get(origin)
        if receiver is None:
            receiver = self._receivers[origin] = _Receiver(asyncio.Semaphore(self._per_receiver))
        if receiver.failing_since is not None and not deadline:
            # Failing since before this webhook: it gives up when the first one did, or a
            # thread's webhooks to a receiver that is down would each wait the whole time.
            deadline.append(receiver.failing_since + self._reply_give_up_after_s)

        async def post() -> None:
            try:
                await send_webhook(url, message_id, body)
            except ChannelSendFailed as exc:
                if not exc.permanent and receiver.failing_since is None:
                    receiver.failing_since = time.monotonic()
                raise
            receiver.failing_since = None

        receiver.users += 1
        try:
            return await self._send_until_done(
                reply,
                post,
                deadline,
                _Both(receiver.slots, self._posting),
                last_try_at_deadline=True,
            )
        finally:
            receiver.users -= 1
            if not receiver.users and receiver.failing_since is None:
                self._receivers.pop(origin, None)

    async def _send_until_done(
        self,
        reply: OutboundReply,
        send: Callable[[], Awaitable[None]],
        deadline: list[float],
        slots: asyncio.Semaphore | _Both,
        *,
        last_try_at_deadline: bool = False,
    ) -> str | None:
        """``send()`` a piece of ``reply`` while holding one of ``slots``; None once sent,
        else why it could not be.

        The last try is at the deadline. Told to wait past it (a Retry-After), it gives up
        at once, unless ``last_try_at_deadline`` (webhooks): a channel's wait is not cut
        short, since sending early during Telegram's flood control prolongs it.

        ``deadline`` holds the reply's give-up time once a piece has failed (shared by its
        pieces). Raises LeaseLost (sending nothing) once this worker no longer holds the
        lease: the reply is then the next worker's to send.
        """
        delay = 0.5
        while True:
            try:
                async with slots:
                    await self._lease.still_leased()
                    await send()
                return None
            except ChannelSendFailed as exc:
                if exc.permanent:
                    log.warning(
                        "reply to %s of %s not sent: %s", reply.message_id, reply.thread, exc
                    )
                    return str(exc)
                reason, asked = str(exc), exc.retry_after
                wait = max(delay, asked or 0.0)
            except (LeaseLost, Stopping):
                raise
            except Exception as exc:  # a bug in a channel, not an outage
                log.exception("reply to %s of %s failed", reply.message_id, reply.thread)
                return f"{type(exc).__name__}: {exc}"
            now = time.monotonic()
            if not deadline:
                deadline.append(now + self._reply_give_up_after_s)
            told_to_wait_past = asked is not None and now + asked > deadline[0]
            if now >= deadline[0] or (told_to_wait_past and not last_try_at_deadline):
                log.warning(
                    "reply to %s of %s: giving up after %.0f s: %s",
                    reply.message_id,
                    reply.thread,
                    self._reply_give_up_after_s,
                    reason,
                )
                return f"gave up after {self._reply_give_up_after_s:g} s; last: {reason}"
            wait = min(wait, deadline[0] - now)  # the last try is at the deadline
            log.info("reply to %s: %s; sending again in %.2f s", reply.message_id, reason, wait)
            await self._lease.pause(wait)
            delay = min(delay * 2, self._retry_cap_s)
