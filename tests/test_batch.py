"""Batch handlers: size, timeout, grouping by type, failures, mixed with singles."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest
import redis.asyncio as aredis

from helpers import wait_until as until
from redcurrent import BatchConfig, BatchError, Message, StartFrom, StreamConsumer, Topic
from redcurrent.errors import ConfigurationError

FAST: dict[str, Any] = {"claim_idle": 0.4, "block": 0.2, "shutdown_timeout": 1.0}


def consumer_for(redis_client: aredis.Redis, **kwargs: Any) -> StreamConsumer:
    options = {**FAST, **kwargs}
    return StreamConsumer(redis_client, "b", "g", start=StartFrom.EARLIEST, **options)


async def test_size_is_honoured_across_reads(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "b")
    consumer = consumer_for(redis_client)
    batches: list[list[int]] = []

    @consumer.batch_handler("job", size=4, timeout=30)
    async def handle(msgs: list[Message[Any]]) -> None:
        batches.append([m.data["n"] for m in msgs])

    async with consumer:
        # One entry per publish: each read returns one entry, so batches must
        # be accumulated across reads, not taken from one reply.
        for n in range(12):
            await topic.publish("job", {"n": n})
        await until(lambda: sum(map(len, batches)) == 12)
    assert [len(b) for b in batches] == [4, 4, 4]
    assert sorted(n for b in batches for n in b) == list(range(12))


async def test_the_tail_is_flushed_after_the_timeout(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "b")
    consumer = consumer_for(redis_client, batch=BatchConfig(size=100, timeout=0.2))
    batches: list[int] = []
    handed = anyio.Event()

    @consumer.batch_handler("job")
    async def handle(msgs: list[Message[Any]]) -> None:
        batches.append(len(msgs))
        handed.set()

    async with consumer:
        await topic.publish_many([("job", {"n": n}) for n in range(7)])
        began = anyio.current_time()
        with anyio.fail_after(5):
            await handed.wait()
        waited = anyio.current_time() - began
    assert batches == [7]
    assert waited >= 0.15  # it waited for more before giving up on the size


async def test_grouped_by_type_and_mixed_with_single_handlers(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "b")
    consumer = consumer_for(redis_client, batch=BatchConfig(size=3, timeout=0.2))
    seen: dict[str, list[list[str]]] = {"sms": [], "push": []}
    singles: list[str] = []

    @consumer.batch_handler("sms")
    async def sms(msgs: list[Message[Any]]) -> None:
        seen["sms"].append([m.type for m in msgs])

    @consumer.batch_handler("push", size=2)
    async def push(msgs: list[Message[Any]]) -> None:
        seen["push"].append([m.type for m in msgs])

    @consumer.handler("email")
    async def email(msg: Message[Any]) -> None:
        singles.append(msg.type)

    items = [("sms", {}), ("push", {}), ("email", {})] * 4 + [("nobody", {})]
    async with consumer:
        await topic.publish_many(items)
        await until(lambda: len(singles) == 4 and consumer.stats.dead_lettered == 1)
        await until(lambda: sum(map(len, seen["sms"])) == 4 and sum(map(len, seen["push"])) == 4)
    assert all(set(b) == {"sms"} for b in seen["sms"])
    assert all(set(b) == {"push"} for b in seen["push"])
    assert max(map(len, seen["sms"])) == 3
    assert max(map(len, seen["push"])) == 2
    letters = await topic.dead_letters()
    assert [d.type for d in letters] == ["nobody"]


async def test_failure_leaves_the_batch_pending_then_retries(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "b")
    consumer = consumer_for(redis_client)
    calls: list[list[int]] = []

    @consumer.batch_handler("job", size=3, timeout=0.1)
    async def handle(msgs: list[Message[Any]]) -> None:
        calls.append([m.delivery_count for m in msgs])
        if len(calls) == 1:
            raise RuntimeError("downstream unavailable")

    async with consumer:
        await topic.publish_many([("job", {"n": n}) for n in range(3)])
        await until(lambda: consumer.stats.handled == 3)
    assert calls[0] == [1, 1, 1]
    assert calls[-1] == [2, 2, 2]
    assert (await redis_client.xpending("b", "g"))["pending"] == 0


async def test_partial_failure_acks_the_rest(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "b")
    consumer = consumer_for(redis_client, max_deliveries=2)
    calls: list[list[str]] = []
    ids = await topic.publish_many([("job", {"n": n}) for n in range(4)])
    bad = ids[1]

    @consumer.batch_handler("job", size=4, timeout=0.1)
    async def handle(msgs: list[Message[Any]]) -> None:
        calls.append([m.id for m in msgs])
        if any(m.id == bad for m in msgs):
            raise BatchError([bad], "row 1 rejected")

    async with consumer:
        await until(lambda: consumer.stats.dead_lettered == 1, timeout=5)
    assert calls[0] == ids
    assert calls[1:] == [[bad]]  # only the failed one came back, then gave up
    assert consumer.stats.handled == 3
    letters = await topic.dead_letters()
    assert [(d.original_id, d.error_type) for d in letters] == [(bad, "BatchError")]
    assert "row 1 rejected" in letters[0].reason
    assert (await redis_client.xpending("b", "g"))["pending"] == 0


async def test_register_batch_with_size_zero_takes_the_config_size(
    redis_client: aredis.Redis,
) -> None:
    topic = Topic(redis_client, "b")
    consumer = consumer_for(redis_client, batch=BatchConfig(size=5, timeout=30))
    sizes: list[int] = []

    class Sender:
        message_type = "job"
        batch_size = 0

        async def handle_batch(self, msgs: list[Message[Any]]) -> None:
            sizes.append(len(msgs))

    consumer.register_batch(Sender())
    async with consumer:
        await topic.publish_many([("job", {}) for _ in range(10)])
        await until(lambda: sum(sizes) == 10)
    assert sizes == [5, 5]


async def test_typed_batches_and_invalid_entries(redis_client: aredis.Redis) -> None:
    class Row(msgspec.Struct):
        n: int

    topic = Topic(redis_client, "b")
    consumer = consumer_for(redis_client)
    rows: list[Row] = []

    @consumer.batch_handler("row", size=3, timeout=0.1, model=Row)
    async def handle(msgs: list[Message[Row]]) -> None:
        rows.extend(m.data for m in msgs)

    async with consumer:
        await topic.publish_many([("row", {"n": 1}), ("row", {"n": "x"}), ("row", {"n": 3})])
        await until(lambda: len(rows) == 2 and consumer.stats.dead_lettered == 1)
    assert [r.n for r in rows] == [1, 3]
    (letter,) = await topic.dead_letters()
    assert letter.error_type == "ValidationError"
    assert "$.n" in letter.reason


async def test_partial_batches_are_handed_back_on_stop(redis_client: aredis.Redis) -> None:
    """A batch not started when the stop comes is let go, not run: its
    messages stay pending, handed back, so a peer (or the same worker
    restarted) takes them at once."""
    topic = Topic(redis_client, "b")
    consumer = consumer_for(redis_client)
    got: list[int] = []

    @consumer.batch_handler("job", size=100, timeout=60)
    async def handle(msgs: list[Message[Any]]) -> None:
        got.append(len(msgs))

    async with consumer:
        await topic.publish_many([("job", {}) for _ in range(5)])
        await until(lambda: consumer.stats.received == 5)
    assert got == []
    rows = await redis_client.xpending_range("b", "g", "-", "+", 10)
    assert len(rows) == 5
    assert min(r["time_since_delivered"] for r in rows) >= 30_000  # claimable at once

    peer = consumer_for(redis_client)
    peer.batch_handler("job", size=5, timeout=60)(handle)
    async with peer:
        await until(lambda: got == [5])
    assert (await redis_client.xpending("b", "g"))["pending"] == 0


def test_invalid_batch_options_are_rejected(redis_client: aredis.Redis) -> None:
    consumer = StreamConsumer(redis_client, "b", "g")
    with pytest.raises(ConfigurationError):
        consumer.batch_handler("job", size=0)(_noop)
    with pytest.raises(ConfigurationError):
        BatchConfig(size=0)
    with pytest.raises(ConfigurationError):
        BatchConfig(timeout=0)
    consumer.handler("dup")(_noop)
    with pytest.raises(ConfigurationError):
        consumer.batch_handler("dup")(_noop)


async def _noop(_: Any) -> None:
    return None
