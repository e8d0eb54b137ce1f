"""From raw entries to handler calls: routing, the worker pool, outcomes.

Entries wait in one deque; ``concurrency`` long-lived worker coroutines take
them one at a time. Nothing is spawned, acquired or scoped per message: a
worker's cancel scope lives across many messages and is replaced only when it
is used to cancel one handler (a message stopped while it runs).

The outcome of every message is decided here, in :meth:`Dispatcher._settle`
and :meth:`Dispatcher._failed`: acknowledge, leave pending for a retry, or
move to the dead-letter stream.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel

from ._batch import Batch, Batcher
from ._dead import DeadLetterWriter
from ._routes import Route, Router
from .codec import FIELD_TYPE, decode_message, decode_type, is_init_entry
from .errors import BatchError, DecodeError, NoHandlerError, PayloadTooLargeError
from .message import ConsumerStats, Message

__all__ = ["Counters", "Dispatcher", "Item"]

logger = logging.getLogger("redcurrent.consumer")

#: How long the reader waits for handlers to free half the budget before it
#: reads what room there is (seconds).
BATCH_WAIT = 0.01

#: raw entry id, fields, delivery count
Item = tuple[bytes, dict[bytes, bytes], int]


class Counters:
    __slots__ = ("claimed", "dead_lettered", "failed", "handled", "received")

    def __init__(self) -> None:
        self.received = 0
        self.handled = 0
        self.failed = 0
        self.claimed = 0
        self.dead_lettered = 0

    def snapshot(self, in_flight: int) -> ConsumerStats:
        return ConsumerStats(
            received=self.received,
            handled=self.handled,
            failed=self.failed,
            claimed=self.claimed,
            dead_lettered=self.dead_lettered,
            in_flight=in_flight,
        )


class _Slot:
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


class Dispatcher:
    def __init__(
        self,
        *,
        stream: str,
        router: Router,
        ack: Callable[[bytes], None],
        dead: DeadLetterWriter,
        counters: Counters,
        max_deliveries: int,
        batcher: Batcher | None,
        is_stopped: Callable[[str], bool],
        prefetch: int,
        max_payload_bytes: int | None = None,
    ) -> None:
        self.stream = stream
        self.router = router
        self._ack = ack
        self._dead = dead
        self.counters = counters
        self.max_deliveries = max_deliveries
        self.batcher = batcher
        self.is_stopped = is_stopped
        self.prefetch = prefetch
        #: entries heavier than this (field names and values, in bytes) are
        #: dead-lettered without being decoded; None: no limit.
        self.max_payload_bytes = max_payload_bytes
        self.queue: deque[Item | Batch] = deque()
        #: every entry this consumer holds and has not settled: leased.
        self.held: set[bytes] = set()
        #: held entries another consumer took over (lease lost): skip them.
        self.lost: set[bytes] = set()
        #: stopped messages held aside until resumed; held (leased) but not
        #: counted against ``prefetch``, so they never stall the intake.
        self.parked: dict[bytes, Item] = {}
        #: room promised to reads and claims in flight (see :meth:`reserve`).
        self.reserved = 0
        #: how long the reader waits for half the budget before reading less.
        self.batch_wait = BATCH_WAIT
        #: the reader waits for room (and will send collected acks with its read).
        self.reader_waiting = False
        #: room the reader leaves to a claim pass in progress (see :meth:`reserve`).
        self.claim_share = 0
        #: settled entries whose XACK has not been sent yet: still in the PEL
        #: as this consumer's, so they still count against ``prefetch``.
        self.unacked = 0
        #: asks the acker to send what it has now (set by the runtime): called
        #: when intake waits for room that only acknowledgements can free.
        self.flush_acks: Callable[[], None] | None = None
        #: acknowledgements collected and not yet sent: the reader sends them
        #: ahead of its next read, so their room counts as free for it.
        self.ack_backlog: Callable[[], int] = lambda: 0
        #: resumed messages: deliveries made while they were stopped do not count.
        self.resumed: set[bytes] = set()
        #: delivery counters to write back to the PEL (see ``_lease.Recounter``).
        self.recount: dict[bytes, int] = {}
        self.recount_wanted = anyio.Event()
        self.closing = False
        self._work = anyio.Event()
        self._space = anyio.Event()
        self._space_waiters = 0
        self._countdown = 0
        self._slots: list[_Slot] = []
        self._batch_types: dict[bytes, Route] = {
            t.encode(): r for t, r in router.routes.items() if r.batch
        }

    # -- intake -----------------------------------------------------------
    def submit(
        self,
        entries: list[tuple[bytes, dict[bytes, bytes]]],
        counts: dict[bytes, int] | None = None,
    ) -> None:
        held = self.held
        queue = self.queue
        batched = self._batch_types and self.batcher is not None
        fresh = 0
        lost = self.lost
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
        route = self._batch_types.get(item[1].get(FIELD_TYPE, b"")) if self.batcher else None
        if route is None:
            if front:
                self.queue.appendleft(item)
            else:
                self.queue.append(item)
        elif self.is_stopped(item[0].decode()):
            self._set_aside(item)  # stopped messages never enter a batch
        else:
            assert self.batcher is not None
            self.batcher.add(route, item)
        if wake:
            self._work.set()

    def enqueue_batch(self, batch: Batch) -> None:
        self.queue.append(batch)
        self._work.set()

    @property
    def active(self) -> int:
        """Entries that count against ``prefetch``: held and not parked."""
        return len(self.held) - len(self.parked)

    def free(self) -> int:
        return self.prefetch - self.active - self.reserved - self.unacked

    def acked(self, n: int) -> None:
        """The acker sent ``n`` acknowledgements: their room is free again."""
        self.unacked -= n
        if self._space_waiters:
            self._signal_space()

    async def reserve(self, want: int, *, reader: bool = False) -> int:
        """Wait for room, then promise up to ``want`` entries of it to one read
        or claim; returns how many. The caller submits what it got and then
        :meth:`unreserve` s the whole reservation, so that the reader and the
        claimer together never take more than ``prefetch``.

        The reader keeps its reservation through a blocking read of up to
        ``block`` seconds, so while the claimer is in a pass (``claim_share``
        set) the reader leaves it that much room, which it can have at once.

        Waiters go first: a loop that just gave room back cannot take it again
        before the one that was waiting for it.
        """
        if self._space_waiters:
            await anyio.lowlevel.checkpoint()
        half = self.prefetch - self.prefetch // 2
        if reader and self.batch_wait > 0 and 0 < self._room(reader) < half and self.active:
            # Read in large batches: while handlers are busy, give them a moment
            # to free half the budget (the wake-up threshold) rather than read a
            # sliver now; blocked handlers do not keep the rest from being read.
            with anyio.move_on_after(self.batch_wait):
                await self._wait_for_space(reader)
        while (free := self._room(reader)) <= 0:
            await self._wait_for_space(reader)
        granted = min(want, free)
        self.reserved += granted
        return granted

    async def _wait_for_space(self, reader: bool) -> None:
        if self._space.is_set():
            # The reader and the claimer may both wait: they must share
            # one event, so a set one is replaced only here, once.
            self._space = anyio.Event()
        self._space_waiters += 1
        self._countdown = 0  # check at the next release
        self.reader_waiting = reader
        try:
            await self._space.wait()
        finally:
            self._space_waiters -= 1
            self.reader_waiting = False

    def set_claim_share(self, share: int) -> None:
        """A claim pass starts (``share`` > 0) or ends (0)."""
        lower = share < self.claim_share
        self.claim_share = share
        if lower and self._space_waiters:
            self._space.set()  # the reader may take what the pass left

    def _room(self, reader: bool) -> int:
        if not reader:
            return self.free()
        room = self.free() - self.claim_share
        # Only a budget more than half full makes the reader count on the
        # acknowledgements it would send ahead of its read (free() < 0 after it
        # reserved tells it so); with room to spare a lone read is cheaper.
        return room if room >= self.prefetch // 2 else room + self.ack_backlog()

    def unreserve(self, n: int) -> None:
        self.reserved -= n
        self._signal_space()

    def _signal_space(self) -> None:
        # Wake waiters only once half the buffer is free, so that a busy
        # consumer reads in large batches instead of one entry at a time.
        if not self._space_waiters:
            return
        free, half = self.free(), self.prefetch - self.prefetch // 2
        room = free + self.ack_backlog()
        if room >= half:
            # The reader sends waiting acknowledgements ahead of its read.
            self._space.set()
            return
        self._countdown = half - room
        if self.unacked and free + self.unacked >= half and self.flush_acks is not None:
            self.flush_acks()  # only acknowledgements in flight stand in the way

    def lose(self, ids: list[bytes]) -> list[bytes]:
        """Another consumer took these over: drop them (a running handler
        finishes; queued and batched ones are skipped). Returns those that
        were still held."""
        still = [raw_id for raw_id in ids if raw_id in self.held]
        for raw_id in still:
            parked = self.parked.pop(raw_id, None) is not None
            self._release(raw_id)
            if not parked:
                self.lost.add(raw_id)  # still in the queue, a batch or a handler
        return still

    def _release(self, raw_id: bytes) -> None:
        self.held.discard(raw_id)
        if self.resumed:
            self.resumed.discard(raw_id)
        if self.lost:
            # A lost entry whose handler was running when it was lost ends here.
            self.lost.discard(raw_id)
        if self._space_waiters:
            # Each release frees at most one unit of room: count down to the
            # next moment worth checking instead of checking every time.
            self._countdown -= 1
            if self._countdown <= 0:
                self._signal_space()

    def close(self) -> None:
        """No more intake: workers finish what is already in memory, then exit."""
        self.closing = True
        self._work.set()

    # -- control ------------------------------------------------------------
    def stop_running(self, entry_id: str) -> bool:
        """Cancel the handler running ``entry_id``, if any; it stays pending.

        Only a running handler is cancelled: once it has returned, its outcome
        (ack, retry or dead letter) is being recorded and must complete.
        """
        raw = entry_id.encode()
        for slot in self._slots:
            current = slot.current
            if current is None or not slot.in_handler:
                continue
            ids = [current[0]] if isinstance(current, tuple) else [i[0] for i in current.items]
            if raw in ids:
                slot.stopped = True
                slot.scope.cancel()
                return True
        return False

    def _set_aside(self, item: Item) -> None:
        """Park a stopped message, taking back the delivery that brought it:
        deliveries while stopped do not count towards ``max_deliveries``."""
        self.parked[item[0]] = item
        self._recount(item[0], item[2] - 1)
        if self._space_waiters:
            self._signal_space()  # parked entries no longer take room

    def resume(self, entry_id: str) -> None:
        item = self.parked.pop(entry_id.encode(), None)
        if item is not None and not self.closing:
            self.resumed.add(item[0])
            self._recount(item[0], item[2])  # this delivery counts again
            self._route(item, front=True)

    def _recount(self, raw_id: bytes, count: int) -> None:
        self.recount[raw_id] = max(0, count)
        self.recount_wanted.set()

    # -- workers ------------------------------------------------------------
    async def worker(self) -> None:
        slot = _Slot()
        self._slots.append(slot)
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
            self._slots.remove(slot)

    def _park(self, current: Item | Batch) -> None:
        """After cancelling a handler for a stop: keep the stopped message(s)
        aside; the other messages of a cancelled batch go round again."""
        items = [current] if isinstance(current, tuple) else current.items
        for item in items:
            if item[0] not in self.held or item[0] in self.parked:
                self.lost.discard(item[0])  # lost while it ran: nothing else would clear it
                continue  # settled (acked, dead-lettered, lost) before the stop
            if self.is_stopped(item[0].decode()):
                logger.info(
                    "message %s stopped while running; kept pending",
                    item[0].decode(),
                    extra={"message_id": item[0].decode()},
                )
                self._set_aside(item)
            else:
                self._route(item, front=True)

    async def _work_loop(self, slot: _Slot) -> None:
        queue = self.queue
        while True:
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

    async def _one(self, item: Item, slot: _Slot) -> None:
        msg, route, grave = self._screen(item, None)
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
        if self.lost and raw_id in self.lost:
            self.lost.discard(raw_id)
            return None, None, None
        entry_id = raw_id.decode()
        if self.is_stopped(entry_id):
            self._set_aside(item)
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
            if count > self.max_deliveries and raw_id not in self.resumed:
                reason = f"delivered {count} times, more than max_deliveries={self.max_deliveries}"
                logger.error(
                    "message %s %s; moving it to the dead letters",
                    entry_id,
                    reason,
                    extra={"message_id": entry_id},
                )
                return None, None, (reason, "MaxDeliveriesExceeded")
            msg = decode_message(entry_id, fields, self.stream, route.decoder, count, message_type)
        except (DecodeError, NoHandlerError) as exc:
            logger.error("%s; moving it to the dead letters", exc, extra={"message_id": entry_id})
            return None, None, (str(exc), type(exc).__name__)
        return msg, route, None

    def _settle(self, raw_id: bytes) -> None:
        if raw_id not in self.held:
            # Lost to another consumer while its handler ran (see ``lose``):
            # the entry is that consumer's now, and an ack would take it from
            # under it while its own handling is under way.
            self.lost.discard(raw_id)
            return
        self._ack(raw_id)
        self.unacked += 1
        self._release(raw_id)

    async def _failed(self, item: Item, exc: BaseException, route: Route) -> None:
        """The one place that decides between a later retry and a dead letter."""
        raw_id, _, count = item
        self.counters.failed += 1
        final = count >= self.max_deliveries
        detail = str(exc) if isinstance(exc, Exception) else _OWN_CANCEL
        logger.log(
            logging.ERROR if final else logging.WARNING,
            "handler %s failed on message %s (delivery %d of %d): %s: %s; %s",
            route.name,
            raw_id.decode(),
            count,
            self.max_deliveries,
            type(exc).__name__,
            detail,
            "moving it to the dead letters" if final else "it stays pending for a retry",
            exc_info=exc if final or count == 1 else None,  # the traceback once per message
            extra={"message_id": raw_id.decode()},
        )
        if final:
            await self._bury(item, f"{type(exc).__name__}: {detail}", type(exc).__name__)
        else:
            self._release(raw_id)

    async def _bury(self, item: Item, reason: str, error_type: str) -> None:
        raw_id, fields, count = item
        moved = await self._dead.move(
            raw_id.decode(), fields, reason=reason, error_type=error_type, delivery_count=count
        )
        if moved:
            self.counters.dead_lettered += 1
        self._release(raw_id)

    async def _batch(self, batch: Batch, slot: _Slot) -> None:
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
            for item in ready:
                if item[0].decode() in failed:
                    await self._failed(item, exc, route)
                else:
                    self.counters.handled += 1
                    self._settle(item[0])
        except BaseException as exc:
            slot.in_handler = False
            if not _handler_failed(exc):
                raise
            for item in ready:
                await self._failed(item, exc, route)
        else:
            slot.in_handler = False
            self.counters.handled += len(ready)
            for item in ready:
                self._settle(item[0])
