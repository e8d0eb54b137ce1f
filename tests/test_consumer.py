"""StreamConsumer against a real Redis: start positions, delivery, retries,
dead letters, stopping and housekeeping, each checked the way a user would."""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import msgspec
import pytest
import redis.asyncio

from helpers import (
    Recorder,
    consumer_names,
    nothing_pending,
    pending,
    pending_count,
    wait_until,
    xadd_raw,
)
from redcurrent import DecodeError, Message, StartFrom, StopReason, StreamConsumer, Topic

STREAM = "orders"
GROUP = "workers"


def make_consumer(
    client: redis.asyncio.Redis, name: str = "worker-1", **kwargs: Any
) -> StreamConsumer:
    """A consumer with durations small enough for tests."""
    options: dict[str, Any] = {
        "start": StartFrom.EARLIEST,
        "claim_idle": 0.5,
        "block": 0.2,
        "shutdown_timeout": 1.0,
    }
    options.update(kwargs)
    group = options.pop("group", GROUP)
    return StreamConsumer(client, STREAM, group, name, **options)


@pytest.fixture
def topic(redis_client: redis.asyncio.Redis) -> Topic:
    return Topic(redis_client, STREAM)


# -- start positions ----------------------------------------------------------------


async def test_latest_sees_only_entries_after_start(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    before = await topic.publish_many([("job", {"n": 1}), ("job", {"n": 2})])
    seen = Recorder()
    consumer = make_consumer(redis_client, start=StartFrom.LATEST)
    consumer.handler("job")(seen)
    async with consumer:
        assert await redis_client.xlen(STREAM) == 2  # no placeholder entry written
        after = await topic.publish_many([("job", {"n": 3}), ("job", {"n": 4})])
        await seen.wait_for(2)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
    assert seen.ids == after
    assert not set(before) & set(seen.ids)
    assert [m.data for m in seen.messages] == [{"n": 3}, {"n": 4}]


async def test_earliest_sees_every_entry(redis_client: redis.asyncio.Redis, topic: Topic) -> None:
    before = await topic.publish_many([("job", {"n": i}) for i in range(5)])
    seen = Recorder()
    consumer = make_consumer(redis_client, start=StartFrom.EARLIEST)
    consumer.handler("job")(seen)
    async with consumer:
        after = await topic.publish("job", {"n": 5})
        await seen.wait_for(6)
    assert seen.ids == [*before, after]
    assert await redis_client.xlen(STREAM) == 6


async def test_explicit_id_starts_after_it(redis_client: redis.asyncio.Redis, topic: Topic) -> None:
    ids = await topic.publish_many([("job", {"n": i}) for i in range(4)])
    seen = Recorder()
    consumer = make_consumer(redis_client, start=ids[1])
    consumer.handler("job")(seen)
    async with consumer:
        await seen.wait_for(2)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
    assert seen.ids == ids[2:]  # exclusive: the given id itself is not delivered


async def test_existing_group_keeps_its_position(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    old = await topic.publish("job", {"n": "old"})
    await redis_client.xgroup_create(STREAM, GROUP, id="$")
    new = await topic.publish("job", {"n": "new"})
    seen = Recorder()
    consumer = make_consumer(redis_client, start=StartFrom.EARLIEST)  # ignored: group exists
    consumer.handler("job")(seen)
    async with consumer:
        await seen.wait_for(1)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
        also = await topic.publish("job", {"n": "also"})
        await seen.wait_for(2)
    assert seen.ids == [new, also]
    assert old not in seen.ids


async def test_missing_stream_is_created_empty(redis_client: redis.asyncio.Redis) -> None:
    assert await redis_client.exists(STREAM) == 0
    consumer = make_consumer(redis_client, start=StartFrom.LATEST)
    consumer.handler("job")(Recorder())
    async with consumer:
        assert await redis_client.exists(STREAM) == 1
        assert await redis_client.xlen(STREAM) == 0  # MKSTREAM, no junk entry
        groups = await redis_client.xinfo_groups(STREAM)
        assert [g["name"] for g in groups] == [GROUP.encode()]
    assert await redis_client.xlen(STREAM) == 0


# -- delivery -------------------------------------------------------------------


async def test_three_consumers_handle_each_message_exactly_once(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    total = 1800
    handled: list[tuple[str, str]] = []
    all_done = anyio.Event()
    consumers = []
    for i in range(3):
        consumer = make_consumer(redis_client, f"worker-{i}", claim_idle=1.0, concurrency=8)

        async def handle(msg: Message[Any], name: str = consumer.name) -> None:
            handled.append((msg.id, name))
            if len(handled) >= total:
                all_done.set()

        consumer.handler("job")(handle)
        consumers.append(consumer)

    async with consumers[0], consumers[1], consumers[2]:
        published: list[str] = []
        for chunk in range(3):
            published += await topic.publish_many(
                [("job", {"n": chunk * 600 + i}) for i in range(600)]
            )
        with anyio.fail_after(20):
            await all_done.wait()
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))

    ids = [entry_id for entry_id, _ in handled]
    duplicates = [i for i, n in Counter(ids).items() if n > 1]
    assert duplicates == []
    assert set(ids) == set(published)
    assert len(ids) == total
    assert await pending_count(redis_client, STREAM, GROUP) == 0
    assert sum(c.stats.handled for c in consumers) == total
    assert all(c.stop_reason is StopReason.STOPPED for c in consumers)


async def test_slow_handler_is_not_claimed_by_another_consumer(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    claim_idle = 0.3
    started = anyio.Event()
    runs: list[Message[Any]] = []
    first = make_consumer(redis_client, "slow", claim_idle=claim_idle)

    @first.handler("job")
    async def slow(msg: Message[Any]) -> None:
        runs.append(msg)
        started.set()
        await anyio.sleep(3 * claim_idle)  # the work itself: longer than claim_idle

    other_saw = Recorder()
    second = make_consumer(redis_client, "thief", claim_idle=claim_idle)
    second.handler("job")(other_saw)

    async with first:
        entry_id = await topic.publish("job", {"n": 1})
        with anyio.fail_after(5):
            await started.wait()
        async with second:
            await wait_until(lambda: first.stats.handled == 1, timeout=5)
            await wait_until(nothing_pending(redis_client, STREAM, GROUP))
            assert second.stats.claimed == 0
    assert [m.id for m in runs] == [entry_id]
    assert runs[0].delivery_count == 1
    assert other_saw.messages == []
    assert first.stats.handled == 1
    assert second.stats.received == 0


async def test_restarted_consumer_finishes_its_own_pending_first(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    await redis_client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    old = await topic.publish_many([("job", {"n": i}) for i in range(3)])
    # A previous incarnation of "worker-x" read them and died before acking.
    reply = await redis_client.xreadgroup(GROUP, "worker-x", {STREAM: ">"}, count=10)
    assert len(reply[0][1]) == 3
    new = await topic.publish_many([("job", {"n": i}) for i in range(3, 5)])

    seen = Recorder()
    consumer = make_consumer(redis_client, "worker-x", claim_idle=30.0, concurrency=1)
    consumer.handler("job")(seen)
    async with consumer:
        await seen.wait_for(5)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
    assert seen.ids == [*old, *new]
    assert [m.delivery_count for m in seen.messages] == [2, 2, 2, 1, 1]
    assert consumer.stats.claimed == 0


async def test_failed_handler_is_retried_and_acked_after_success(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    deliveries: list[int] = []
    succeeded = anyio.Event()
    consumer = make_consumer(redis_client, claim_idle=0.3)

    @consumer.handler("job")
    async def flaky(msg: Message[Any]) -> None:
        deliveries.append(msg.delivery_count)
        if msg.delivery_count == 1:
            raise RuntimeError("first try fails")
        succeeded.set()

    async with consumer:
        entry_id = await topic.publish("job", {"n": 1})
        with anyio.fail_after(5):
            await succeeded.wait()
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
        assert consumer.stop_reason is None
    assert deliveries == [1, 2]
    assert consumer.stats.failed == 1
    assert consumer.stats.handled == 1
    assert consumer.stats.dead_lettered == 0
    assert await topic.dead_letters() == []
    assert await redis_client.xlen(STREAM) == 1
    assert (await redis_client.xrange(STREAM))[0][0].decode() == entry_id


async def test_poison_message_becomes_dead_letter_and_replays_after_fix(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    fixed = False
    attempts: list[int] = []
    good = Recorder()
    replayed = anyio.Event()
    consumer = make_consumer(redis_client, "worker-1", claim_idle=0.3, max_deliveries=3)

    @consumer.handler("job")
    async def handle(msg: Message[Any]) -> None:
        if msg.data.get("poison"):
            attempts.append(msg.delivery_count)
            if not fixed:
                raise ValueError("cannot digest this")
            replayed.set()
        good.record(msg)

    async with consumer:
        poison = await topic.publish("job", {"poison": True}, metadata={"tenant": "t1"})
        others = await topic.publish_many([("job", {"n": i}) for i in range(10)])
        await good.wait_for(10)
        assert set(good.ids) == set(others)
        await wait_until(lambda: consumer.stats.dead_lettered == 1, timeout=10)

        [letter] = await topic.dead_letters()
        assert letter.original_id == poison
        assert letter.group == GROUP
        assert letter.consumer == "worker-1"
        assert letter.error_type == "ValueError"
        assert "ValueError" in letter.reason
        assert "cannot digest this" in letter.reason
        assert letter.delivery_count == 3
        assert letter.type == "job"
        assert letter.data == {"poison": True}
        assert letter.metadata == {"tenant": "t1"}
        assert attempts == [1, 2, 3]
        assert poison not in [p[0] for p in await pending(redis_client, STREAM, GROUP)]
        assert (await topic.info()).dead_letters == 1

        more = await topic.publish("job", {"n": "after"})
        await good.wait_for(11)
        assert good.ids[-1] == more

        fixed = True
        [new_id] = await topic.replay_dead_letters()
        with anyio.fail_after(5):
            await replayed.wait()
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
        assert consumer.stop_reason is None
    assert good.ids[-1] == new_id
    assert good.messages[-1].delivery_count == 1
    assert good.messages[-1].metadata == {"tenant": "t1"}
    assert await topic.dead_letters() == []
    assert consumer.stats.dead_lettered == 1


class Order(msgspec.Struct):
    sku: str
    qty: int


async def test_bad_entries_become_dead_letters_at_once(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    await redis_client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    orders = Recorder()
    consumer = make_consumer(redis_client, claim_idle=30.0, max_deliveries=5)
    consumer.handler("order", model=Order)(orders)

    bad: dict[str, tuple[str, str | None]] = {}  # id -> (error type, DecodeError.category)
    bad[await xadd_raw(redis_client, STREAM, {"type": "order", "data": "{not json"})] = (
        "DecodeError",
        "invalid_json",
    )
    bad[await xadd_raw(redis_client, STREAM, {"data": "{}", "metadata": "{}"})] = (
        "DecodeError",
        "missing_type",
    )
    bad[await xadd_raw(redis_client, STREAM, {"type": b"\xff\xfe", "data": b"{}"})] = (
        "DecodeError",
        "invalid_utf8",
    )
    bad[await xadd_raw(redis_client, STREAM, {"type": "order", "data": b'{"sku":"\xff"}'})] = (
        "DecodeError",
        "invalid_utf8",
    )
    bad[await xadd_raw(redis_client, STREAM, {"type": "nobody", "data": "{}"})] = (
        "NoHandlerError",
        None,
    )
    bad[await topic.publish("order", {"sku": "A1", "qty": "many"})] = (
        "ValidationError",
        "wrong_schema",
    )
    placeholder = await xadd_raw(redis_client, STREAM, {"init": "true"})
    good = await topic.publish("order", {"sku": "B2", "qty": 3})

    async with consumer:
        await orders.wait_for(1)
        await wait_until(lambda: consumer.stats.dead_lettered == len(bad), timeout=5)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
        assert consumer.stop_reason is None
        # Still running: a later good message is handled.
        later = await topic.publish("order", {"sku": "C3", "qty": 1})
        await orders.wait_for(2)

    assert orders.ids == [good, later]
    assert orders.messages[0].data == Order(sku="B2", qty=3)
    letters = {letter.original_id: letter for letter in await topic.dead_letters()}
    assert set(letters) == set(bad)
    assert placeholder not in letters  # goStream's init entry is acked silently
    for entry_id, (error_type, category) in bad.items():
        letter = letters[entry_id]
        assert letter.delivery_count == 1, entry_id
        assert letter.error_type == error_type, (entry_id, letter.reason)
        # The category, not msgspec's wording (which changes between releases).
        assert DecodeError.category_of(letter.reason) == category, (entry_id, letter.reason)
        assert letter.group == GROUP
    assert consumer.stats.failed == 0
    assert consumer.stats.handled == 2


async def test_catch_all_receives_types_without_their_own_handler(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    emails = Recorder()
    others = Recorder()
    consumer = make_consumer(redis_client)
    consumer.handler("email")(emails)
    consumer.handler("*")(others)
    async with consumer:
        ids = await topic.publish_many(
            [("email", {"to": "a"}), ("sms", {"to": "b"}), ("push", {"to": "c"})]
        )
        await emails.wait_for(1)
        await others.wait_for(2)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
    assert emails.ids == [ids[0]]
    assert sorted(others.ids) == sorted(ids[1:])
    assert {m.type for m in others.messages} == {"sms", "push"}
    assert await topic.dead_letters() == []


async def test_stats_match_a_known_scenario(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    consumer = make_consumer(redis_client, claim_idle=0.3, max_deliveries=2)
    settled = Recorder()

    @consumer.handler("job")
    async def handle(msg: Message[Any]) -> None:
        kind = msg.data["kind"]
        if kind == "poison" or (kind == "flaky" and msg.delivery_count == 1):
            raise RuntimeError(kind)
        settled.record(msg)

    async with consumer:
        assert consumer.stats == type(consumer.stats)()
        await topic.publish_many([("job", {"kind": "ok"}) for _ in range(5)])
        await topic.publish_many([("job", {"kind": "flaky"}), ("job", {"kind": "poison"})])
        await xadd_raw(redis_client, STREAM, {"type": "job", "data": "{oops"})
        await settled.wait_for(6)
        await wait_until(lambda: consumer.stats.dead_lettered == 2, timeout=5)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
        stats = consumer.stats
    # 5 ok + flaky twice + poison twice + the undecodable once
    assert stats.received == 10
    assert stats.handled == 6
    assert stats.failed == 3  # flaky once, poison twice
    assert stats.dead_lettered == 2  # poison after max_deliveries, the undecodable at once
    # The second deliveries of flaky and poison: kept and retried by this consumer.
    assert (stats.retried, stats.claimed) == (2, 0)
    assert stats.held == 0


# -- stopping ---------------------------------------------------------------------


@pytest.mark.parametrize("how", ["del", "destroy"])
async def test_auto_stop_when_stream_or_group_vanishes(
    redis_client: redis.asyncio.Redis, topic: Topic, how: str
) -> None:
    # Large block and claim_idle: only the blocked XREADGROUP can notice in time.
    consumer = make_consumer(redis_client, block=5.0, claim_idle=30.0)
    consumer.handler("job")(Recorder())

    async def blocked_in_xreadgroup() -> bool:
        clients = await redis_client.client_list()
        return any(c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "") for c in clients)

    async with consumer:
        await wait_until(blocked_in_xreadgroup, timeout=5)
        assert consumer.stop_reason is None
        if how == "del":
            await redis_client.delete(STREAM)
        else:
            await redis_client.xgroup_destroy(STREAM, GROUP)
        with anyio.fail_after(1.0):
            reason = await consumer.done()
    assert reason is StopReason.DELETED
    assert consumer.stop_reason is StopReason.DELETED
    assert consumer.auto_stopped is True
    if how == "del":
        assert await redis_client.exists(STREAM) == 0
    else:
        assert await redis_client.exists(STREAM) == 1
        assert await redis_client.xinfo_groups(STREAM) == []


async def test_manual_stop_and_done_from_many_tasks(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    seen = Recorder()
    consumer = make_consumer(redis_client)
    consumer.handler("job")(seen)
    reasons: list[StopReason] = []

    async def waiter() -> None:
        reasons.append(await consumer.done())

    async with anyio.create_task_group() as tg:
        results: list[StopReason] = []

        async def run() -> None:
            results.append(await consumer.run())

        tg.start_soon(run)
        for _ in range(3):
            tg.start_soon(waiter)
        await topic.publish("job", {"n": 1})
        await seen.wait_for(1)
        assert consumer.stop_reason is None
        assert consumer.auto_stopped is False
        assert await consumer.stop() is StopReason.STOPPED
    assert results == [StopReason.STOPPED]
    assert reasons == [StopReason.STOPPED] * 3
    assert await consumer.done() is StopReason.STOPPED
    assert consumer.stop_reason is StopReason.STOPPED
    assert consumer.auto_stopped is False
    assert await consumer.stop() is StopReason.STOPPED  # idempotent


async def test_two_consumers_in_one_async_with(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    a_seen, b_seen = Recorder(), Recorder()
    a = make_consumer(redis_client, "a", group="group-a")
    b = make_consumer(redis_client, "b", group="group-b")
    a.handler("job")(a_seen)
    b.handler("job")(b_seen)
    async with a, b:
        ids = await topic.publish_many([("job", {"n": i}) for i in range(3)])
        await a_seen.wait_for(3)
        await b_seen.wait_for(3)
        assert a.stop_reason is None
        assert b.stop_reason is None
    assert a_seen.ids == ids
    assert b_seen.ids == ids
    assert a.stop_reason is StopReason.STOPPED
    assert b.stop_reason is StopReason.STOPPED


async def test_graceful_stop_lets_a_handler_finish_and_acks_it(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    started, release = anyio.Event(), anyio.Event()
    finished: list[str] = []
    consumer = make_consumer(redis_client, shutdown_timeout=5.0)

    @consumer.handler("job")
    async def handle(msg: Message[Any]) -> None:
        started.set()
        await release.wait()
        finished.append(msg.id)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer.run)
        entry_id = await topic.publish("job", {"n": 1})
        with anyio.fail_after(5):
            await started.wait()
        consumer.request_stop()
        release.set()  # finishes well within shutdown_timeout
        with anyio.fail_after(5):
            assert await consumer.done() is StopReason.STOPPED
    assert finished == [entry_id]
    assert await pending_count(redis_client, STREAM, GROUP) == 0


async def test_graceful_stop_cancels_a_handler_past_shutdown_timeout(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    started = anyio.Event()
    cancelled: list[str] = []
    consumer = make_consumer(redis_client, shutdown_timeout=0.5)

    @consumer.handler("job")
    async def handle(msg: Message[Any]) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append(msg.id)
            raise

    async with consumer:
        entry_id = await topic.publish("job", {"n": 1})
        with anyio.fail_after(5):
            await started.wait()
        with anyio.fail_after(5):
            assert await consumer.stop() is StopReason.STOPPED
    assert cancelled == [entry_id]
    assert await pending(redis_client, STREAM, GROUP) == [(entry_id, "worker-1", 1)]
    assert consumer.stats.handled == 0


async def test_concurrency_cap_is_honoured_exactly(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    cap, total = 5, 50
    running = 0
    most = 0
    full, gate = anyio.Event(), anyio.Event()
    done = Recorder()
    consumer = make_consumer(redis_client, concurrency=cap, claim_idle=5.0)

    @consumer.handler("job")
    async def handle(msg: Message[Any]) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            if running == cap:
                full.set()
            await gate.wait()
            for _ in range(3):  # stay busy for a few turns of the loop
                await anyio.lowlevel.checkpoint()
        finally:
            running -= 1
        done.record(msg)

    async with consumer:
        await topic.publish_many([("job", {"n": i}) for i in range(total)])
        with anyio.fail_after(5):
            await full.wait()
        # Everything is in memory, yet only `cap` handlers run.
        await wait_until(lambda: consumer.stats.received == total)
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        assert running == cap
        assert consumer.stats.held == total
        gate.set()
        await done.wait_for(total)
    assert most == cap
    assert len(set(done.ids)) == total


async def test_idle_consumers_holding_nothing_are_deleted(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    await redis_client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    held = await topic.publish("job", {"n": 1})
    await redis_client.xreadgroup(GROUP, "holder", {STREAM: ">"}, count=1)
    await redis_client.execute_command("XGROUP", "CREATECONSUMER", STREAM, GROUP, "ghost")

    async def idle_at_least(names: set[str], ms: int) -> bool:
        rows = await redis_client.xinfo_consumers(STREAM, GROUP)
        idle = {r["name"].decode(): r["idle"] for r in rows}
        return all(idle.get(n, 0) >= ms for n in names)

    await wait_until(lambda: idle_at_least({"holder", "ghost"}, 300))
    consumer = make_consumer(redis_client, claim_idle=30.0, consumer_idle_timeout=0.2)
    consumer.handler("job")(Recorder())
    async with consumer:
        await wait_until(
            lambda: _no_consumer(redis_client, "ghost"),
            timeout=5,
        )
        # A later ghost goes on a later pass; the holder survives every pass.
        await redis_client.execute_command("XGROUP", "CREATECONSUMER", STREAM, GROUP, "ghost-2")
        await wait_until(lambda: _no_consumer(redis_client, "ghost-2"), timeout=5)
        names = await consumer_names(redis_client, STREAM, GROUP)
        assert names["holder"] == 1
        assert "worker-1" in names
    assert await pending(redis_client, STREAM, GROUP) == [(held, "holder", 1)]


async def _no_consumer(client: redis.asyncio.Redis, name: str) -> bool:
    return name not in await consumer_names(client, STREAM, GROUP)


async def test_client_with_decode_responses(
    redis_url: str, redis_client: redis.asyncio.Redis
) -> None:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        topic = Topic(client, STREAM)
        seen = Recorder()
        consumer = make_consumer(client)
        consumer.handler("job", model=Order)(seen)
        async with consumer:
            entry_id = await topic.publish("job", {"sku": "Zoë", "qty": 2}, metadata={"k": "v"})
            bad = await xadd_raw(redis_client, STREAM, {"type": "job", "data": "{oops"})
            await seen.wait_for(1)
            await wait_until(lambda: consumer.stats.dead_lettered == 1)
        assert seen.ids == [entry_id]
        assert seen.messages[0].data == Order(sku="Zoë", qty=2)
        assert seen.messages[0].metadata == {"k": "v"}
        [letter] = await topic.dead_letters()
        assert letter.original_id == bad
        assert letter.error_type == "DecodeError"
        assert consumer.stop_reason is StopReason.STOPPED
    finally:
        await client.aclose()


async def test_claimed_messages_get_their_true_delivery_count(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    """Failed messages claimed back among many held ones still count their deliveries.

    Slow messages (held, leased) interleave with failing ones, so the id range
    of one XAUTOCLAIM batch of failed messages holds many other pending
    entries of this consumer.
    """
    slow_per_fail, fail_count = 4, 40
    slow_count = slow_per_fail * fail_count
    gate = anyio.Event()
    counts: dict[str, list[int]] = {}
    consumer = make_consumer(
        redis_client, claim_idle=0.3, concurrency=slow_count + 20, max_deliveries=2
    )

    @consumer.handler("slow")
    async def slow(msg: Message[Any]) -> None:
        await gate.wait()

    @consumer.handler("fail")
    async def fail(msg: Message[Any]) -> None:
        counts.setdefault(msg.id, []).append(msg.delivery_count)
        raise RuntimeError("always")

    async with consumer:
        items: list[tuple[str, Any]] = []
        for i in range(fail_count):
            items += [("slow", {"n": i}) for _ in range(slow_per_fail)]
            items.append(("fail", {"n": i}))
        await topic.publish_many(items)
        await wait_until(lambda: consumer.stats.dead_lettered == fail_count, timeout=10)
        gate.set()
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
    assert len(counts) == fail_count
    assert {tuple(c) for c in counts.values()} == {(1, 2)}
    assert {letter.delivery_count for letter in await topic.dead_letters(count=200)} == {2}
