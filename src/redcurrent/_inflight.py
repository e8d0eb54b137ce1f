"""What a consumer holds and has not finished, and the room left for more.

Every entry the reader or the claimer hands in is *held* (leased to this
consumer) until the dispatcher settles it. Held entries, the room promised to
reads and claims in flight, and acknowledgements not sent yet together count
against ``prefetch``; stopped messages are *parked* aside and do not. Failed
messages *waiting* for their retry stay held and count, up to half of
``prefetch``, and the thresholds that wake the reader are taken from the rest,
so that waiting retries never stall new reads. This is
the one place that state lives: the dispatcher, the reader and claimer, the
acker, the lease keeper, the recounter and ``stats`` all read and change it
here, and none of them reaches into another.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import anyio
import anyio.lowlevel

__all__ = ["BATCH_WAIT", "Entries", "InFlight", "Item", "Submit"]

#: How long the reader waits for handlers to free half the budget before it
#: reads what room there is (seconds).
BATCH_WAIT = 0.01
#: A countdown no run of releases reaches: room was signalled, nothing to check.
_NO_CHECK = 1 << 62

#: raw entry id, fields, delivery count
Item = tuple[bytes, dict[bytes, bytes], int]
#: entries as a read or claim returns them: raw id, fields
Entries = list[tuple[bytes, dict[bytes, bytes]]]
#: where reads and claims hand their entries (``Dispatcher.submit``), with
#: their delivery counts (None: first deliveries, as a read's are).
Submit = Callable[[Entries, "dict[bytes, int] | None"], None]


class InFlight:
    """Held, lost, parked and resumed entries; room and who waits for it;
    delivery counters to write back."""

    def __init__(self, prefetch: int, *, batch_wait: float = BATCH_WAIT) -> None:
        self.prefetch = prefetch
        #: how long the reader waits for half the budget before reading less.
        self.batch_wait = batch_wait
        #: every entry this consumer holds and has not settled: leased.
        self.held: set[bytes] = set()
        #: held entries another consumer took over (lease lost): skip them.
        self.lost: set[bytes] = set()
        #: stopped messages held aside until resumed; held (leased) but not
        #: counted against ``prefetch``, so they never stall the intake.
        self.parked: dict[bytes, Item] = {}
        #: failed messages waiting for their retry, with their due time (see
        #: ``_retry``): held (leased) and counted against ``prefetch``.
        self.waiting: dict[bytes, tuple[Item, float]] = {}
        #: resumed messages: deliveries made while they were stopped do not count.
        self.resumed: set[bytes] = set()
        #: room promised to reads and claims in flight (see :meth:`reserve`).
        self.reserved = 0
        #: room the reader leaves to a claim pass in progress (see :meth:`reserve`).
        self.claim_share = 0
        #: settled entries whose XACK has not been sent yet: still in the PEL
        #: as this consumer's, so they still count against ``prefetch``. Kept
        #: by the acker, which holds exactly these ids (``Acker.waiting``).
        self.unacked = 0
        #: the reader waits for room (and will send collected acks with its read).
        self.reader_waiting = False
        #: until when (monotonic) no peer can have claimed what is held: the
        #: last successful lease refresh began ``claim_idle`` before this. Past
        #: it (the process was frozen, the loop blocked, Redis out of reach)
        #: workers start nothing until the next refresh has said what was lost.
        #: Infinite until a lease keeper runs.
        self.lease_until = math.inf
        #: how long a delivery or a refresh keeps an entry ours (``claim_idle``);
        #: infinite until a lease keeper runs.
        self.lease_span = math.inf
        #: the earliest lapse among entries delivered since the running (or
        #: next) refresh took its list of what is held: that refresh does not
        #: vouch for them.
        self._unlisted_until = math.inf
        self._lease_renewed: anyio.Event | None = None
        self._recount: dict[bytes, int] = {}
        self._recount_wanted = anyio.Event()
        self._space = anyio.Event()
        self._space_waiters = 0
        self._countdown = 0
        self._reader_woken: anyio.Event | None = None

    # -- the lease ------------------------------------------------------------
    def to_refresh(self) -> list[bytes]:
        """What a lease refresh starting now renews: everything held."""
        self._unlisted_until = math.inf
        return list(self.held)

    def delivered(self, since: float) -> None:
        """A read or claim sent at ``since`` (monotonic) delivered entries:
        the server leased them to us no earlier than that, so they are safe
        only until ``since + lease_span``. A reply that arrives later than
        that (the process was frozen while the reply waited in the socket)
        makes workers wait for a refresh that covers them."""
        until = since + self.lease_span
        if until < self.lease_until:
            self.lease_until = until
        if until < self._unlisted_until:
            self._unlisted_until = until

    def renew_lease(self, until: float) -> None:
        """A lease refresh succeeded: what it listed is ours until ``until``;
        what was delivered after it took its list, as long as its delivery says."""
        self.lease_until = min(until, self._unlisted_until)
        if self._lease_renewed is not None:
            self._lease_renewed.set()
            self._lease_renewed = None

    async def wait_for_lease(self) -> None:
        """Wait while the lease may have lapsed (see :attr:`lease_until`)."""
        while self.lease_until < time.monotonic():
            if self._lease_renewed is None:
                self._lease_renewed = anyio.Event()
            await self._lease_renewed.wait()

    # -- room -----------------------------------------------------------------
    @property
    def active(self) -> int:
        """Entries that count against ``prefetch``: held and not parked."""
        return len(self.held) - len(self.parked)

    def free(self) -> int:
        return self.prefetch - self.active - self.reserved - self.unacked

    def _half(self) -> int:
        """Half the room that is not taken by waiting retries: the unit the
        reader is woken and reads by. Taken from ``prefetch`` alone, a budget
        half full of waiting retries would keep the reader asleep until every
        running handler finished."""
        budget = self.prefetch - len(self.waiting)
        return budget - budget // 2

    def acked(self, n: int) -> None:
        """``n`` acknowledgements are on their way (``-n``: they failed and
        are waiting again): their room is free again."""
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
        half = self._half()
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
            if reader and self._reader_woken is not None:
                self._reader_woken.set()
                self._reader_woken = None

    def reader_woken(self) -> anyio.Event:
        """Set once the reader, waiting for room now, stops waiting: by then it
        has taken the acknowledgements it sends ahead of its read, or left them."""
        if self._reader_woken is None:
            self._reader_woken = anyio.Event()
        return self._reader_woken

    def waiting_for_space(self) -> int:
        """Reads and claims blocked for room right now (0 once they are woken)."""
        return 0 if self._space.is_set() else self._space_waiters

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
        budget = self.prefetch - len(self.waiting)
        return room if room >= budget // 2 else room + self.unacked

    def unreserve(self, n: int) -> None:
        self.reserved -= n
        self._signal_space()

    def _signal_space(self) -> None:
        # Wake waiters only once half the buffer is free, so that a busy
        # consumer reads in large batches instead of one entry at a time.
        if not self._space_waiters:
            return
        half = self._half()
        # The reader sends waiting acknowledgements ahead of its read: their
        # room counts as free for it.
        room = self.free() + self.unacked
        if room >= half:
            self._space.set()
            # Woken: until a waiter waits again (which resets the countdown)
            # releases need not check. A worker that runs many handlers before
            # the woken reader gets the loop would otherwise check at each one.
            self._countdown = _NO_CHECK
            return
        self._countdown = half - room

    # -- leaving ----------------------------------------------------------------
    def release(self, raw_id: bytes) -> None:
        """An entry is settled (acknowledged, dead-lettered, left for a retry)."""
        self.held.discard(raw_id)
        if self.waiting:
            self.waiting.pop(raw_id, None)
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

    def lose(self, ids: list[bytes]) -> list[bytes]:
        """Another consumer took these over: drop them (a running handler
        finishes; queued and batched ones are skipped). Returns those that
        were still held."""
        still = [raw_id for raw_id in ids if raw_id in self.held]
        for raw_id in still:
            parked = self.parked.pop(raw_id, None) is not None
            parked |= self.waiting.pop(raw_id, None) is not None
            self.release(raw_id)
            if not parked:
                self.lost.add(raw_id)  # still in the queue, a batch or a handler
        return still

    # -- waiting for a retry ----------------------------------------------------------
    def wait_retry(self, item: Item, due: float) -> bool:
        """Keep a failed message, held, until ``due``; False when it is no
        longer held or half of ``prefetch`` already waits (it is then left
        pending, for a claim after ``claim_idle``)."""
        raw_id = item[0]
        if raw_id not in self.held or len(self.waiting) >= self.prefetch // 2:
            return False
        self.waiting[raw_id] = (item, due)
        if self._space_waiters:
            self._signal_space()  # the reader's threshold just went down
        return True

    def retry_due(self, raw_id: bytes, due: float) -> Item | None:
        """A waiting retry whose time came: the item for its next delivery,
        whose count is written to the group's PEL as for a resumed message;
        None if it no longer waits for this due time (lost meanwhile)."""
        waiting = self.waiting.get(raw_id)
        if waiting is None or waiting[1] != due:
            return None
        del self.waiting[raw_id]
        item, _ = waiting
        count = item[2] + 1
        self._recount_to(raw_id, count)
        return (raw_id, item[1], count)

    # -- stopped and resumed ------------------------------------------------------
    def set_aside(self, item: Item) -> None:
        """Park a stopped message, taking back the delivery that brought it:
        deliveries while stopped do not count towards ``max_deliveries``."""
        self.parked[item[0]] = item
        self._recount_to(item[0], item[2] - 1)
        if self._space_waiters:
            self._signal_space()  # parked entries no longer take room

    def resume(self, raw_id: bytes, *, requeue: bool) -> Item | None:
        """Unpark a resumed message; returns it if it is to run again
        (``requeue``), else it stays held, to be handed back on stop."""
        item = self.parked.pop(raw_id, None)
        if item is None or not requeue:
            return None
        self.resumed.add(raw_id)
        self._recount_to(raw_id, item[2])  # this delivery counts again
        return item

    # -- delivery counters to write back (see ``_recount``) ----------------------
    def _recount_to(self, raw_id: bytes, count: int) -> None:
        self._recount[raw_id] = max(0, count)
        self._recount_wanted.set()

    async def recount_wanted(self) -> None:
        """Wait until a delivery counter is to be written back."""
        await self._recount_wanted.wait()
        self._recount_wanted = anyio.Event()

    def take_recounts(self) -> dict[bytes, int]:
        """The counters to write back since the last call, by entry id."""
        pairs, self._recount = self._recount, {}
        return pairs
