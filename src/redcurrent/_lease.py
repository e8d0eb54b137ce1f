"""Leases: a consumer keeps what it holds from being claimed while it works.

XAUTOCLAIM takes entries by idle time alone, so a handler that runs longer
than ``claim_idle`` would see its message handed to a second consumer. Every
``claim_idle / 3`` the consumer resets the idle time of every entry it holds
(running or waiting in memory) with ``XCLAIM ... JUSTID`` to itself, inside a
script that skips entries someone else took over meanwhile.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ._dispatch import Dispatcher
from ._redis import AnyRedis
from ._scripts import REFRESH_LEASE

__all__ = ["LeaseKeeper"]

logger = logging.getLogger("redcurrent.consumer")

Call = Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]]

#: ids per script call, so that one call never blocks the server for long.
CHUNK = 1000


class LeaseKeeper:
    def __init__(
        self,
        redis: AnyRedis,
        stream: str,
        group: str,
        consumer: str,
        dispatcher: Dispatcher,
        call: Call,
        *,
        interval: float,
    ) -> None:
        self._script = redis.register_script(REFRESH_LEASE)
        self._stream = stream
        self._group = group
        self._consumer = consumer
        self._dispatcher = dispatcher
        self._call = call
        self.interval = interval

    async def run(self) -> None:
        while True:
            await anyio.sleep(self.interval)
            await self.refresh()

    async def refresh(self) -> None:
        """Renew the lease of everything held."""
        await self._set_idle(list(self._dispatcher.held), 0)

    async def hand_back(self, idle: float) -> None:
        """On stop: make what is still held claimable by others at once."""
        await self._set_idle(list(self._dispatcher.held), int(idle * 1000))

    async def _set_idle(self, held: list[bytes], idle_ms: int) -> None:
        for start in range(0, len(held), CHUNK):
            chunk = held[start : start + CHUNK]
            lost: list[bytes] = await self._call(
                "lease refresh",
                functools.partial(
                    self._script,
                    keys=[self._stream],
                    args=[self._group, self._consumer, idle_ms, *chunk],
                ),
            )
            if lost and idle_ms == 0:
                self._lose(lost)

    def _lose(self, lost: list[bytes]) -> None:
        dispatcher = self._dispatcher
        still = [i for i in lost if i in dispatcher.held]
        if not still:
            return  # settled meanwhile
        logger.warning(
            "%s/%s: consumer %s lost %d entries to another consumer (was the event loop "
            "blocked longer than claim_idle?): %s",
            self._stream,
            self._group,
            self._consumer,
            len(still),
            ", ".join(i.decode() for i in still[:20]),
        )
        for raw_id in still:
            dispatcher.parked.pop(raw_id, None)
            dispatcher.lost.add(raw_id)
            dispatcher.held.discard(raw_id)
