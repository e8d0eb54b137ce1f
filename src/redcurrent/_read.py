"""The XREADGROUP ``>`` loop: new entries, blocking, never busy-polling."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ._dispatch import Dispatcher
from ._redis import AnyRedis, entries_of, raw_reply_client

__all__ = ["Reader"]

Call = Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]]


class Reader:
    """Reads one stream for one consumer; an idle consumer sends about one
    command per ``block`` seconds."""

    def __init__(
        self,
        redis: AnyRedis,
        stream: str,
        group: str,
        consumer: str,
        dispatcher: Dispatcher,
        call: Call,
        *,
        block: float,
        count: int,
    ) -> None:
        # Replies come back as the parser's lists: entries_of builds the dicts once.
        self._redis = raw_reply_client(redis, "XREADGROUP")
        self._dispatcher = dispatcher
        self._call = call
        self._count = count
        self._args_head = ("XREADGROUP", "GROUP", group, consumer, "COUNT")
        self._args_tail = ("BLOCK", max(1, int(block * 1000)), "STREAMS", stream, ">")

    async def run(self) -> None:
        dispatcher = self._dispatcher
        execute = self._redis.execute_command
        head, tail = self._args_head, self._args_tail
        while True:
            n = min(self._count, await dispatcher.wait_for_space())
            reply = await self._call("XREADGROUP", lambda n=n: execute(*head, n, *tail))  # type: ignore[misc]
            entries = entries_of(reply)
            if entries:
                dispatcher.submit(entries)
