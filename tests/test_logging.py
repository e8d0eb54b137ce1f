"""Log records carry what an operator greps for: the message id."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis.asyncio as aredis

from helpers import wait_until
from redcurrent import Message, StartFrom, StreamConsumer, Topic


async def test_failures_and_dead_letters_are_logged_with_the_message_id(
    redis_client: aredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    topic = Topic(redis_client, "logs")
    failing = await topic.publish("job", {})
    unknown = await topic.publish("nobody", {})
    consumer = StreamConsumer(
        redis_client, "logs", "g", start=StartFrom.EARLIEST, claim_idle=0.3, max_deliveries=1
    )

    @consumer.handler("job")
    async def handle(msg: Message[Any]) -> None:
        raise ValueError("boom")

    with caplog.at_level(logging.INFO, logger="redcurrent"):
        async with consumer:
            await wait_until(lambda: consumer.stats.dead_lettered == 2)
    by_id = {
        getattr(r, "message_id", None): r for r in caplog.records if r.levelno >= logging.ERROR
    }
    assert failing in by_id
    assert unknown in by_id
    assert "boom" in by_id[failing].getMessage()
    assert by_id[failing].name.startswith("redcurrent")
    assert "no handler for type 'nobody'" in by_id[unknown].getMessage()
