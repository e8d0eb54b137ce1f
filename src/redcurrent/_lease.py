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
import time

import anyio

from ._inflight import InFlight
from ._member import GroupMember
from ._scripts import REFRESH_LEASE

__all__ = ["LeaseKeeper"]

logger = logging.getLogger("redcurrent.consumer")

#: ids per script call, so that one call never blocks the server for long.
CHUNK = 1000


class LeaseKeeper:
    def __init__(self, member: GroupMember, inflight: InFlight, *, interval: float) -> None:
        self._script = member.redis.register_script(REFRESH_LEASE)
        self._member = member
        self._inflight = inflight
        self.interval = interval
        inflight.lease_span = interval * 3

    async def run(self) -> None:
        """Refresh every ``interval`` (``claim_idle / 3``), and keep
        ``inflight.lease_until`` one ``claim_idle`` after the start of the last
        refresh that went through: past it a peer may have claimed what is
        held, so workers wait for the next refresh to say what was lost rather
        than start a message that is no longer this consumer's."""
        inflight, lapse = self._inflight, self.interval * 3
        inflight.renew_lease(time.monotonic() + lapse)
        while True:
            await anyio.sleep(self.interval)
            began = time.monotonic()
            await self.refresh()
            inflight.renew_lease(began + lapse)

    async def refresh(self) -> None:
        """Renew the lease of everything held."""
        await self._set_idle(self._inflight.to_refresh(), 0)

    async def hand_back(self, idle: float) -> int:
        """On stop: make everything this consumer has pending claimable by
        others at once, by setting its idle time to ``idle``. That is what it
        holds, and also what a read or claim cancelled by the stop had already
        taken on the server but never reached the dispatcher. Returns how many
        entries it handed back (the caller announces them when there are any)."""
        member = self._member
        start: bytes = b"-"
        handed = 0
        while True:
            rows = await member.own_pending(start, b"+", CHUNK)
            ids = [row["message_id"] for row in rows]
            if ids:
                handed += await self._set_idle(ids, int(idle * 1000))
            if len(rows) < CHUNK:
                return handed
            start = b"(" + ids[-1]

    async def hand_back_ids(self, ids: list[bytes], idle: float) -> int:
        """Make these entries claimable by others at once (those still this
        consumer's); returns how many."""
        return await self._set_idle(ids, int(idle * 1000))

    async def _set_idle(self, held: list[bytes], idle_ms: int) -> int:
        """Set the idle time of those of ``held`` still this consumer's;
        returns how many were."""
        done = 0
        for start in range(0, len(held), CHUNK):
            chunk = held[start : start + CHUNK]
            member = self._member
            lost: list[bytes] = await member.call(
                "lease refresh",
                functools.partial(
                    self._script,
                    keys=[member.stream],
                    args=[member.group, member.name, idle_ms, *chunk],
                ),
            )
            done += len(chunk) - len(lost)
            if lost and idle_ms == 0:
                self._lose(lost)
        return done

    def _lose(self, lost: list[bytes]) -> None:
        still = self._inflight.lose(lost)
        if still:
            logger.warning(
                "%r lost %d entries to another consumer (was the event loop "
                "blocked longer than claim_idle?): %s",
                self._member,
                len(still),
                ", ".join(i.decode() for i in still[:20]),
            )
