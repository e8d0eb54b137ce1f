"""Getting back entries that were delivered but never finished.

At start a consumer first re-reads its own pending entries (a restarted
consumer of the same name finishes what it had). Then, periodically, it takes
over entries that any consumer of the group left idle longer than
``claim_idle`` (XAUTOCLAIM, cursor kept across calls), and at once when a
stopping peer announces that it handed its entries back. Live consumers are
not robbed: they refresh the idle time of what they hold (see ``_lease.py``).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ._dispatch import Counters
from ._inflight import InFlight, Submit
from ._member import GroupMember
from ._redis import entries_of
from ._scripts import ACK_DELETED

__all__ = ["Claimer", "delivery_counts", "recover_own_pending"]

logger = logging.getLogger("redcurrent.consumer")


async def delivery_counts(member: GroupMember, ids: list[bytes]) -> dict[bytes, int]:
    """Delivery counters from the group's PEL for entries this consumer just got.

    ``ids`` are ascending. Other entries this consumer holds may lie between
    them (a claim batch spans entries it is still running), so the range is
    read page by page until every id is found or the range is exhausted.
    """
    if not ids:
        return {}
    wanted = set(ids)
    counts: dict[bytes, int] = {}
    lo: bytes = ids[0]
    hi = ids[-1]
    page = len(ids) + 64
    while True:
        rows = await member.own_pending(lo, hi, page)
        for row in rows:
            if row["message_id"] in wanted:
                counts[row["message_id"]] = int(row["times_delivered"])
        if len(rows) < page or len(counts) == len(wanted):
            return counts
        lo = b"(" + rows[-1]["message_id"]  # exclusive range (Redis >= 6.2)


async def recover_own_pending(
    member: GroupMember, inflight: InFlight, submit: Submit, count: int = 500
) -> int:
    """Feed this consumer's own pending entries to ``submit``; returns how many."""
    last: bytes = b"0-0"
    total = 0
    while True:
        n = await inflight.reserve(count)
        since = time.monotonic()
        try:
            reply = await member.call(
                "XREADGROUP",
                functools.partial(
                    member.redis.execute_command,
                    *("XREADGROUP", "GROUP", member.group, member.name, "COUNT", n),
                    *("STREAMS", member.stream, last),
                ),
            )
            entries = entries_of(reply)
            if entries:
                counts = await delivery_counts(member, [e[0] for e in entries])
                inflight.delivered(since)
                submit(entries, counts)
        finally:
            inflight.unreserve(n)
        if not entries:
            break
        total += len(entries)
        last = entries[-1][0]
    if total:
        logger.info("%r: recovered %d of its own pending entries", member, total)
    return total


class Claimer:
    """The XAUTOCLAIM loop: claims go to ``submit``, and ``flush_acks`` sends
    the acknowledgements collected so far before each step.

    A pass walks the group's pending list from ``0-0`` to its end, one step
    at a time; passes start ``interval`` apart, or at once after :meth:`wake`
    (a peer handed its entries back on stopping: see ``_control``). Wakes
    that come before a pass starts share it; one that comes while a pass runs
    calls for one more pass after it, since the cursor may already be past
    the entries it announces.
    """

    def __init__(
        self,
        member: GroupMember,
        inflight: InFlight,
        submit: Submit,
        counters: Counters,
        *,
        claim_idle: float,
        interval: float,
        count: int = 100,
        flush_acks: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._member = member
        self._inflight = inflight
        self._submit = submit
        self._counters = counters
        self._min_idle_ms = max(1, int(claim_idle * 1000))
        self._interval = interval
        self.count = count
        #: where the next step starts; ``0-0`` once a pass is complete.
        self.cursor: bytes = b"0-0"
        self._flush_acks = flush_acks
        self._ack_deleted = member.redis.register_script(ACK_DELETED)
        self._woken = anyio.Event()
        #: passes started, and wakes asked for (for tests and debugging).
        self.passes = 0
        self.wakes = 0
        self._between = False

    def wake(self) -> None:
        """Start a pass now rather than at the end of the interval."""
        self.wakes += 1
        self._woken.set()

    @property
    def waiting(self) -> bool:
        """Between passes, with no wake pending."""
        return self._between and not self._woken.is_set()

    async def run(self) -> None:
        inflight = self._inflight
        # While a pass runs, the reader leaves this much room to it: else a
        # reader blocked on an idle stream would hold all of it for ``block``
        # seconds at every step of the pass.
        share = min(self.count, inflight.prefetch // 4)
        while True:
            # From here on a wake calls for another pass: this one may step
            # past what it announces before the announcement arrives.
            self._woken = anyio.Event()
            self.passes += 1
            inflight.set_claim_share(share)
            await self.claim_once()
            while self.cursor != b"0-0":
                await self.claim_once()
            inflight.set_claim_share(0)
            self._between = True
            with anyio.move_on_after(self._interval):
                await self._woken.wait()
            self._between = False

    async def claim_all(self) -> int:
        """XAUTOCLAIM steps from the kept cursor until it wraps: every entry
        idle past ``claim_idle`` now, in id order; returns entries claimed."""
        claimed = await self.claim_once()
        while self.cursor != b"0-0":
            claimed += await self.claim_once()
        return claimed

    async def claim_once(self) -> int:
        """One XAUTOCLAIM step from the kept cursor; returns entries claimed."""
        inflight = self._inflight
        n = await inflight.reserve(self.count)
        try:
            if self._flush_acks is not None:
                # Entries this consumer finished but has not acknowledged yet
                # are pending and may be idle: send those acks first (after
                # any wait for room), or it would claim its own finished work
                # back and run it again.
                await self._flush_acks()
            return await self._claim(n)
        finally:
            inflight.unreserve(n)

    async def _claim(self, n: int) -> int:
        member = self._member
        start = self.cursor
        since = time.monotonic()
        reply = await member.call(
            "XAUTOCLAIM",
            functools.partial(
                member.redis.execute_command,
                *("XAUTOCLAIM", member.stream, member.group, member.name),
                *(self._min_idle_ms, start, "COUNT", n),
            ),
        )
        self.cursor = reply[0]
        if len(reply) > 2 and reply[2]:
            # Redis 7+: idle pending entries whose stream entry was deleted;
            # the server already dropped them from the PEL.
            logger.warning(
                "%r: %d pending entries were deleted from the stream before anyone "
                "finished them; the server dropped them from the pending list: %s",
                member,
                len(reply[2]),
                ", ".join(i.decode() for i in reply[2][:20]),
            )
        held = self._inflight.held
        claimed = reply[1] or []
        entries = [
            (i, f if isinstance(f, dict) else {})
            for i, f in claimed
            if i is not None and i not in held
        ]
        if len(entries) < len(claimed) and any(i is None for i, _ in claimed):
            # Redis 6.2 claims a pending entry whose stream entry was deleted
            # but answers nil for it, without its id: it is now ours, pending
            # for ever unless acknowledged.
            await self._drop_deleted(start, self.cursor, {i for i, _ in entries})
        if not entries:
            return 0
        counts = await delivery_counts(member, [e[0] for e in entries])
        self._counters.claimed += len(entries)
        logger.info(
            "%r: claimed %d idle entries (first %s)", member, len(entries), entries[0][0].decode()
        )
        self._inflight.delivered(since)
        self._submit(entries, counts)
        return len(entries)

    async def _drop_deleted(self, start: bytes, cursor: bytes, claimed: set[bytes]) -> None:
        """Acknowledge the entries of this consumer between ``start`` and
        ``cursor`` whose stream entry is gone (the nils of a 6.2 XAUTOCLAIM)."""
        member, held = self._member, self._inflight.held
        end = b"+" if cursor == b"0-0" else b"(" + cursor
        rows: list[dict[str, Any]] = await member.own_pending(
            start, end, self.count * 10 + len(held)
        )
        candidates = [
            r["message_id"]
            for r in rows
            if r["message_id"] not in held and r["message_id"] not in claimed
        ]
        if not candidates:
            return
        dropped = await member.call(
            "ack deleted",
            functools.partial(
                self._ack_deleted,
                keys=[member.stream],
                args=[member.group, member.name, *candidates],
            ),
        )
        if dropped:
            logger.warning(
                "%r: %d pending entries were deleted from the stream before anyone "
                "finished them; acknowledged them",
                member,
                dropped,
            )
