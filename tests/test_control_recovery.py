"""After a Redis restart the control listener is back as soon as the work loops
are: a stop sent once the consumer handles messages again acts at once, not
after a backoff grown on the dead connections left in the pool."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import redis.asyncio

from helpers import Recorder, wait_until
from redcurrent import Message, StartFrom, StreamConsumer, Topic
from redcurrent.testing import RedisServer

STREAM = "orders"
GROUP = "workers"

pytestmark = pytest.mark.private_server


@pytest.mark.parametrize("down", [0.0, 4.0])
async def test_stop_acts_promptly_after_redis_restarts(
    private_redis: RedisServer, down: float
) -> None:
    client = redis.asyncio.Redis.from_url(private_redis.url)
    seen = Recorder()
    started = anyio.Event()
    cancelled: list[str] = []
    consumer = StreamConsumer(
        client,
        STREAM,
        GROUP,
        "c1",
        start=StartFrom.EARLIEST,
        concurrency=8,
        block=0.3,
        shutdown_timeout=1.0,
    )

    @consumer.handler("job")
    async def job(msg: Message[Any]) -> None:
        seen.record(msg)

    @consumer.handler("slow")
    async def slow(msg: Message[Any]) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        except BaseException:
            cancelled.append(msg.id)
            raise

    try:
        async with consumer:
            # Several pooled connections, all dead after the restart.
            await Topic(client, STREAM).publish_many([("job", {"n": i}) for i in range(200)])
            await seen.wait_for(200)
            await anyio.to_thread.run_sync(private_redis.kill)
            await anyio.sleep(down)  # the outage itself, long enough for backoffs to grow
            await anyio.to_thread.run_sync(private_redis.restart)
            async with redis.asyncio.Redis.from_url(private_redis.url) as fresh:
                topic = Topic(fresh, STREAM)
                # The work loops are back once a new message is handled.
                await topic.publish("job", {"n": "after"})
                await seen.wait_for(201, timeout=20)
                slow_id = await topic.publish("slow", {})
                with anyio.fail_after(10):
                    await started.wait()
                await topic.stop_message(slow_id)
                # Promptly: well within one default resync interval (5 s).
                await wait_until(lambda: cancelled == [slow_id], timeout=2.5)
                assert consumer.stop_reason is None
    finally:
        await client.aclose()
