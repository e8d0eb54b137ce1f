"""The XREADGROUP ``>`` loop: new entries, blocking, never busy-polling."""

from __future__ import annotations

from ._dispatch import Dispatcher
from ._member import GroupMember
from ._redis import entries_of, raw_reply_client

__all__ = ["Reader"]


class Reader:
    """Reads one stream for one consumer; an idle consumer sends about one
    command per ``block`` seconds."""

    def __init__(
        self,
        member: GroupMember,
        dispatcher: Dispatcher,
        *,
        block: float,
        count: int,
    ) -> None:
        # Replies come back as the parser's lists: entries_of builds the dicts once.
        self._redis = raw_reply_client(member.redis, "XREADGROUP")
        self._dispatcher = dispatcher
        self._member = member
        self._call = member.call
        self._count = count
        self._args_head = ("XREADGROUP", "GROUP", member.group, member.name, "COUNT")
        self._args_tail = ("BLOCK", max(1, int(block * 1000)), "STREAMS", member.stream, ">")

    async def run(self) -> None:
        dispatcher, member = self._dispatcher, self._member
        execute = self._redis.execute_command
        head, tail = self._args_head, self._args_tail
        while True:
            n = await dispatcher.reserve(self._count, reader=True)
            try:
                reply = await self._call("XREADGROUP", lambda n=n: execute(*head, n, *tail))  # type: ignore[misc]
                entries = entries_of(reply)
                if entries:
                    member.last_read = entries[-1][0]
                    dispatcher.submit(entries)
            finally:
                dispatcher.unreserve(n)
