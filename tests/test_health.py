"""``consumer.health()`` for probes, and the consumer's names on its log records."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis.asyncio as aredis

from helpers import wait_until
from redcurrent import ConsumerHealth, Message, StartFrom, StopReason, StreamConsumer, Topic
from redcurrent.testing import RedisServer


def _consumer(client: aredis.Redis, **options: Any) -> StreamConsumer:
    consumer = StreamConsumer(
        client, "health", "g", "c1", start=StartFrom.EARLIEST, block=0.2, **options
    )

    @consumer.handler("job")
    async def handle(msg: Message[Any]) -> None:
        return None

    return consumer


async def test_health_follows_the_consumer_from_start_to_stop(redis_client: aredis.Redis) -> None:
    consumer = _consumer(redis_client)
    before = consumer.health()
    assert before == ConsumerHealth(
        healthy=False,
        running=False,
        stop_reason=None,
        outage_seconds=None,
        last_contact_seconds=None,
    )
    async with consumer:
        now = consumer.health()
        assert now.healthy
        assert now.running
        assert now.outage_seconds is None
        assert now.last_contact_seconds is not None
        assert now.last_contact_seconds < 5
        await consumer.stop()
    after = consumer.health()
    assert not after.healthy
    assert not after.running
    assert after.stop_reason is StopReason.STOPPED


@pytest.mark.private_server
async def test_an_outage_longer_than_the_tolerance_is_unhealthy(
    private_redis: RedisServer,
) -> None:
    client = aredis.Redis.from_url(private_redis.url, socket_timeout=1.0)
    consumer = _consumer(client)
    try:
        async with consumer:
            private_redis.kill()
            await wait_until(lambda: consumer.health().outage_seconds is not None, timeout=15)
            assert consumer.health(outage_tolerance=60).healthy  # a short outage is ridden out
            await wait_until(lambda: not consumer.health(outage_tolerance=0.2).healthy)
            private_redis.restart()
            await wait_until(lambda: consumer.health().outage_seconds is None, timeout=30)
            assert consumer.health(outage_tolerance=0).healthy
    finally:
        await client.aclose()


async def test_records_of_a_consumer_carry_its_names(
    redis_client: aredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    topic = Topic(redis_client, "health")
    await topic.publish("job", {})
    await topic.publish("nobody", {})  # logged at ERROR: no handler
    consumer = _consumer(redis_client, max_deliveries=1)
    with caplog.at_level(logging.DEBUG, logger="redcurrent"):
        async with consumer:
            await wait_until(lambda: consumer.stats.dead_lettered == 1)
    ours = [r for r in caplog.records if r.name == "redcurrent.consumer"]
    assert ours
    for record in ours:
        fields = (
            getattr(record, "stream", None),
            getattr(record, "group", None),
            getattr(record, "consumer", None),
        )
        assert fields == ("health", "g", "c1"), record.getMessage()
    errors = [r for r in ours if r.levelno >= logging.ERROR]
    assert errors
    assert all(getattr(r, "message_id", None) for r in errors)
