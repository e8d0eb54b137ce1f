"""Acknowledgements, coalesced: many ids per XACK, flushed within a few ms.

Handlers finish one at a time, but the server is happiest with one XACK for
hundreds of ids. Workers only append to a list; one task sends them.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ._redis import AnyRedis

__all__ = ["Acker"]

#: The most ids one XACK carries.
MAX_IDS_PER_ACK = 2000


class Acker:
    """Collects handled ids and acknowledges them in batches.

    ``call`` is the consumer's retrying wrapper around a Redis call: it
    retries transient faults and raises when the stream or group is gone.
    """

    __slots__ = (
        "_call",
        "_delay",
        "_group",
        "_ids",
        "_lock",
        "_redis",
        "_stream",
        "_wake",
        "acked",
    )

    def __init__(
        self,
        redis: AnyRedis,
        stream: str,
        group: str,
        call: Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]],
        delay: float = 0.002,
    ) -> None:
        self._redis = redis
        self._stream = stream
        self._group = group
        self._call = call
        self._delay = delay
        self._ids: list[bytes] = []
        self._wake = anyio.Event()
        # One flush at a time: the final flush of a stopping consumer must wait for
        # the one in flight (whose ids are out of ``_ids`` meanwhile), or it would
        # find nothing to send while that one is being cancelled.
        self._lock = anyio.Lock()
        self.acked = 0

    def add(self, entry_id: bytes) -> None:
        ids = self._ids
        ids.append(entry_id)
        if len(ids) == 1:
            self._wake.set()

    @property
    def waiting(self) -> int:
        return len(self._ids)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            if len(self._ids) < MAX_IDS_PER_ACK:
                await anyio.sleep(self._delay)
            await self.flush()

    async def flush(self) -> None:
        """Send every id collected so far; on failure they are kept for later."""
        async with self._lock:
            while self._ids:
                batch = self._ids[:MAX_IDS_PER_ACK]
                del self._ids[:MAX_IDS_PER_ACK]
                try:
                    await self._call("XACK", functools.partial(self._xack, batch))
                except BaseException:
                    self._ids[:0] = batch
                    raise
                self.acked += len(batch)

    async def _xack(self, batch: list[bytes]) -> Any:
        return await self._redis.execute_command("XACK", self._stream, self._group, *batch)
