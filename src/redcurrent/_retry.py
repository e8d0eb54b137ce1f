"""Failed messages waiting for their retry, run again by the consumer that saw
them fail.

A failed message is not handed back to the group (a copy with a new id would
reach every group; leaving it to XAUTOCLAIM would wait ``claim_idle``): it
stays held by this consumer, leased like any held entry, in
``InFlight.waiting``. When it is due, its delivery count is raised by one in
the group's PEL (XCLAIM to itself, the write resumed messages use, see
``_recount``) and it goes back to the workers. So the PEL stays the truth: if
this consumer dies during the wait, another claims the message after
``claim_idle``, XAUTOCLAIM raises the count, and the backoff goes on from it.

One timer serves every waiting retry: it sleeps until the earliest due time,
and is woken early only when a sooner one is added.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

import anyio

from ._inflight import InFlight, Item

__all__ = ["RetryTimer"]


class RetryTimer:
    __slots__ = ("_closed", "_heap", "_inflight", "_seq", "_wake")

    def __init__(self, inflight: InFlight) -> None:
        self._inflight = inflight
        #: due time, tie-breaker, entry id; an entry no longer waiting for
        #: that due time (lost, settled) is skipped when it comes up.
        self._heap: list[tuple[float, int, bytes]] = []
        self._seq = itertools.count()
        self._wake = anyio.Event()
        self._closed = False

    def schedule(self, item: Item, due: float) -> bool:
        """Keep ``item`` until ``due`` (``anyio.current_time()``); False if it
        cannot wait here (see :meth:`InFlight.wait_retry`) or the consumer stops."""
        if self._closed:
            return False
        if not self._inflight.wait_retry(item, due):
            return False
        heap = self._heap
        heapq.heappush(heap, (due, next(self._seq), item[0]))
        if heap[0][2] == item[0]:
            self._wake.set()  # sooner than what the timer sleeps for
        return True

    def close(self) -> None:
        """No more retries run: those still waiting stay held, to be handed
        back with the rest on stop (their count in the PEL is the failed
        delivery's, so whoever claims them next counts right)."""
        self._closed = True
        self._wake.set()

    def take_due(self, now: float) -> list[Item]:
        """The retries due by ``now``, each with its next delivery count (none
        once closed)."""
        heap, inflight = self._heap, self._inflight
        due: list[Item] = []
        while heap and heap[0][0] <= now and not self._closed:
            when, _, raw_id = heapq.heappop(heap)
            item = inflight.retry_due(raw_id, when)
            if item is not None:
                due.append(item)
        return due

    async def run(self, requeue: Callable[[list[Item]], None]) -> None:
        """Hand due retries to ``requeue`` (the workers) until closed."""
        heap = self._heap
        while not self._closed:
            if self._wake.is_set():
                self._wake = anyio.Event()
            now = anyio.current_time()
            due = self.take_due(now)
            if due:
                requeue(due)
            wait = heap[0][0] - now if heap else math.inf
            with anyio.move_on_after(wait):
                await self._wake.wait()
