"""The XREADGROUP ``>`` loop: new entries, blocking, never busy-polling.

When the prefetch budget is full of acknowledgements waiting to be sent, they
ride along: they go in the same round trip as the next read, ahead of it, so
the room they hold is free for that very read instead of one round trip later.
"""

from __future__ import annotations

import time
from typing import Any

from ._ack import Acker
from ._claim import recover_own_pending
from ._inflight import InFlight, Submit
from ._member import GroupMember
from ._redis import entries_of, packed_pipeline, raw_reply_client

__all__ = ["Reader"]


class Reader:
    """Reads one stream for one consumer; an idle consumer sends about one
    command per ``block`` seconds."""

    def __init__(
        self,
        member: GroupMember,
        inflight: InFlight,
        submit: Submit,
        *,
        block: float,
        count: int,
        acker: Acker | None = None,
    ) -> None:
        # Replies come back as the parser's lists: entries_of builds the dicts once.
        self._redis = raw_reply_client(member.redis, "XREADGROUP")
        self._inflight = inflight
        self._submit = submit
        self._member = member
        self._acker = acker
        self._call = member.call
        self._count = count
        # Names encoded as the client encodes them (the packed path sends bytes as they are).
        encode = member.redis.get_encoder().encode
        stream, group, name = encode(member.stream), encode(member.group), encode(member.name)
        self._args_head = ("XREADGROUP", "GROUP", group, name, "COUNT")
        self._args_tail = ("BLOCK", max(1, int(block * 1000)), "STREAMS", stream, ">")
        self._ack_head = ("XACK", stream, group)
        # Acks ahead of a read: hundreds of ids, packed by hiredis (see
        # packed_pipeline); replies raw, as from ``self._redis``.
        self._with_acks = packed_pipeline(self._redis)
        #: how many times the read in progress was sent (>1: retried after an error).
        self._attempts = 0

    async def run(self) -> None:
        inflight, submit, member, acker = self._inflight, self._submit, self._member, self._acker
        while True:
            n = await inflight.reserve(self._count, reader=True)
            # Only when this read needs their room: a lone XREADGROUP is
            # cheaper, which matters at low rates (latency). Taking them gives
            # their room back: they are sent ahead of the read below.
            ids = acker.take() if acker is not None and inflight.free() < 0 else []
            since = time.monotonic()
            self._attempts = 0
            try:
                reply = await self._call("XREADGROUP", lambda n=n, ids=ids: self._read(n, ids))  # type: ignore[misc]
            except BaseException:
                if ids:
                    assert acker is not None
                    acker.put_back(ids)
                raise
            try:
                entries = entries_of(reply)
                if entries:
                    member.last_read = entries[-1][0]
                    inflight.delivered(since)
                    submit(entries, None)
            finally:
                inflight.unreserve(n)
            if self._attempts > 1:
                # A read failed first: the server may have delivered entries
                # whose reply never arrived (a closed connection, a failover).
                # They sit in our pending list; take them now rather than
                # after claim_idle. Acks waiting to be sent go first: their
                # entries are still listed, and done.
                if acker is not None:
                    await acker.flush()
                await recover_own_pending(member, inflight, submit)

    async def _read(self, n: int, ids: list[bytes]) -> Any:
        self._attempts += 1
        if self._attempts > 1:
            # Retried after an error: no blocking read now (its wait would
            # delay what the failed one may have delivered); the acks still go.
            if ids:
                await self._redis.execute_command(*self._ack_head, *ids)
            return None
        if not ids:
            return await self._redis.execute_command(*self._args_head, n, *self._args_tail)
        replies = await self._with_acks(
            (*self._ack_head, *ids), (*self._args_head, n, *self._args_tail)
        )
        return replies[1]
