"""Batch handlers: accumulate messages per type across reads.

A batch is handed to the workers when it holds ``size`` messages or when its
oldest message has waited ``timeout`` seconds, whichever comes first. Entries
from pending recovery and claims arrive through the same door, so they are
batched like fresh ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import anyio

from ._config import BatchConfig
from ._inflight import Item
from ._routes import Route

__all__ = ["Batch", "Batcher"]


class Batch:
    __slots__ = ("items", "route")

    def __init__(self, route: Route, items: list[Item]) -> None:
        self.route = route
        self.items = items


class _Pending:
    __slots__ = ("deadline", "items", "size")

    def __init__(self, size: int, deadline: float) -> None:
        self.items: list[Item] = []
        self.size = size
        self.deadline = deadline


class Batcher:
    """Per-route accumulators and the timer that hands over the stale ones.

    It only accumulates: a batch it completes is returned to the caller, and
    :meth:`run` hands the timed-out ones to ``enqueue``. So it is built before
    the dispatcher whose queue takes them, and knows nothing of it.
    """

    def __init__(self, default: BatchConfig) -> None:
        self.default = default
        self._open: dict[Route, _Pending] = {}
        self._changed = anyio.Event()

    def size_of(self, route: Route) -> int:
        return route.size or self.default.size

    def add(self, route: Route, item: Item) -> Batch | None:
        """Add one message; returns its batch once that is full."""
        pending = self._open.get(route)
        if pending is None:
            timeout = route.timeout or self.default.timeout
            pending = self._open[route] = _Pending(
                self.size_of(route), anyio.current_time() + timeout
            )
            self._changed.set()
        pending.items.append(item)
        if len(pending.items) >= pending.size:
            del self._open[route]
            return Batch(route, pending.items)
        return None

    def flush_all(self) -> list[Batch]:
        """Every partial batch, now (used when the consumer stops)."""
        batches = [Batch(route, pending.items) for route, pending in self._open.items()]
        self._open.clear()
        return batches

    def held(self) -> list[Item]:
        return [item for pending in self._open.values() for item in pending.items]

    async def run(self, enqueue: Callable[[Batch], None]) -> None:
        """Hand each batch to ``enqueue`` once its oldest message waited its
        ``timeout``."""
        while True:
            now = anyio.current_time()
            next_deadline = math.inf
            for route, pending in list(self._open.items()):
                if pending.deadline <= now:
                    del self._open[route]
                    enqueue(Batch(route, pending.items))
                else:
                    next_deadline = min(next_deadline, pending.deadline)
            self._changed = anyio.Event()
            with anyio.move_on_after(next_deadline - now if next_deadline < math.inf else None):
                await self._changed.wait()
