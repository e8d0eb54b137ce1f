"""stop() and request_stop() take the same ``hard`` choice."""

from __future__ import annotations

from typing import Any

import anyio
import redis.asyncio

from helpers import pending
from redcurrent import Message, StartFrom, StopReason, StreamConsumer, Topic


async def test_hard_stop_cancels_running_handlers_and_keeps_them_pending(
    redis_client: redis.asyncio.Redis,
) -> None:
    consumer = StreamConsumer(
        redis_client,
        "life",
        "g",
        "c",
        start=StartFrom.EARLIEST,
        block=0.1,
        shutdown_timeout=3600,  # a graceful stop would wait this long
    )
    started = anyio.Event()
    cancelled: list[str] = []

    @consumer.handler("t")
    async def forever(msg: Message[Any]) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append(msg.id)
            raise

    [entry_id] = await Topic(redis_client, "life").publish_many([("t", {})])
    async with consumer:
        await started.wait()
        with anyio.fail_after(10):
            assert await consumer.stop(hard=True) is StopReason.STOPPED
    assert cancelled == [entry_id]
    assert [row[0] for row in await pending(redis_client, "life", "g")] == [entry_id]
    assert consumer.stats.handled == 0
