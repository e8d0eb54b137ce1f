"""Delayed and scheduled messages: publish(delay=/at=), cancel_scheduled, the
mover every consumer runs, against a real Redis."""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import pytest
import redis.asyncio

from helpers import Recorder, nothing_pending, wait_until
from redcurrent import ConfigurationError, StartFrom, StreamConsumer, Topic, _schedule
from redcurrent._schedule import MOVE_BATCH, MOVER_CAP, _pack
from redcurrent.testing import RedisServer

STREAM = "reminders"


def consumer_of(
    client: redis.asyncio.Redis, group: str, name: str, seen: Recorder, **options: Any
) -> StreamConsumer:
    consumer = StreamConsumer(
        client, STREAM, group, name, start=StartFrom.EARLIEST, block=0.5, **options
    )
    consumer.handler("remind")(seen)
    return consumer


async def stream_numbers(client: redis.asyncio.Redis) -> list[int]:
    """The ``n`` of every entry in the stream, in stream order."""
    return [json.loads(fields[b"data"])["n"] for _, fields in await client.xrange(STREAM)]


@pytest.fixture
async def private_client(private_redis: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(private_redis.url)
    try:
        yield client
    finally:
        await client.aclose()


# -- arguments ------------------------------------------------------------------------


async def test_bad_when_is_refused_before_anything_is_sent(
    redis_client: redis.asyncio.Redis,
) -> None:
    topic = Topic(redis_client, STREAM)
    naive = datetime.now() + timedelta(seconds=5)  # naive: the point of the test
    bad: list[dict[str, Any]] = [
        {"at": naive},
        {"delay": 1, "at": time.time() + 1},
        {"delay": -1},
        {"delay": math.nan},
        {"delay": "5"},
        {"delay": True},
        {"at": -5},
        {"delay": 1, "maxlen": 10},
        {"delay": 1, "idempotency_key": "k"},
    ]
    for options in bad:
        with pytest.raises(ConfigurationError):
            await topic.publish("remind", {"n": 0}, **options)
    with pytest.raises(ConfigurationError):
        await topic.publish_many([("remind", {"n": 0})], at=naive)
    with pytest.raises(ConfigurationError):
        await topic.publish_many([("remind", {"n": 0}, None, "key")], delay=1)
    with pytest.raises(ConfigurationError):
        await topic.cancel_scheduled(17)  # type: ignore[arg-type]
    info = await topic.info()
    assert (info.length, info.scheduled) == (0, 0)


# -- delivery -------------------------------------------------------------------------


async def test_delay_and_at_are_delivered_when_due(redis_client: redis.asyncio.Redis) -> None:
    topic = Topic(redis_client, STREAM)
    seen = Recorder()
    async with consumer_of(redis_client, "g", "c1", seen):
        start = time.time()
        by_delay = await topic.publish("remind", {"n": 1}, {"k": "v"}, delay=0.6)
        aware = datetime.now(timezone.utc) + timedelta(seconds=0.6)
        by_datetime = await topic.publish("remind", {"n": 2}, at=aware)
        by_epoch = await topic.publish("remind", {"n": 3}, at=time.time() + 0.6)
        ids = [by_delay, by_datetime, by_epoch]
        assert all(isinstance(i, str) for i in ids)
        assert len(set(ids)) == 3
        info = await topic.info()
        assert info.scheduled + info.length == 3
        await seen.wait_for(3, timeout=10)
        arrived = time.time()
    assert sorted(m.data["n"] for m in seen.messages) == [1, 2, 3]
    assert next(m for m in seen.messages if m.data["n"] == 1).metadata == {"k": "v"}
    # Not before they were due: an entry's id is the (server's) time it was
    # moved, and the server runs on this host.
    assert all(int(m.id.split("-")[0]) / 1000 >= start + 0.5 for m in seen.messages)
    assert arrived >= start + 0.5
    info = await topic.info()
    assert (info.scheduled, info.length) == (0, 3)


async def test_due_messages_enter_the_stream_in_due_order(
    redis_client: redis.asyncio.Redis,
) -> None:
    """Scheduled in reverse, all due already when a consumer starts: the
    stream holds them by due time; ties (one publish_many) keep their order."""
    topic = Topic(redis_client, STREAM)
    base = time.time() - 60
    for n in reversed(range(10)):
        await topic.publish("remind", {"n": n}, at=base + n)
    await topic.publish_many([("remind", {"n": n}) for n in range(10, 20)], at=base + 30)
    assert (await topic.info()).scheduled == 20
    seen = Recorder()
    async with consumer_of(redis_client, "g", "c1", seen, concurrency=1):
        await seen.wait_for(20)
    assert await stream_numbers(redis_client) == list(range(20))
    assert [m.data["n"] for m in seen.messages] == list(range(20))


async def test_each_group_gets_a_scheduled_message_once_while_movers_race(
    redis_client: redis.asyncio.Redis,
) -> None:
    """Three consumers in two groups all run the mover; every message enters
    the stream once, and each group handles it once."""
    topic = Topic(redis_client, STREAM)
    first, second = Recorder(), Recorder()
    consumers = [
        consumer_of(redis_client, "g1", "a", first),
        consumer_of(redis_client, "g1", "b", first),
        consumer_of(redis_client, "g2", "c", second),
    ]
    count = 300
    async with consumers[0], consumers[1], consumers[2]:
        ids: list[str] = []
        for chunk in range(10):  # due times spread over about a second
            ids += await topic.publish_many(
                [("remind", {"n": chunk * 30 + i}) for i in range(30)], delay=0.1 * chunk
            )
        assert len(set(ids)) == count
        await first.wait_for(count, timeout=20)
        await second.wait_for(count, timeout=20)
        await wait_until(nothing_pending(redis_client, STREAM, "g1"))
        await wait_until(nothing_pending(redis_client, STREAM, "g2"))
    assert sorted(m.data["n"] for m in first.messages) == list(range(count))
    assert sorted(m.data["n"] for m in second.messages) == list(range(count))
    assert sorted(await stream_numbers(redis_client)) == list(range(count))
    assert (await topic.info()).scheduled == 0


async def test_scheduled_while_no_consumer_runs_arrives_when_one_starts(
    redis_client: redis.asyncio.Redis,
) -> None:
    topic = Topic(redis_client, STREAM)
    seen = Recorder()
    async with consumer_of(redis_client, "g", "c1", seen):
        pass  # the group exists; now nobody runs
    await topic.publish("remind", {"n": 7}, delay=0.2)
    await anyio.sleep(0.4)  # past the due time we set
    assert (await topic.info()).scheduled == 1
    assert await redis_client.xlen(STREAM) == 0  # nobody moved it
    async with consumer_of(redis_client, "g", "c1", seen):
        await seen.wait_for(1)
    assert [m.data["n"] for m in seen.messages] == [7]
    assert (await topic.info()).scheduled == 0


async def test_an_earlier_message_wakes_a_sleeping_mover(
    redis_client: redis.asyncio.Redis,
) -> None:
    """With only a far-off message waiting the mover sleeps its cap (5 s); a
    message due sooner is announced and arrives about when due, not at the
    end of that sleep."""
    topic = Topic(redis_client, STREAM)
    await topic.publish("remind", {"n": 0}, delay=3600)
    seen = Recorder()
    async with consumer_of(redis_client, "g", "c1", seen):
        await topic.publish("remind", {"n": 1}, delay=0.3)
        await seen.wait_for(1, timeout=3)
    assert [m.data["n"] for m in seen.messages] == [1]
    assert (await topic.info()).scheduled == 1


# -- cancel, terminate, cleanup --------------------------------------------------------


async def test_cancel_answers_true_once(redis_client: redis.asyncio.Redis) -> None:
    topic = Topic(redis_client, STREAM)
    later = await topic.publish("remind", {"n": 1}, delay=3600)
    soon = await topic.publish("remind", {"n": 2}, delay=0)
    assert (await topic.info()).scheduled == 2
    assert await topic.cancel_scheduled(later) is True
    assert await topic.cancel_scheduled(later) is False
    assert await topic.cancel_scheduled("never-scheduled") is False
    assert (await topic.info()).scheduled == 1
    seen = Recorder()
    async with consumer_of(redis_client, "g", "c1", seen):
        await seen.wait_for(1)
        # Moved into the stream: too late to cancel.
        assert await topic.cancel_scheduled(soon) is False
    assert [m.data["n"] for m in seen.messages] == [2]


async def test_terminate_deletes_scheduled_messages_and_cleanup_keeps_them(
    redis_client: redis.asyncio.Redis,
) -> None:
    topic = Topic(redis_client, STREAM)
    await topic.publish("remind", {"n": 0})
    await topic.publish_many([("remind", {"n": n}) for n in range(5)], delay=3600)
    assert await topic.cleanup() >= 0
    assert (await topic.info()).scheduled == 5
    await topic.terminate()
    assert await redis_client.exists(topic.keys.scheduled, topic.keys.scheduled_data) == 0
    assert (await topic.info()).scheduled == 0


# -- many, restarts ---------------------------------------------------------------------


@pytest.mark.private_server
async def test_a_thousand_due_at_once_arrive_in_order_in_bounded_batches(
    private_client: redis.asyncio.Redis,
) -> None:
    topic = Topic(private_client, STREAM)
    count = 1000
    await topic.publish_many([("remind", {"n": n}) for n in range(count)], at=time.time() - 1)
    await private_client.config_resetstat()
    seen = Recorder()
    async with consumer_of(private_client, "g", "c1", seen, concurrency=1):
        await seen.wait_for(count, timeout=20)
    assert [m.data["n"] for m in seen.messages] == list(range(count))
    assert await stream_numbers(private_client) == list(range(count))
    # Every move looks up the due messages once: so many looks, so many batches.
    stats = await private_client.info("commandstats")
    assert stats["cmdstat_zrangebyscore"]["calls"] >= count / MOVE_BATCH


@pytest.mark.private_server
async def test_scheduled_messages_survive_a_redis_restart(
    private_redis: RedisServer, private_client: redis.asyncio.Redis
) -> None:
    """Kill -9 with messages waiting, some of them moved already (AOF,
    fsync always): after the restart each enters the stream exactly once."""
    topic = Topic(private_client, STREAM)
    count = 200
    seen = Recorder()
    consumer = consumer_of(private_client, "g", "c1", seen)
    async with consumer:
        for chunk in range(10):  # due from 0.2 s to 2 s from now
            await topic.publish_many(
                [("remind", {"n": chunk * 20 + i}) for i in range(20)], delay=0.2 * (chunk + 1)
            )
        await seen.wait_for(1, timeout=10)  # moving has begun
        await anyio.to_thread.run_sync(private_redis.kill)
        await anyio.to_thread.run_sync(private_redis.restart)
        async with redis.asyncio.Redis.from_url(private_redis.url) as fresh:
            await wait_until(lambda: len({m.data["n"] for m in seen.messages}) == count, 30)
            await wait_until(nothing_pending(fresh, STREAM, "g"), timeout=20)
            assert consumer.stop_reason is None
            assert sorted(await stream_numbers(fresh)) == list(range(count))
            assert (await Topic(fresh, STREAM).info()).scheduled == 0


async def test_a_decode_responses_client_schedules_and_moves(
    redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    """(``redis_client`` empties the keyspace first.)"""
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        topic = Topic(client, STREAM)
        later = await topic.publish("remind", {"n": 1}, delay=3600)
        await topic.publish("remind", {"n": 2}, delay=0.1)
        seen = Recorder()
        async with consumer_of(client, "g", "c1", seen):
            await seen.wait_for(1)
        assert [m.data["n"] for m in seen.messages] == [2]
        assert (await topic.info()).scheduled == 1
        assert await topic.cancel_scheduled(later) is True
    finally:
        await client.aclose()


async def test_a_message_whose_notice_was_lost_still_arrives(
    redis_client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written into the index without a notice (as if pub/sub had dropped
    it): a sleeping mover still finds it, at the latest after its cap (the
    idle cap, 30 s, shortened here to the cap while messages wait)."""
    monkeypatch.setattr(_schedule, "MOVER_IDLE_CAP", MOVER_CAP)
    topic = Topic(redis_client, STREAM)
    seen = Recorder()
    async with consumer_of(redis_client, "g", "c1", seen):
        server_s, server_us = await redis_client.time()
        due_ms = server_s * 1000 + server_us // 1000 + 200
        fields = (b"type", b"remind", b"data", b'{"n": 5}', b"metadata", b"{}")
        await redis_client.zadd(topic.keys.scheduled, {"quiet": due_ms})
        await redis_client.hset(topic.keys.scheduled_data, "quiet", _pack(fields))
        await seen.wait_for(1, timeout=MOVER_CAP + 5)
    assert [m.data["n"] for m in seen.messages] == [5]


async def test_publish_many_scheduled_items_keep_their_metadata(
    redis_client: redis.asyncio.Redis,
) -> None:
    topic = Topic(redis_client, STREAM)
    await topic.publish_many(
        [("remind", {"n": 1}, {"a": "b"}), ("remind", {"n": 2}, {"c": "d"}, None)], delay=0
    )
    seen = Recorder()
    async with consumer_of(redis_client, "g", "c1", seen):
        await seen.wait_for(2)
    assert sorted((m.data["n"], m.metadata) for m in seen.messages) == [
        (1, {"a": "b"}),
        (2, {"c": "d"}),
    ]
