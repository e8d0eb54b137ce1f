"""From raw entries to handler calls: routing, the worker pool, outcomes.

Entries wait in one deque; ``concurrency`` long-lived worker coroutines take
them one at a time. Nothing is spawned, acquired or scoped per message: a
worker's cancel scope lives across many messages and is replaced only when it
is used to cancel one handler (a message stopped while it runs).

The outcome of every message is decided here, in :meth:`Dispatcher._settle`
and :meth:`Dispatcher._failed`: acknowledge, retry (kept here until due, or
left pending for a claim), or move to the dead-letter stream.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio

from ._batch import Batch, Batcher
from ._codec import FIELD_KEY, FIELD_TYPE, decode_message, decode_type, is_init_entry
from ._config import RetryPolicy
from ._dead import DeadLetterWriter
from ._inflight import InFlight, Item
from ._message import ConsumerStats, Message
from ._retry import RetryTimer
from ._routes import Route, RouteTable
from .errors import BatchError, DecodeError, NoHandlerError, PayloadTooLargeError, Retry

__all__ = ["Counters", "Dispatcher", "Slot"]

logger = logging.getLogger("redcurrent.consumer")


class Counters:
    __slots__ = ("claimed", "dead_lettered", "failed", "handled", "received", "retried")

    def __init__(self) -> None:
        self.received = 0
        self.handled = 0
        self.failed = 0
        self.claimed = 0
        self.dead_lettered = 0
        self.retried = 0

    def snapshot(self, running: int, held: int) -> ConsumerStats:
        return ConsumerStats(
            received=self.received,
            handled=self.handled,
            failed=self.failed,
            claimed=self.claimed,
            retried=self.retried,
            dead_lettered=self.dead_lettered,
            running=running,
            held=held,
        )


class Slot:
    """A worker's cancel scope and the message it is running right now.

    ``in_handler`` is true only while the user's handler runs: a stop cancels
    a handler, never the acknowledgement or dead-lettering that follows it.
    """

    __slots__ = ("current", "in_handler", "scope", "stopped")

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.current: Any = None
        self.stopped = False
        self.in_handler = False


_OWN_CANCEL = (
    "the handler raised a cancellation that neither a stop nor its host asked for "
    "(did it await a task that was cancelled?)"
)


def _handler_failed(exc: BaseException) -> bool:
    """Whether an exception out of a handler is the handler's failure: any
    ``Exception``, and a cancellation nobody asked for. A stop, a shutdown or
    the host's cancellation, ``KeyboardInterrupt`` and ``SystemExit`` are not:
    they propagate and the message stays pending."""
    if isinstance(exc, Exception):
        return True
    return isinstance(exc, anyio.get_cancelled_exc_class()) and not _cancelled_from_outside()


def _cancelled_from_outside() -> bool:
    """Whether a cancellation seen in a worker was asked for by the consumer
    (a stop, a shutdown) or by whoever runs it, rather than raised by the
    handler on its own (say, by awaiting a task someone else cancelled)."""
    if anyio.current_effective_deadline() == -math.inf:
        return True  # an enclosing cancel scope was cancelled
    try:
        task = asyncio.current_task()
    except RuntimeError:  # not running on asyncio
        return False
    cancelling = getattr(task, "cancelling", None)  # Python >= 3.11
    return bool(cancelling is not None and cancelling())


class Fence:
    """Until when (monotonic) a partition's lease lets its runtime start
    messages; moved on by every renewal (see ``_partitioned``)."""

    __slots__ = ("until",)

    def __init__(self) -> None:
        self.until = math.inf


class Dispatcher:
    """The worker pool over one queue of held entries and full batches.

    What is held, lost, parked and how much room is left lives in
    :class:`InFlight`; the dispatcher routes entries into it and settles them.
    """

    def __init__(
        self,
        *,
        stream: str,
        router: RouteTable,
        inflight: InFlight,
        ack: Callable[[bytes], None],
        dead: DeadLetterWriter,
        counters: Counters,
        max_deliveries: int,
        batcher: Batcher | None,
        is_stopped: Callable[[str], bool],
        max_payload_bytes: int | None = None,
        retry: RetryPolicy | None = None,
        partition: int | None = None,
        fence: Fence | None = None,
    ) -> None:
        self.stream = stream
        #: the partition this dispatcher serves of a partitioned topic
        #: (``stream`` is then the topic's name); its messages' ids say it.
        self.partition = partition
        #: per message key, the turn of the newest message of that key taken
        #: by a worker (see ``_one``).
        self._key_turns: dict[bytes, anyio.Event] = {}
        #: a partition's runtime starts nothing past its lease (None: a plain topic).
        self.fence = fence
        self.router = router
        self.inflight = inflight
        self._ack = ack
        self._dead = dead
        self.counters = counters
        self.max_deliveries = max_deliveries
        self.batcher = batcher
        self.is_stopped = is_stopped
        #: entries heavier than this (field names and values, in bytes) are
        #: dead-lettered without being decoded; None: no limit.
        self.max_payload_bytes = max_payload_bytes
        #: when failed messages run again, for handlers without a policy of
        #: their own; None: left pending, retried after ``claim_idle``.
        self.retry = retry
        #: failed messages waiting here for their retry; ``run`` by the consumer.
        self.retries = RetryTimer(inflight)
        self.queue: deque[Item | Batch] = deque()
        self.closing = False
        #: the workers' slots, one per running worker.
        self.slots: list[Slot] = []
        self._work = anyio.Event()
        self._batch_types: dict[bytes, Route] = (
            {t.encode(): r for t, r in router.routes.items() if r.batch} if batcher else {}
        )

    # -- intake -----------------------------------------------------------
    def submit(
        self,
        entries: list[tuple[bytes, dict[bytes, bytes]]],
        counts: dict[bytes, int] | None = None,
    ) -> None:
        if self.closing:
            # A read or claim that was under way when the stop came: nothing
            # new starts now. The entries stay pending, and the stop's final
            # hand-back (all of this consumer's pending list) gives them away.
            # Taking them would start newer messages of a key whose older
            # ones were just handed back.
            return
        inflight = self.inflight
        held = inflight.held
        lost = inflight.lost
        queue = self.queue
        batched = bool(self._batch_types)
        fresh = 0
        for raw_id, fields in entries:
            if raw_id in held:
                continue  # already ours (a claim of an entry we still hold)
            held.add(raw_id)
            if lost and raw_id in lost:
                # Claimed back while its lost copy is still queued or running:
                # that copy serves this delivery; a second one would run twice.
                lost.discard(raw_id)
                fresh += 1
                continue
            fresh += 1
            item: Item = (raw_id, fields, counts.get(raw_id, 1) if counts else 1)
            if batched:
                self._route(item, wake=False)
            else:
                queue.append(item)
        self.counters.received += fresh
        self._work.set()

    def _route(self, item: Item, *, front: bool = False, wake: bool = True) -> None:
        """Queue one held item, or add it to its batch; stopped ones are parked."""
        batch_types = self._batch_types
        route = batch_types.get(item[1].get(FIELD_TYPE, b"")) if batch_types else None
        if route is None:
            if front:
                self.queue.appendleft(item)
            else:
                self.queue.append(item)
        elif self.is_stopped(item[0].decode()):
            self.inflight.set_aside(item)  # stopped messages never enter a batch
        else:
            assert self.batcher is not None
            full = self.batcher.add(route, item)
            if full is not None:
                self.enqueue_batch(full)
        if wake:
            self._work.set()

    def enqueue_batch(self, batch: Batch) -> None:
        self.queue.append(batch)
        self._work.set()

    def requeue(self, items: list[Item]) -> None:
        """Retries whose time came go back to the workers (or their batch)."""
        for item in items:
            self._route(item, wake=False)
        self.counters.received += len(items)
        self.counters.retried += len(items)
        self._work.set()

    def close(self) -> list[bytes]:
        """No more intake, and nothing new starts: running handlers finish
        (the runtime gives them ``shutdown_timeout``), then the workers exit.
        Queued messages and open batches are let go, still pending, for the
        hand-back: a peer (or this worker restarted) takes them at once
        rather than after this one worked through its whole prefetch.
        Returns the ids let go."""
        self.closing = True
        self.retries.close()
        let_go = [i for x in self.queue for i in ([x] if isinstance(x, tuple) else x.items)]
        self.queue.clear()
        if self.batcher is not None:
            let_go += [i for batch in self.batcher.flush_all() for i in batch.items]
        inflight = self.inflight
        released = []
        for raw_id, _, _ in let_go:
            if raw_id not in inflight.parked:
                inflight.release(raw_id)
                released.append(raw_id)
        self._work.set()
        return released

    def running(self) -> int:
        """Handler calls running now (for stats: read on demand, never counted
        on the hot path)."""
        return sum(1 for slot in self.slots if slot.in_handler)

    # -- control ------------------------------------------------------------
    def stop_running(self, entry_id: str) -> bool:
        """Cancel the handler running ``entry_id``, if any; it stays pending.

        Only a running handler is cancelled: once it has returned, its outcome
        (ack, retry or dead letter) is being recorded and must complete.
        """
        raw = entry_id.encode()
        for slot in self.slots:
            current = slot.current
            if current is None or not slot.in_handler:
                continue
            ids = [current[0]] if isinstance(current, tuple) else [i[0] for i in current.items]
            if raw in ids:
                slot.stopped = True
                slot.scope.cancel()
                return True
        return False

    def resume(self, entry_id: str) -> None:
        """A stopped message is resumed: it runs again, unless the consumer
        is stopping (then it stays held, to be handed back)."""
        item = self.inflight.resume(entry_id.encode(), requeue=not self.closing)
        if item is not None:
            self._route(item, front=True)

    # -- workers ------------------------------------------------------------
    async def worker(self) -> None:
        slot = Slot()
        self.slots.append(slot)
        try:
            while True:
                with slot.scope:
                    await self._work_loop(slot)
                    return
                # The scope was cancelled to stop the message in hand.
                current, slot.current = slot.current, None
                if current is not None and slot.stopped:
                    self._park(current)
                slot.scope = anyio.CancelScope()
                slot.stopped = False
        finally:
            self.slots.remove(slot)

    def _park(self, current: Item | Batch) -> None:
        """After cancelling a handler for a stop: keep the stopped message(s)
        aside; the other messages of a cancelled batch go round again."""
        inflight = self.inflight
        items = [current] if isinstance(current, tuple) else current.items
        for item in items:
            if item[0] not in inflight.held or item[0] in inflight.parked:
                inflight.lost.discard(item[0])  # lost while it ran: nothing else would clear it
                continue  # settled (acked, dead-lettered, lost) before the stop
            if self.is_stopped(item[0].decode()):
                logger.info(
                    "message %s stopped while running; kept pending",
                    item[0].decode(),
                    extra={"message_id": item[0].decode()},
                )
                inflight.set_aside(item)
            else:
                self._route(item, front=True)

    async def _work_loop(self, slot: Slot) -> None:
        queue, inflight = self.queue, self.inflight
        while True:
            fence = self.fence
            if fence is not None and fence.until < time.monotonic():
                # A partition whose membership could not be renewed: another
                # member may own it by now. Its runtime is being stopped.
                await anyio.sleep(0.05)
                continue
            if inflight.lease_until < time.monotonic():
                # Frozen or cut off past claim_idle: peers may own some of the
                # queue now. The next lease refresh marks those lost.
                await inflight.wait_for_lease()
                continue
            if not queue:
                if self.closing:
                    return  # drained: what was in memory when the stop came is done
                if self._work.is_set():
                    # Every waiter waits on the same event: replace it only once.
                    self._work = anyio.Event()
                    continue
                await self._work.wait()
                continue
            item = queue.popleft()
            slot.current = item
            if isinstance(item, tuple):
                await self._one(item, slot)
            else:
                await self._batch(item, slot)
            slot.current = None

    async def _one(self, item: Item, slot: Slot) -> None:
        msg, route, grave = self._screen(item, None)
        if msg is None or route is None:
            if grave is not None:
                await self._bury(item, *grave)
            return
        # A keyed message waits for the one of its key taken before it: the
        # messages of one key run one at a time, in the order the workers took
        # them off the queue (the stream's order), other keys in parallel. The
        # turn is taken with no await since leaving the queue, so turns follow
        # queue order.
        key = item[1].get(FIELD_KEY)
        turn: tuple[bytes, anyio.Event] | None = None
        before: anyio.Event | None = None
        if key is not None:
            before = self._key_turns.get(key)
            turn = key, anyio.Event()
            self._key_turns[key] = turn[1]
        try:
            if before is not None:
                await before.wait()
                # It may have been lost or stopped while it waited.
                msg, route, grave = self._screen(item, route)
                if msg is None or route is None:
                    if grave is not None:
                        await self._bury(item, *grave)
                    return
            slot.in_handler = True
            try:
                await route.fn(msg)
            except BaseException as exc:
                slot.in_handler = False
                if not _handler_failed(exc):
                    raise  # a stop, a shutdown or the host: the message stays pending
                await self._failed(item, exc, route)
            else:
                slot.in_handler = False
                self.counters.handled += 1
                self._settle(item[0])
        finally:
            if turn is not None:
                key, mine = turn
                mine.set()
                if self._key_turns.get(key) is mine:
                    del self._key_turns[key]

    def _screen(
        self, item: Item, route: Route | None
    ) -> tuple[Message[Any] | None, Route | None, tuple[str, str] | None]:
        """Everything that happens before a handler may see a message.

        Returns the decoded message and its route; or no message when the entry
        was settled here (lost to another consumer, stopped and parked, deleted
        from the stream, a goStream placeholder), with the reason and error
        type when it must become a dead letter. Synchronous, so the hot path
        pays for no extra await.
        """
        raw_id, fields, count = item
        inflight = self.inflight
        lost = inflight.lost
        if lost and raw_id in lost:
            lost.discard(raw_id)
            return None, None, None
        entry_id = raw_id.decode()
        if self.is_stopped(entry_id):
            inflight.set_aside(item)
            return None, None, None
        if not fields:
            logger.warning(
                "entry %s was deleted from the stream while pending; acknowledging",
                entry_id,
                extra={"message_id": entry_id},
            )
            self._settle(raw_id)
            return None, None, None
        if is_init_entry(fields):
            self._settle(raw_id)  # goStream's group-creation placeholder
            return None, None, None
        limit = self.max_payload_bytes
        if limit is not None:
            size = 0
            for key, value in fields.items():  # inlined entry_size: the hot path
                size += len(key) + len(value)
            if size > limit:
                exc = PayloadTooLargeError(size, limit, entry_id)
                logger.error(
                    "%s; moving it to the dead letters undecoded",
                    exc,
                    extra={"message_id": entry_id},
                )
                return None, None, (str(exc), type(exc).__name__)
        try:
            message_type = decode_type(entry_id, fields)
            route = route or self.router.get(message_type)
            if route is None:
                raise NoHandlerError(entry_id, message_type)
            limit = route.max_deliveries or self.max_deliveries
            if count > limit and raw_id not in inflight.resumed:
                reason = f"delivered {count} times, more than max_deliveries={limit}"
                logger.error(
                    "message %s %s; moving it to the dead letters",
                    entry_id,
                    reason,
                    extra={"message_id": entry_id},
                )
                return None, None, (reason, "MaxDeliveriesExceeded")
            msg = decode_message(
                entry_id, fields, self.stream, route.decoder, count, message_type, self.partition
            )
        except (DecodeError, NoHandlerError) as exc:
            logger.error("%s; moving it to the dead letters", exc, extra={"message_id": entry_id})
            return None, None, (str(exc), type(exc).__name__)
        return msg, route, None

    def _settle(self, raw_id: bytes) -> None:
        inflight = self.inflight
        if raw_id not in inflight.held:
            # Lost to another consumer while its handler ran (see ``lose``):
            # the entry is that consumer's now, and an ack would take it from
            # under it while its own handling is under way.
            inflight.lost.discard(raw_id)
            return
        self._ack(raw_id)  # the acker counts it in ``inflight.unacked``
        inflight.release(raw_id)

    def _due(self, exc: BaseException, route: Route, count: int) -> float | None:
        """When a delivery that failed with ``exc`` should be followed by the
        next: the delay :class:`Retry` asked for, else the policy's; None
        with neither."""
        delay = exc.delay if isinstance(exc, Retry) else None
        policy = route.retry or self.retry
        if delay is None and policy is not None:
            delay = policy.delay_for(count)
        return None if delay is None else anyio.current_time() + delay

    async def _failed(
        self, item: Item, exc: BaseException, route: Route, due: float | None = None
    ) -> None:
        """The one place that decides what becomes of a failed delivery: a
        dead letter after the last one allowed; else a retry, kept here until
        its policy's delay (or the one :class:`Retry` asked for) has passed,
        or, with no policy or no room to keep it, left pending for whichever
        consumer claims it after ``claim_idle``. ``due``: the time shared by
        the messages of a failed batch, so that they come back together."""
        raw_id, _, count = item
        limit = route.max_deliveries or self.max_deliveries
        asked = isinstance(exc, Retry)
        if not asked:
            self.counters.failed += 1  # a Retry is no failure: it was asked for
        detail = str(exc) if isinstance(exc, Exception) else _OWN_CANCEL
        entry_id = raw_id.decode()
        if count >= limit:
            logger.error(
                "handler %s failed on message %s (delivery %d of %d): %s: %s; "
                "moving it to the dead letters",
                route.name,
                entry_id,
                count,
                limit,
                type(exc).__name__,
                detail,
                exc_info=None if asked else exc,
                extra={"message_id": entry_id},
            )
            await self._bury(item, f"{type(exc).__name__}: {detail}", type(exc).__name__)
            return
        if due is None:
            due = self._due(exc, route, count)
        if due is None or not self.retries.schedule(item, due):
            due = None
            self.inflight.release(raw_id)  # pending: claimed after claim_idle
        when = "after claim_idle" if due is None else f"in {due - anyio.current_time():.2f}s"
        if asked:
            logger.info(
                "handler %s asked to retry message %s (delivery %d of %d); retrying %s",
                route.name,
                entry_id,
                count,
                limit,
                when,
                extra={"message_id": entry_id},
            )
            return
        logger.warning(
            "handler %s failed on message %s (delivery %d of %d): %s: %s; retrying %s",
            route.name,
            entry_id,
            count,
            limit,
            type(exc).__name__,
            detail,
            when,
            exc_info=exc if count == 1 else None,  # the traceback once per message
            extra={"message_id": entry_id},
        )

    async def _bury(self, item: Item, reason: str, error_type: str) -> None:
        raw_id, fields, count = item
        moved = await self._dead.move(
            raw_id.decode(), fields, reason=reason, error_type=error_type, delivery_count=count
        )
        if moved:
            self.counters.dead_lettered += 1
        self.inflight.release(raw_id)

    async def _batch(self, batch: Batch, slot: Slot) -> None:
        route = batch.route
        ready: list[Item] = []
        messages: list[Message[Any]] = []
        for item in batch.items:
            msg, _, grave = self._screen(item, route)
            if msg is None:
                if grave is not None:
                    await self._bury(item, *grave)
                continue
            messages.append(msg)
            ready.append(item)
        if not ready:
            return
        slot.in_handler = True
        try:
            await route.fn(messages)
        except BatchError as exc:
            slot.in_handler = False
            failed = exc.failed_ids
            due = self._due(exc, route, max(item[2] for item in ready))
            for item in ready:
                if item[0].decode() in failed:
                    await self._failed(item, exc, route, due)
                else:
                    self.counters.handled += 1
                    self._settle(item[0])
        except BaseException as exc:
            slot.in_handler = False
            if not _handler_failed(exc):
                raise
            due = self._due(exc, route, max(item[2] for item in ready))
            for item in ready:
                await self._failed(item, exc, route, due)
        else:
            slot.in_handler = False
            self.counters.handled += len(ready)
            for item in ready:
                self._settle(item[0])
