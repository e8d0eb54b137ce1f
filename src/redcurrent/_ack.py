"""Acknowledgements, coalesced: many ids per XACK, flushed within a few ms.

Handlers finish one at a time, but the server is happiest with one XACK for
hundreds of ids. Workers only append to a list; one task sends them.
"""

from __future__ import annotations

import functools
from typing import Any

import anyio

from ._inflight import InFlight
from ._member import GroupMember
from ._redis import packed_sender

__all__ = ["Acker"]

#: The most ids one XACK carries.
MAX_IDS_PER_ACK = 2000
#: How long ids may wait for the reader to send them with its next read, when
#: it waits for room (seconds); bounded, so that slow handlers' acks still go.
#: Ids the reader leaves when it wakes go at once.
DEFERRED = 0.05


class Acker:
    """Collects handled ids and acknowledges them in batches, through the
    member's retrying call (transient faults wait, a vanished group raises).

    It keeps ``inflight.unacked`` equal to the ids it holds, and gives their
    room back as each batch is sent (and takes it again if sending failed):
    room held by entries waiting for their XACK is free only once it is on
    its way."""

    __slots__ = (
        "_delay",
        "_head",
        "_ids",
        "_inflight",
        "_lock",
        "_member",
        "_send",
        "_wake",
        "acked",
    )

    def __init__(self, member: GroupMember, inflight: InFlight, delay: float = 0.002) -> None:
        self._member = member
        self._inflight = inflight
        self._delay = delay
        self._ids: list[bytes] = []
        self._wake = anyio.Event()
        # One flush at a time: the final flush of a stopping consumer must wait for
        # the one in flight (whose ids are out of ``_ids`` meanwhile), or it would
        # find nothing to send while that one is being cancelled.
        self._lock = anyio.Lock()
        self.acked = 0
        # XACK of hundreds of ids: packed by hiredis (see packed_sender), with
        # the names encoded as the client encodes them.
        encode = member.redis.get_encoder().encode
        self._head = ("XACK", encode(member.stream), encode(member.group))
        self._send = packed_sender(member.redis)

    def add(self, entry_id: bytes) -> None:
        ids = self._ids
        ids.append(entry_id)
        self._inflight.unacked += 1
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
        if ids:
            self._inflight.acked(len(ids))  # sent ahead of the caller's read
        return ids

    def put_back(self, ids: list[bytes]) -> None:
        self.acked -= len(ids)
        self._ids[:0] = ids
        self._inflight.unacked += len(ids)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            if len(self._ids) < MAX_IDS_PER_ACK:
                if self._inflight.reader_waiting:
                    # A reader waiting for room sends the ids ahead of its next
                    # read. Once it is awake, what it left (a read with room
                    # to spare goes alone) is sent at once, not DEFERRED later.
                    with anyio.move_on_after(DEFERRED):
                        await self._inflight.reader_woken().wait()
                else:
                    await anyio.sleep(self._delay)
            await self.flush()

    async def flush(self) -> None:
        """Send every id collected so far; on failure they are kept for later."""
        async with self._lock:
            while self._ids:
                batch = self._ids[:MAX_IDS_PER_ACK]
                del self._ids[:MAX_IDS_PER_ACK]
                # Their room is free once the XACK is on its way: the server
                # runs it before any read this consumer sends after it.
                self._inflight.acked(len(batch))
                try:
                    await self._member.call("XACK", functools.partial(self._xack, batch))
                except BaseException:
                    self._ids[:0] = batch
                    self._inflight.acked(-len(batch))
                    raise
                self.acked += len(batch)

    async def _xack(self, batch: list[bytes]) -> Any:
        return await self._send(*self._head, *batch)
