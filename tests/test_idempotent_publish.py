"""Topic.publish(..., idempotency_key=...) and keyed publish_many items against
a real server: a key appends once per window, also under concurrent retries
and across a server restart, and transient faults are retried only with a key."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import redis.asyncio
from redis.crc import key_slot

from helpers import wait_until
from redcurrent import ConfigurationError, Topic, TopicKeys
from redcurrent._topic import PUBLISH_CHUNK
from redcurrent.testing import RedisServer

STREAM = "orders"


async def entries(client: redis.asyncio.Redis, stream: str = STREAM) -> list[str]:
    return [entry_id.decode() for entry_id, _ in await client.xrange(stream)]


async def test_same_key_returns_the_first_id_and_appends_once(
    redis_client: redis.asyncio.Redis,
) -> None:
    topic = Topic(redis_client, STREAM)
    first = await topic.publish("order", {"n": 1}, idempotency_key="order-42")
    again = await topic.publish("order", {"n": 2}, idempotency_key="order-42")
    assert again == first
    assert await entries(redis_client) == [first]
    fields = (await redis_client.xrange(STREAM))[0][1]
    assert fields[b"data"] == b'{"n":1}'  # the first publish's payload stays


async def test_different_keys_append_different_entries(redis_client: redis.asyncio.Redis) -> None:
    topic = Topic(redis_client, STREAM)
    ids = [await topic.publish("order", {"n": n}, idempotency_key=f"order-{n}") for n in range(5)]
    plain = await topic.publish("order", {"n": 5})
    assert len(set(ids)) == 5
    assert await entries(redis_client) == [*ids, plain]


async def test_a_key_is_forgotten_after_the_window(redis_client: redis.asyncio.Redis) -> None:
    topic = Topic(redis_client, STREAM, idempotency_window=0.3)
    first = await topic.publish("order", {"n": 1}, idempotency_key="order-42")
    memory = topic.keys.idempotency("order-42")
    assert 0 < await redis_client.pttl(memory) <= 300

    async def forgotten() -> bool:
        return bool(await redis_client.pttl(memory) == -2)  # the key expired

    await wait_until(forgotten, timeout=10)
    second = await topic.publish("order", {"n": 2}, idempotency_key="order-42")
    assert second != first
    assert await entries(redis_client) == [first, second]


async def test_publish_many_with_keys_and_duplicates_inside_one_call(
    redis_client: redis.asyncio.Redis,
) -> None:
    topic = Topic(redis_client, STREAM)
    earlier = await topic.publish("order", {"n": 0}, idempotency_key="a")
    ids = await topic.publish_many(
        [
            ("order", {"n": 1}, None, "a"),  # published before this call
            ("order", {"n": 2}, None, "b"),
            ("order", {"n": 3}),  # today's shapes still work, unkeyed
            ("order", {"n": 4}, {"m": "x"}),
            ("order", {"n": 5}, None, None),  # a None key: not keyed
            ("order", {"n": 6}, None, "b"),  # a duplicate inside the call
        ]
    )
    assert ids[0] == earlier
    assert ids[5] == ids[1]
    assert len({earlier, *ids[1:5]}) == 5
    assert await entries(redis_client) == [earlier, *ids[1:5]]


async def test_publish_many_keys_span_chunks(redis_client: redis.asyncio.Redis) -> None:
    """Keys repeat across chunk boundaries (one script call per chunk)."""
    topic = Topic(redis_client, STREAM)
    count = 2 * PUBLISH_CHUNK + 10
    distinct = PUBLISH_CHUNK // 2 + 3
    ids = await topic.publish_many(
        ("job", {"n": n}, None, f"k{n % distinct}") for n in range(count)
    )
    assert len(ids) == count
    assert all(ids[n] == ids[n % distinct] for n in range(count))
    assert await entries(redis_client) == ids[:distinct]


async def test_concurrent_publishes_of_one_key_append_once(
    redis_client: redis.asyncio.Redis,
) -> None:
    topic = Topic(redis_client, STREAM)
    results: list[str] = []

    async def publish(n: int) -> None:
        results.append(await topic.publish("order", {"try": n}, idempotency_key="order-42"))

    async with anyio.create_task_group() as tg:
        for n in range(50):
            tg.start_soon(publish, n)
    assert len(results) == 50
    assert len(set(results)) == 1
    assert await entries(redis_client) == results[:1]


async def test_terminate_forgets_the_keys(redis_client: redis.asyncio.Redis) -> None:
    topic = Topic(redis_client, STREAM)
    first = await topic.publish("order", None, idempotency_key="order-42")
    await topic.terminate()
    assert await redis_client.exists(topic.keys.idempotency_epoch) == 0
    second = await topic.publish("order", None, idempotency_key="order-42")
    # Appended again (the id may even repeat: a re-created stream can reuse the
    # millisecond of the terminated one's last entry).
    assert await entries(redis_client) == [second]
    assert first  # the first publish did return an id
    assert await topic.publish("order", None, idempotency_key="order-42") == second


async def test_maxlen_applies_to_keyed_publishes(redis_client: redis.asyncio.Redis) -> None:
    topic = Topic(redis_client, STREAM)
    await topic.publish_many([("job", n, None, f"k{n}") for n in range(300)], maxlen=10)
    await topic.publish("job", 300, idempotency_key="k300", maxlen=10)
    assert await redis_client.xlen(STREAM) < 300


@pytest.mark.parametrize("window", [0, -1, float("nan"), float("inf"), True, "60", None])
def test_a_bad_window_is_refused(redis_client: redis.asyncio.Redis, window: Any) -> None:
    with pytest.raises(ConfigurationError, match="idempotency_window"):
        Topic(redis_client, STREAM, idempotency_window=window)


@pytest.mark.parametrize("key", ["", b"order-42", 42, "\ud800"])
async def test_a_bad_key_is_refused_before_anything_is_sent(
    redis_client: redis.asyncio.Redis, key: Any
) -> None:
    topic = Topic(redis_client, STREAM)
    with pytest.raises(ConfigurationError, match="idempotency_key"):
        await topic.publish("order", None, idempotency_key=key)
    with pytest.raises(ConfigurationError, match="publish_many item 1: idempotency_key"):
        await topic.publish_many([("order", None, None, "ok"), ("order", None, None, key)])
    assert await redis_client.exists(STREAM) == 0


@pytest.mark.parametrize(
    "stream", ["orders", "a{b}c", "{orders}x", "}{", "名前{ストリーム}", "x" * 300]
)
@pytest.mark.parametrize("key", ["order-42", "{other}", "a:b:c", "😀", "}"])
def test_remembered_keys_stay_in_the_stream_slot(stream: str, key: str) -> None:
    keys = TopicKeys(stream)
    want = key_slot(stream.encode())
    assert key_slot(keys.idempotency(key).encode()) == want
    assert key_slot(keys.idempotency_epoch.encode()) == want
    assert keys.idempotency_epoch in keys.owned()


def test_remembered_keys_of_two_streams_sharing_a_tag_never_meet() -> None:
    """``a{b}`` with key ``x:idem:y`` and ``a{b}:idem:x`` with key ``y``."""
    one, other = TopicKeys("a{b}"), TopicKeys("a{b}:idem:x")
    assert one.idempotency("x:idem:y") != other.idempotency("y")
    assert one.idempotency("dead") not in other.owned()
    assert set(TopicKeys("a{b}:idem:dead:4").owned()).isdisjoint(
        {one.idempotency("dead"), one.idempotency_epoch}
    )


# -- faults ---------------------------------------------------------------------------


@pytest.fixture
async def private_client(private_redis: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(private_redis.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.mark.private_server
async def test_a_keyed_publish_retries_a_stale_connection_after_a_restart(
    private_redis: RedisServer,
    private_client: redis.asyncio.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="redcurrent.publish")
    topic = Topic(private_client, STREAM)
    before = await topic.publish("order", {"n": 1}, idempotency_key="order-1")
    private_redis.kill()
    private_redis.restart()  # the pooled connection is now stale
    after = await topic.publish("order", {"n": 2}, idempotency_key="order-2")
    retried = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert retried, "the stale connection should have been met and retried"
    assert "ConnectionError" in retried[0].getMessage()
    # The remembered key survived the restart (AOF) and still answers.
    assert await topic.publish("order", {"n": 1}, idempotency_key="order-1") == before
    assert await entries(private_client) == [before, after]


@pytest.mark.private_server
async def test_a_publish_without_a_key_is_not_retried(
    private_redis: RedisServer, private_client: redis.asyncio.Redis
) -> None:
    topic = Topic(private_client, STREAM)
    first = await topic.publish("order", {"n": 1})
    private_redis.kill()
    private_redis.restart()
    with pytest.raises(redis.exceptions.ConnectionError):
        await topic.publish("order", {"n": 2})
    # A chunk with an unkeyed item is not retried either.
    second = await topic.publish("order", {"n": 3})
    private_redis.kill()
    private_redis.restart()
    with pytest.raises(redis.exceptions.ConnectionError):
        await topic.publish_many([("order", {"n": 4}, None, "k"), ("order", {"n": 5})])
    assert await entries(private_client) == [first, second]


@pytest.mark.private_server
async def test_a_timed_out_keyed_publish_is_retried_and_appends_once(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The server stalls (SIGSTOP) with the publish in its socket buffer: the
    reply is lost to the client's timeout, the request still runs once the
    server resumes, and so does the retry. One entry, and the caller gets its id."""
    caplog.set_level(logging.INFO, logger="redcurrent.publish")
    admin = redis.asyncio.Redis.from_url(private_redis.url)
    client = redis.asyncio.Redis.from_url(private_redis.url, socket_timeout=0.2)
    pid = private_redis.pid
    assert pid is not None
    try:
        topic = Topic(client, STREAM)
        warm_up = await topic.publish("warm-up", None, idempotency_key="warm-up")
        calls_before = (await admin.info("commandstats"))["cmdstat_evalsha"]["calls"]
        published: list[str] = []

        async def publish() -> None:
            published.append(await topic.publish("order", None, idempotency_key="order-42"))

        def timed_out() -> bool:
            return any("TimeoutError" in r.getMessage() for r in caplog.records)

        os.kill(pid, signal.SIGSTOP)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(publish)
                await wait_until(timed_out, timeout=10)
                os.kill(pid, signal.SIGCONT)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await entries(admin) == [warm_up, *published]
        # The lost request ran, and so did a retry: the repeat appended nothing.
        calls = (await admin.info("commandstats"))["cmdstat_evalsha"]["calls"]
        assert calls - calls_before >= 2
    finally:
        await client.aclose()
        await admin.aclose()
