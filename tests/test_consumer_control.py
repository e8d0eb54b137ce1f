"""Stopping and resuming one message, and terminating a topic, as consumers see it."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest
import redis.asyncio as aredis

from helpers import wait_until as until
from redcurrent import ConfigurationError, Message, StartFrom, StopReason, Topic
from redcurrent._consumer import StreamConsumer

FAST: dict[str, Any] = {"claim_idle": 0.5, "block": 0.2, "shutdown_timeout": 1.0}


def recording(consumer: StreamConsumer, seen: list[str], kind: str = "job") -> None:
    @consumer.handler(kind)
    async def handle(msg: Message[Any]) -> None:
        seen.append(msg.id)


async def test_stopped_before_delivery_is_skipped_by_two_groups_until_resumed(
    redis_client: aredis.Redis,
) -> None:
    topic = Topic(redis_client, "ctl")
    first = await topic.publish("job", {"n": 0})
    await topic.stop_message(first)
    second = await topic.publish("job", {"n": 1})
    seen_a: list[str] = []
    seen_b: list[str] = []
    a = StreamConsumer(redis_client, "ctl", "a", start=StartFrom.EARLIEST, **FAST)
    b = StreamConsumer(redis_client, "ctl", "b", start=StartFrom.EARLIEST, **FAST)
    recording(a, seen_a)
    recording(b, seen_b)
    async with a, b:
        await until(lambda: second in seen_a and second in seen_b)
        # Give the stopped one every chance to be (wrongly) handled: a full claim cycle.
        await anyio.sleep(FAST["claim_idle"] * 2)
        assert first not in seen_a
        assert first not in seen_b
        pending = await redis_client.xpending("ctl", "a")
        assert pending["pending"] == 1  # kept pending, not acked, not dead-lettered
        await topic.resume_message(first)
        await until(lambda: first in seen_a and first in seen_b, timeout=3.0)
    assert seen_a.count(first) == 1
    assert seen_b.count(first) == 1
    assert await redis_client.xlen(topic.keys.dead_letters) == 0


async def test_stop_while_running_cancels_the_handler_and_keeps_it_pending(
    redis_client: aredis.Redis,
) -> None:
    topic = Topic(redis_client, "ctl")
    consumer = StreamConsumer(redis_client, "ctl", "g", start=StartFrom.EARLIEST, **FAST)
    started = anyio.Event()
    cancelled = anyio.Event()
    runs: list[int] = []

    @consumer.handler("job")
    async def handle(msg: Message[Any]) -> None:
        runs.append(msg.delivery_count)
        if len(runs) == 1:
            started.set()
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.set()

    async with consumer:
        msg_id = await topic.publish("job", {})
        with anyio.fail_after(5):
            await started.wait()
        await topic.stop_message(msg_id)
        with anyio.fail_after(2):
            await cancelled.wait()
        pending = await redis_client.xpending("ctl", "g")
        assert pending["pending"] == 1
        assert consumer.stats.handled == 0
        await topic.resume_message(msg_id)
        await until(lambda: len(runs) == 2)
        await until(lambda: consumer.stats.handled == 1)
    assert (await redis_client.xpending("ctl", "g"))["pending"] == 0


async def test_stop_holds_across_a_consumer_restart(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "ctl")
    seen: list[str] = []
    stopped_id = await topic.publish("job", {"n": 0})
    await topic.stop_message(stopped_id)
    other = await topic.publish("job", {"n": 1})
    for _ in range(2):  # the same consumer name, started twice
        consumer = StreamConsumer(
            redis_client, "ctl", "g", "worker-1", start=StartFrom.EARLIEST, **FAST
        )
        recording(consumer, seen)
        async with consumer:
            await until(lambda: other in seen)
            await anyio.sleep(FAST["claim_idle"] * 2)
        assert stopped_id not in seen
    # Another process resumes it while nobody runs; the next start handles it.
    await topic.resume_message(stopped_id)
    consumer = StreamConsumer(
        redis_client, "ctl", "g", "worker-2", start=StartFrom.EARLIEST, **FAST
    )
    recording(consumer, seen)
    async with consumer:
        await until(lambda: stopped_id in seen, timeout=5.0)
    assert seen.count(stopped_id) == 1
    assert seen.count(other) == 1


async def test_terminate_stops_consumers_of_two_groups_and_leaves_no_key(
    redis_client: aredis.Redis,
) -> None:
    topic = Topic(redis_client, "ctl")
    await topic.publish("job", {})
    consumers = [
        StreamConsumer(redis_client, "ctl", group, start=StartFrom.EARLIEST, block=5.0)
        for group in ("a", "b")
    ]
    seen: list[str] = []
    for consumer in consumers:
        recording(consumer, seen)
    async with consumers[0], consumers[1]:
        await until(lambda: len(seen) == 2)
        await topic.stop_message(await topic.publish("job", {}))
        began = time.monotonic()
        await topic.terminate()
        with anyio.fail_after(1.0):
            reasons = [await c.done() for c in consumers]
        elapsed = time.monotonic() - began
    assert reasons == [StopReason.TERMINATED, StopReason.TERMINATED]
    assert all(c.auto_stopped for c in consumers)
    assert elapsed < 1.0
    tag = topic.keys.tag
    assert await redis_client.exists(*topic.keys.owned()) == 0
    assert await redis_client.keys(f"*{tag}*") == []
    assert await redis_client.exists("ctl") == 0


async def test_topic_works_again_after_terminate(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "ctl")
    await topic.publish("job", {"old": True})
    await topic.terminate()
    seen: list[str] = []
    consumer = StreamConsumer(redis_client, "ctl", "g", start=StartFrom.EARLIEST, **FAST)
    recording(consumer, seen)
    async with consumer:
        new_id = await topic.publish("job", {"old": False})
        await until(lambda: seen == [new_id])
    info = await topic.info()
    assert info.length == 1
    assert [g.name for g in info.groups] == ["g"]
    assert info.groups[0].pending == 0


@pytest.mark.parametrize("how", ["batch"])
async def test_stopped_messages_never_enter_a_batch(redis_client: aredis.Redis, how: str) -> None:
    topic = Topic(redis_client, "ctl")
    ids = await topic.publish_many([("job", {"n": i}) for i in range(6)])
    await topic.stop_message(ids[2])
    batches: list[list[str]] = []
    consumer = StreamConsumer(redis_client, "ctl", "g", start=StartFrom.EARLIEST, **FAST)

    @consumer.batch_handler("job", size=5, timeout=0.2)
    async def handle(msgs: list[Message[Any]]) -> None:
        batches.append([m.id for m in msgs])

    async with consumer:
        await until(lambda: sum(map(len, batches)) == 5)
        assert all(ids[2] not in batch for batch in batches)
        await topic.resume_message(ids[2])
        await until(lambda: sum(map(len, batches)) == 6)
    assert sorted(i for batch in batches for i in batch) == sorted(ids)


async def test_deliveries_while_stopped_do_not_count_towards_max_deliveries(
    redis_client: aredis.Redis,
) -> None:
    topic = Topic(redis_client, "ctl")
    msg_id = await topic.publish("job", {})
    await topic.stop_message(msg_id)
    seen: list[int] = []
    for run in range(4):  # every restart re-delivers the stopped message to worker-1
        consumer = StreamConsumer(
            redis_client, "ctl", "g", "worker-1", start=StartFrom.EARLIEST, max_deliveries=2, **FAST
        )

        @consumer.handler("job")
        async def handle(msg: Message[Any]) -> None:
            seen.append(msg.delivery_count)

        async with consumer:
            await until(lambda consumer=consumer: consumer.stats.received == 1)
            if run == 3:
                await topic.resume_message(msg_id)
                await until(lambda: len(seen) == 1)
    # Delivered four times in all, but only the one after the resume counts.
    assert seen == [1]
    assert await redis_client.xlen(topic.keys.dead_letters) == 0
    assert (await redis_client.xpending("ctl", "g"))["pending"] == 0


async def test_a_cancelled_host_still_gets_its_handled_messages_acked(
    redis_client: aredis.Redis,
) -> None:
    topic = Topic(redis_client, "ctl")
    await topic.publish_many([("job", {}) for _ in range(50)])
    consumer = StreamConsumer(redis_client, "ctl", "g", start=StartFrom.EARLIEST, **FAST)
    seen: list[str] = []
    host = anyio.CancelScope()

    @consumer.handler("job")
    async def handle(msg: Message[Any]) -> None:
        seen.append(msg.id)
        if len(seen) == 50:
            host.cancel()  # e.g. the app's lifespan cancelled: acks are still in the buffer

    with host:
        async with consumer:
            await anyio.sleep_forever()
    assert await consumer.done() is StopReason.STOPPED
    assert len(seen) == 50
    assert (await redis_client.xpending("ctl", "g"))["pending"] == 0


async def test_clear_errors_for_a_sync_handler_and_a_key_that_is_not_a_stream(
    redis_client: aredis.Redis,
) -> None:
    consumer = StreamConsumer(redis_client, "ctl", "g")

    def not_async(msg: Message[Any]) -> None:
        return None

    with pytest.raises(ConfigurationError, match="must be an async function"):
        consumer.handler("job")(not_async)

    await redis_client.set("plain", "x")
    consumer = StreamConsumer(redis_client, "plain", "g")
    recording(consumer, [])
    with pytest.raises(ConfigurationError, match="is not a stream"):
        async with consumer:
            pass
    assert await redis_client.get("plain") == b"x"


async def test_stopped_deliveries_are_not_counted_even_across_processes(
    redis_client: aredis.Redis,
) -> None:
    """The counter in the pending list itself is taken back, so a consumer in
    another process that claims the message later sees the true count."""
    topic = Topic(redis_client, "ctl")
    msg_id = await topic.publish("job", {})
    await topic.stop_message(msg_id)
    first = StreamConsumer(redis_client, "ctl", "g", "first", start=StartFrom.EARLIEST, **FAST)
    recording(first, [])
    async with first:
        await until(lambda: first.stats.received == 1)
        await until(lambda: _deliveries(redis_client, msg_id, expected=0))
        first.request_stop(hard=True)  # like a crash: nothing handed back
    # A second consumer claims it after claim_idle (+1), parks it again (-1).
    seen: list[int] = []
    second = StreamConsumer(redis_client, "ctl", "g", "second", max_deliveries=1, **FAST)

    @second.handler("job")
    async def handle(msg: Message[Any]) -> None:
        seen.append(msg.delivery_count)

    async with second:
        await until(lambda: second.stats.claimed == 1, timeout=5.0)
        await topic.resume_message(msg_id)
        await until(lambda: seen == [1])
    assert await redis_client.xlen(topic.keys.dead_letters) == 0


async def _deliveries(client: aredis.Redis, msg_id: str, *, expected: int) -> bool:
    rows = await client.xpending_range("ctl", "g", msg_id, msg_id, 1)
    return bool(rows) and rows[0]["times_delivered"] == expected


async def test_an_entry_taken_over_by_another_consumer_is_dropped_not_handled(
    redis_client: aredis.Redis, redis_url: str
) -> None:
    topic = Topic(redis_client, "ctl")
    first, second = await topic.publish_many([("job", {"n": 1}), ("job", {"n": 2})])
    # claim_idle long enough that the thief's entry is not claimed back meanwhile.
    consumer = StreamConsumer(
        redis_client, "ctl", "g", start=StartFrom.EARLIEST, concurrency=1, claim_idle=3.0, block=0.2
    )
    seen: list[str] = []
    thief = aredis.Redis.from_url(redis_url)

    @consumer.handler("job")
    async def handle(msg: Message[Any]) -> None:
        seen.append(msg.id)
        if msg.id == first:
            # Another consumer takes over the second entry, still waiting here.
            await thief.xclaim("ctl", "g", "thief", 0, [second], justid=True)
            # The next lease refresh (every claim_idle / 3) finds it gone.
            await until(lambda: consumer.stats.held == 1)

    try:
        async with consumer:
            await until(lambda: consumer.stats.handled == 1 and consumer.stats.held == 0)
    finally:
        await thief.aclose()
    assert seen == [first]
    rows = await redis_client.xpending_range("ctl", "g", "-", "+", 10)
    assert [(r["message_id"].decode(), r["consumer"].decode()) for r in rows] == [(second, "thief")]


async def test_a_running_entry_taken_over_is_not_acknowledged_from_under_its_new_owner(
    redis_client: aredis.Redis, redis_url: str
) -> None:
    """A consumer stalled past ``claim_idle`` (a frozen process, a blocked
    event loop) finds on its next lease refresh that another consumer took
    over the message its handler is running. When that handler then returns,
    the entry is the other consumer's: acknowledging it would take it from
    under its new owner, whose own handling decides its fate."""
    topic = Topic(redis_client, "ctl")
    taken = await topic.publish("job", {"n": 1})
    consumer = StreamConsumer(
        redis_client, "ctl", "g", start=StartFrom.EARLIEST, concurrency=1, claim_idle=3.0, block=0.2
    )
    started, release = anyio.Event(), anyio.Event()
    thief = aredis.Redis.from_url(redis_url)

    @consumer.handler("job")
    async def handle(msg: Message[Any]) -> None:
        started.set()
        await release.wait()

    try:
        async with consumer:
            await started.wait()
            await thief.xclaim("ctl", "g", "thief", 0, [taken], justid=True)
            # The next lease refresh (every claim_idle / 3) finds it gone.
            await until(lambda: consumer.stats.held == 0)
            release.set()
            await until(lambda: consumer.stats.handled == 1)
            await consumer.stop()
    finally:
        await thief.aclose()
    rows = await redis_client.xpending_range("ctl", "g", "-", "+", 10)
    assert [(r["message_id"].decode(), r["consumer"].decode()) for r in rows] == [(taken, "thief")]


async def test_after_a_stall_past_claim_idle_queued_entries_peers_took_are_not_started(
    redis_client: aredis.Redis, redis_url: str
) -> None:
    """A consumer whose event loop was blocked longer than ``claim_idle`` may
    have lost what it had queued: workers wait for the next lease refresh to
    say what is still theirs instead of starting messages a peer now owns."""
    import threading

    import redis as sync_redis

    topic = Topic(redis_client, "stall")
    ids = await topic.publish_many([("job", {"n": i}) for i in range(5)])
    consumer = StreamConsumer(
        redis_client, "stall", "g", "me", start=StartFrom.EARLIEST, concurrency=1, claim_idle=1.0
    )
    started: list[str] = []
    stolen = threading.Event()

    def thief() -> None:
        client = sync_redis.Redis.from_url(redis_url)
        try:
            time.sleep(1.3)  # past claim_idle, while the consumer's loop is blocked
            client.xclaim("stall", "g", "thief", 1000, ids[1:], justid=True)
        finally:
            client.close()
            stolen.set()

    @consumer.handler("job")
    async def handle(msg: Message[Any]) -> None:
        started.append(msg.id)
        if msg.id == ids[0]:
            threading.Thread(target=thief, daemon=True).start()
            time.sleep(2.0)  # noqa: ASYNC251 - blocks the loop: no lease refresh meanwhile

    async with consumer:
        await until(lambda: stolen.is_set() and consumer.stats.held == 0, timeout=15)
        await consumer.stop()
    assert started == [ids[0]]
    rows = await redis_client.xpending_range("stall", "g", "-", "+", 10)
    assert sorted(r["message_id"].decode() for r in rows) == sorted(ids[1:])
    assert {r["consumer"].decode() for r in rows} == {"thief"}


async def test_a_read_reply_that_waited_out_a_stall_is_not_started_when_peers_took_it(
    redis_client: aredis.Redis, redis_url: str
) -> None:
    """A read sent just before the process froze (or its loop blocked) may
    deliver entries whose reply waits in the socket past ``claim_idle``: by
    then peers may have claimed them. Entries are leased from the moment their
    read was sent, so workers wait for a lease refresh that covers them."""
    import threading

    import redis as sync_redis

    claim_idle = 2.0
    topic = Topic(redis_client, "late")
    first = await topic.publish("job", {"n": 0})
    consumer = StreamConsumer(
        redis_client,
        "late",
        "g",
        "me",
        start=StartFrom.EARLIEST,
        concurrency=1,
        claim_idle=claim_idle,
    )
    started: list[tuple[str, float]] = []
    late: list[str] = []
    claimed_at: list[float] = []
    stolen: list[str] = []

    async def read_waiting() -> bool:
        clients = await redis_client.client_list()
        return any(c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "") for c in clients)

    def publish_then_steal() -> None:
        client = sync_redis.Redis.from_url(redis_url)
        try:
            # The consumer's read is waiting: these go into its reply at once
            # (in one transaction, so that the read wakes up to all of them).
            # Megabytes of reply: more than the sockets buffer, so that after
            # the stall it arrives over several loop iterations, as it does
            # from a busy server, and the lease refresh can go first.
            pipe = client.pipeline(transaction=True)
            pad = "x" * 20_000
            for n in range(1, 201):
                pipe.xadd("late", {"type": "job", "data": f'{{"n": {n}, "pad": "{pad}"}}'})
            late.extend(i.decode() for i in pipe.execute())
            time.sleep(claim_idle + 1.3)  # idle past claim_idle, the consumer frozen
            taken = client.xclaim("late", "g", "thief", int(claim_idle * 1000), late, justid=True)
            claimed_at.append(time.monotonic())
            stolen.extend(i.decode() for i in taken)
        finally:
            client.close()

    @consumer.handler("job")
    async def handle(msg: Message[Any]) -> None:
        started.append((msg.id, time.monotonic()))
        if msg.id == first:
            await until(read_waiting)  # the reader's next (blocking) read is out
            thread = threading.Thread(target=publish_then_steal, daemon=True)
            thread.start()
            time.sleep(claim_idle + 2.0)  # noqa: ASYNC251 - a frozen process
            thread.join()

    async with consumer:
        # The late entries come back when idle under the thief for claim_idle.
        await until(lambda: consumer.stats.handled == 1 + len(late), timeout=30)
        await consumer.stop()
    # Whatever the consumer started of the late entries, it started once they
    # were idle under the thief for claim_idle (claimed back), never before.
    assert started[0][0] == first
    assert late
    assert stolen == late  # delivered to the frozen consumer, then taken
    too_early = [i for i, at in started[1:] if at < claimed_at[0] + claim_idle]
    assert too_early == [], (too_early, started, claimed_at)
