"""StreamConsumer under faults: a consumer process SIGKILLed while it holds
messages, and the Redis server killed and restarted under a running consumer."""

from __future__ import annotations

import logging
import signal
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from helpers import Recorder, nothing_pending, pending, spawn_consumer, wait_until
from redcurrent import Message, StartFrom, StreamConsumer, Topic
from redcurrent.testing import RedisServer

STREAM = "orders"
GROUP = "workers"
HELD_KEY = "test:held-by-doomed"


async def _reap(proc: subprocess.Popen[bytes]) -> str:
    """Kill the process if it still runs, wait for it, and return its output."""
    if proc.poll() is None:
        proc.kill()
    await anyio.to_thread.run_sync(proc.wait)
    assert proc.stdout is not None
    with proc.stdout:
        return proc.stdout.read().decode(errors="replace")


async def test_messages_of_a_killed_consumer_process_are_taken_over(
    redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    topic = Topic(redis_client, STREAM)
    await redis_client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ids = await topic.publish_many([("job", {"n": i}) for i in range(5)])

    proc = spawn_consumer(redis_url, STREAM, GROUP, "doomed", HELD_KEY)
    try:

        async def holds_all() -> bool:
            assert proc.poll() is None, "the consumer process exited early"
            return int(await redis_client.llen(HELD_KEY)) == len(ids)

        await wait_until(holds_all, timeout=20)
        proc.send_signal(signal.SIGKILL)
    finally:
        output = await _reap(proc)
    assert proc.returncode == -signal.SIGKILL, output
    held = sorted(m.decode() for m in await redis_client.lrange(HELD_KEY, 0, -1))
    assert held == sorted(ids)
    assert await pending(redis_client, STREAM, GROUP) == [(i, "doomed", 1) for i in ids]

    seen = Recorder()
    rescuer = StreamConsumer(
        redis_client, STREAM, GROUP, "rescuer", claim_idle=0.5, block=0.2, shutdown_timeout=1.0
    )
    rescuer.handler("job")(seen)
    async with rescuer:
        await seen.wait_for(len(ids))
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
    assert sorted(seen.ids) == sorted(ids)
    assert [m.delivery_count for m in seen.messages] == [2] * len(ids)
    assert rescuer.stats.claimed == len(ids)
    assert rescuer.stats.handled == len(ids)
    assert await topic.dead_letters() == []
    assert await redis_client.xlen(STREAM) == len(ids)


@pytest.fixture
async def private_client(private_redis: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(private_redis.url)
    try:
        yield client
    finally:
        await client.aclose()


async def _publish(topic: Topic, items: list[tuple[str, Any]]) -> list[str]:
    """Publish, retrying while the server is still coming back."""
    ids: list[str] = []

    async def attempt() -> bool:
        nonlocal ids
        try:
            ids = await topic.publish_many(items)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            return False
        return True

    await wait_until(attempt, timeout=10, interval=0.1)
    return ids


async def test_consumer_survives_redis_kill_and_restart(
    private_redis: RedisServer, private_client: redis.asyncio.Redis
) -> None:
    topic = Topic(private_client, STREAM)
    gate = anyio.Event()
    seen = Recorder()
    consumer = StreamConsumer(
        private_client,
        STREAM,
        GROUP,
        "survivor",
        start=StartFrom.EARLIEST,
        claim_idle=3.0,
        block=0.3,
        shutdown_timeout=1.0,
    )

    @consumer.handler("job")
    async def handle(msg: Message[Any]) -> None:
        if msg.data["phase"] == "in-flight":
            await gate.wait()
        seen.record(msg)

    async with consumer:
        before = await topic.publish_many([("job", {"phase": "before", "n": i}) for i in range(10)])
        await seen.wait_for(10)
        await wait_until(nothing_pending(private_client, STREAM, GROUP))

        # Five messages in the consumer's hands when the server dies; their
        # handlers finish while it is down, so their acks must wait for it.
        in_flight = await topic.publish_many(
            [("job", {"phase": "in-flight", "n": i}) for i in range(5)]
        )
        await wait_until(lambda: consumer.stats.held == 5)
        await anyio.to_thread.run_sync(private_redis.kill)
        gate.set()
        await seen.wait_for(15)
        await anyio.to_thread.run_sync(private_redis.restart)

        # The test's own client reconnects too: a fresh one, not the pool the
        # kill left with dead connections.
        async with redis.asyncio.Redis.from_url(private_redis.url) as fresh:
            topic = Topic(fresh, STREAM)
            after = await _publish(topic, [("job", {"phase": "after", "n": i}) for i in range(10)])
            await seen.wait_for(25, timeout=20)
            await wait_until(nothing_pending(fresh, STREAM, GROUP), timeout=20)
            assert consumer.stop_reason is None
            stats = consumer.stats
            assert await fresh.xlen(STREAM) == 25
            assert await topic.dead_letters() == []

    assert set(seen.ids) == {*before, *in_flight, *after}  # nothing lost
    # At-least-once: a message whose ack was lost may come twice, but the
    # counters agree with what the handler saw.
    assert stats.handled == len(seen.messages)
    assert stats.failed == 0
    assert stats.dead_lettered == 0
    assert stats.held == 0
    assert stats.received == stats.handled
    assert stats.received - stats.claimed == 25


async def test_dead_lettering_waits_out_a_redis_outage(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A message that must become a dead letter while Redis is down is moved
    once it is back; the outage does not stop the consumer."""
    caplog.set_level(logging.DEBUG, logger="redcurrent.consumer")
    # No client-side retries: every failure reaches the consumer at once.
    client = redis.asyncio.Redis.from_url(private_redis.url, retry=Retry(NoBackoff(), 0))
    entered, gate = anyio.Event(), anyio.Event()
    consumer = StreamConsumer(
        client,
        STREAM,
        GROUP,
        "unlucky",
        start=StartFrom.EARLIEST,
        claim_idle=5.0,
        block=0.3,
        max_deliveries=1,
        shutdown_timeout=1.0,
    )

    @consumer.handler("job")
    async def handle(msg: Message[Any]) -> None:
        entered.set()
        await gate.wait()
        raise ValueError("poison")

    try:
        async with consumer:
            entry_id = await Topic(client, STREAM).publish("job", {"n": 1})
            with anyio.fail_after(5):
                await entered.wait()
            await anyio.to_thread.run_sync(private_redis.kill)
            gate.set()  # the handler fails now: the move to the dead letters meets the outage

            def tried_or_stopped() -> bool:
                return consumer.stop_reason is not None or any(
                    "during dead letter move" in r.getMessage() for r in caplog.records
                )

            await wait_until(tried_or_stopped, timeout=10)
            assert consumer.stop_reason is None, consumer.error
            await anyio.to_thread.run_sync(private_redis.restart)
            async with redis.asyncio.Redis.from_url(private_redis.url) as fresh:
                topic = Topic(fresh, STREAM)
                await wait_until(lambda: consumer.stats.dead_lettered == 1, timeout=15)
                [letter] = await topic.dead_letters()
                assert letter.original_id == entry_id
                assert letter.error_type == "ValueError"
                assert await pending(fresh, STREAM, GROUP) == []
            assert consumer.stop_reason is None
    finally:
        await client.aclose()
