"""Checked by ``mypy --strict`` (nox lint), never run: the public API keeps types.

Decorators return the handler unchanged, ``model=`` handlers see typed
payloads, and every value users read is typed.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
import redis.asyncio as aredis
from typing_extensions import assert_type

from redcurrent import (
    BatchConfig,
    CleanupPolicy,
    ConsumerStats,
    DeadLetter,
    Message,
    StartFrom,
    StopReason,
    StreamConsumer,
    Topic,
    TopicInfo,
)


class Email(msgspec.Struct):
    to: str


async def check(r: aredis.Redis) -> None:
    topic = Topic(r, "orders")
    assert_type(await topic.publish("email", {"to": "a"}), str)
    assert_type(await topic.publish_many([("email", {}), ("sms", {}, {"k": "v"})]), list[str])
    assert_type(await topic.info(), TopicInfo)
    assert_type(await topic.cleanup(CleanupPolicy(min_retention=0)), int)
    assert_type(await topic.dead_letters(), list[DeadLetter])
    assert_type(await topic.replay_dead_letters(), list[str])

    consumer = StreamConsumer(
        r, "orders", "g", start=StartFrom.EARLIEST, batch=BatchConfig(size=5, timeout=1.0)
    )

    @consumer.handler("email", model=Email)
    async def send(msg: Message[Email]) -> None:
        assert_type(msg.data, Email)
        assert_type(msg.data.to, str)
        assert_type(msg.metadata, dict[str, str])
        assert_type(msg.delivery_count, int)

    # The decorator hands back the function itself, type and all.
    keep: Callable[[Message[Email]], Coroutine[Any, Any, None]] = send
    del keep

    @consumer.batch_handler("sms", size=10)
    async def sms(msgs: list[Message[Any]]) -> None:
        assert_type(msgs[0].id, str)

    assert_type(consumer.stats, ConsumerStats)
    assert_type(consumer.stop_reason, StopReason | None)
    assert_type(await consumer.done(), StopReason)
    assert_type(await consumer.run(), StopReason)
