"""Acknowledgements, coalesced: many ids per XACK, flushed within a few ms.

Handlers finish one at a time, but the server is happiest with one XACK for
hundreds of ids. Workers only append to a list; one task sends them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import anyio

from ._member import GroupMember

__all__ = ["Acker"]

#: The most ids one XACK carries.
MAX_IDS_PER_ACK = 2000
#: How long ids may wait for the reader to send them with its next read, when
#: it waits for room (seconds); bounded, so that slow handlers' acks still go.
DEFERRED = 0.05


class Acker:
    """Collects handled ids and acknowledges them in batches, through the
    member's retrying call (transient faults wait, a vanished group raises)."""

    __slots__ = (
        "_delay",
        "_ids",
        "_lock",
        "_member",
        "_urgent",
        "_wake",
        "acked",
        "on_acked",
        "reader_will_send",
    )

    def __init__(
        self,
        member: GroupMember,
        delay: float = 0.002,
        on_acked: Callable[[int], None] | None = None,
    ) -> None:
        """``on_acked(n)`` is told of every batch as it is sent (and of ``-n``
        if sending failed), so that room held by entries waiting for their
        XACK is given back only once it is on its way."""
        self._member = member
        self.on_acked = on_acked
        #: True while the reader waits for room and will send the collected ids
        #: ahead of its next read (see ``_read``): wait longer before sending.
        self.reader_will_send: Callable[[], bool] = lambda: False
        self._delay = delay
        self._ids: list[bytes] = []
        self._wake = anyio.Event()
        self._urgent = anyio.Event()
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

    def take(self) -> list[bytes]:
        """Hand the collected ids (up to one XACK's worth) to a caller that
        sends them itself; :meth:`put_back` them if that fails."""
        ids = self._ids[:MAX_IDS_PER_ACK]
        del self._ids[:MAX_IDS_PER_ACK]
        self.acked += len(ids)
        return ids

    def put_back(self, ids: list[bytes]) -> None:
        self.acked -= len(ids)
        self._ids[:0] = ids
        self._wake.set()

    def urge(self) -> None:
        """Send what is collected now, without waiting for more: the consumer
        waits for the room these acknowledgements hold."""
        self._urgent.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            if len(self._ids) < MAX_IDS_PER_ACK and not self._urgent.is_set():
                delay = DEFERRED if self.reader_will_send() else self._delay
                with anyio.move_on_after(delay):
                    await self._urgent.wait()
            if self._urgent.is_set():
                self._urgent = anyio.Event()
            await self.flush()

    async def flush(self) -> None:
        """Send every id collected so far; on failure they are kept for later."""
        async with self._lock:
            while self._ids:
                batch = self._ids[:MAX_IDS_PER_ACK]
                del self._ids[:MAX_IDS_PER_ACK]
                # Their room is free once the XACK is on its way: the server
                # runs it before any read this consumer sends after it.
                if self.on_acked is not None:
                    self.on_acked(len(batch))
                try:
                    await self._member.call("XACK", functools.partial(self._xack, batch))
                except BaseException:
                    self._ids[:0] = batch
                    if self.on_acked is not None:
                        self.on_acked(-len(batch))
                    raise
                self.acked += len(batch)

    async def _xack(self, batch: list[bytes]) -> Any:
        member = self._member
        return await member.redis.execute_command("XACK", member.stream, member.group, *batch)
