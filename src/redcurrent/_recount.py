"""Delivery counters written back for stopped and resumed messages.

A stopped message is parked with the delivery that brought it taken back, and
a resumed one has it counted again, so that deliveries made while it was
stopped never push it towards ``max_deliveries``. :class:`InFlight` notes the
counters; this loop writes them to the group's PEL soon after.
"""

from __future__ import annotations

import functools

from ._inflight import InFlight
from ._member import GroupMember
from ._scripts import SET_DELIVERY_COUNTS

__all__ = ["Recounter"]


class Recounter:
    def __init__(self, member: GroupMember, inflight: InFlight) -> None:
        self._script = member.redis.register_script(SET_DELIVERY_COUNTS)
        self._member = member
        self._inflight = inflight

    async def run(self) -> None:
        while True:
            await self._inflight.recount_wanted()
            await self.flush()

    async def flush(self) -> None:
        inflight, member = self._inflight, self._member
        while pairs := inflight.take_recounts():
            args: list[bytes | str | int] = [member.group, member.name]
            for raw_id, count in pairs.items():
                args += (raw_id, count)
            await member.call(
                "delivery count",
                functools.partial(self._script, keys=[member.stream], args=args),
            )
