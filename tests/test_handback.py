"""Hand-back on a graceful stop (issue 17): a stopping consumer announces what
it handed back, and its group's running peers claim it at once instead of at
their next claim pass (``claim_idle / 2`` away). Also: the notice on the wire,
listeners that ignore what they do not know, one extra pass per burst, other
groups and stopping consumers unmoved; and ``stats.failed`` leaving out
``Retry``."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import anyio
import pytest
import redis.asyncio

from helpers import Recorder, nothing_pending, pel_of, wait_until
from redcurrent import Message, Retry, RetryPolicy, StartFrom, StopReason, StreamConsumer, Topic
from redcurrent._claim import Claimer
from redcurrent._control import ControlListener
from redcurrent.testing import RedisServer

STREAM = "handback"
GROUP = "workers"
OTHER = "auditors"
#: Long enough that a claim pass on the interval (claim_idle / 2 = 30 s) would
#: come long after every wait below (10 s) has given up.
CLAIM_IDLE = 60.0


def make_consumer(
    client: redis.asyncio.Redis, name: str, group: str = GROUP, **kwargs: Any
) -> StreamConsumer:
    options: dict[str, Any] = {"start": StartFrom.EARLIEST, "claim_idle": CLAIM_IDLE}
    options.update(kwargs)
    return StreamConsumer(client, STREAM, group, name, **options)


def claimer_of(consumer: StreamConsumer) -> Claimer:
    claimer = consumer._run.claimer
    assert claimer is not None
    return claimer


def between_passes(*consumers: StreamConsumer) -> bool:
    """Every one has made a claim pass and sleeps until the next, no wake pending."""
    claimers = [c._run.claimer for c in consumers]
    return all(c is not None and c.waiting for c in claimers)


def listener_of(consumer: StreamConsumer) -> ControlListener:
    control = consumer._run._control
    assert control is not None
    return control


async def heard_everything_before(consumer: StreamConsumer, topic: Topic, sentinel: str) -> None:
    """Wait until ``consumer`` has heard every notice sent so far: notices of one
    channel arrive in order, so once it knows of a stop sent now, it has heard
    everything sent before it."""
    await topic.stop_message(sentinel)
    await wait_until(lambda: listener_of(consumer).is_stopped(sentinel))


async def notices_until(wire: Any, last: bytes) -> list[bytes]:
    """What a plain subscriber got on the control channel, up to ``last``."""
    notices: list[bytes] = []
    with anyio.fail_after(10):
        while not notices or notices[-1] != last:
            message = await wire.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                notices.append(message["data"])
    return notices


@pytest.fixture
def topic(redis_client: redis.asyncio.Redis) -> Topic:
    return Topic(redis_client, STREAM)


async def test_a_peer_takes_over_a_stopped_consumers_messages_at_once(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    total, finish = 300, 40
    ids = await topic.publish_many([("job", {"n": n}) for n in range(total)])
    gate = anyio.Event()  # never set: A's handlers after the first `finish` hang
    a_started: list[str] = []
    a_handled: list[str] = []
    # A holds everything: 40 handled, 4 running (concurrency), 256 waiting.
    a = make_consumer(redis_client, "a", concurrency=4, prefetch=512, shutdown_timeout=0.3)

    @a.handler("job")
    async def slow(msg: Message[Any]) -> None:
        a_started.append(msg.id)
        if len(a_started) > finish:
            await gate.wait()
        a_handled.append(msg.id)

    b_handled = Recorder()
    b = make_consumer(redis_client, "b")
    b.handler("job")(b_handled)
    audited = Recorder()
    c = make_consumer(redis_client, "c", group=OTHER)
    c.handler("job")(audited)

    wire = redis_client.pubsub()
    await wire.subscribe(topic.keys.control_channel)
    async with a:
        await wait_until(lambda: a.stats.received == total and a.stats.running == 4)
        async with b, c:
            await audited.wait_for(total)
            # Both made their first claim pass (nothing was idle long enough)
            # and sleep until the next, 30 s away.
            await wait_until(lambda: between_passes(b, c))
            assert (claimer_of(b).passes, claimer_of(c).passes) == (1, 1)
            running = set(a_started) - set(a_handled)
            assert (len(a_handled), len(running)) == (finish, 4)

            began = time.monotonic()
            assert await a.stop() is StopReason.STOPPED
            stopped = time.monotonic()
            await b_handled.wait_for(total - finish, timeout=10.0)
            took = time.monotonic()
            await wait_until(nothing_pending(redis_client, STREAM, GROUP))
            await heard_everything_before(c, topic, "1-1")
            print(
                f"\nB handled the {total - finish} handed-back messages "
                f"{took - stopped:.3f}s after A's stop returned "
                f"({took - began:.3f}s after it began)"
            )
            assert took - stopped < 5.0  # the interval would be 30 s

            # Each message handled exactly once, but the four A was running
            # when it stopped: cancelled there, they ran again on B.
            assert set(a_handled) | set(b_handled.ids) == set(ids)
            assert len(b_handled.ids) == len(set(b_handled.ids)) == total - finish
            assert set(a_started) & set(b_handled.ids) == running
            assert not set(a_handled) & set(b_handled.ids)
            assert b.stats.claimed == total - finish

            # Two notices: what A had queued, handed back when the stop came,
            # and what it was running, when shutdown_timeout cancelled it. B
            # ran a pass on each (one, when both came before it began); C,
            # another group, none.
            assert claimer_of(b).wakes == 2
            assert claimer_of(b).passes in (2, 3)
            assert (claimer_of(c).wakes, claimer_of(c).passes) == (0, 1)
            assert c.stats.claimed == 0
            assert len(audited.ids) == total  # C's own group: each once
    # Two notices, from A; B and C had nothing pending when they stopped.
    await topic.stop_message("1-2")
    assert await notices_until(wire, b"stop 1-2") == [
        b"handback workers",
        b"handback workers",
        b"stop 1-1",
        b"stop 1-2",
    ]
    await wire.aclose()


async def test_a_burst_of_notices_costs_one_pass_and_only_the_named_group_wakes(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    ours = make_consumer(redis_client, "b")
    ours.handler("job")(Recorder())
    other = make_consumer(redis_client, "c", group=OTHER)
    other.handler("job")(Recorder())
    async with ours, other:
        await wait_until(lambda: between_passes(ours, other))
        async with redis_client.pipeline(transaction=False) as pipe:
            for _ in range(5):
                pipe.publish(topic.keys.control_channel, f"handback {GROUP}")
            pipe.publish(topic.keys.control_channel, f"handback {GROUP}x")
            pipe.publish(topic.keys.control_channel, f"handback {GROUP[:-1]}")
            await pipe.execute()
        await heard_everything_before(ours, topic, "1-1")
        await heard_everything_before(other, topic, "1-1")
        await wait_until(lambda: between_passes(ours))
        assert (claimer_of(ours).wakes, claimer_of(ours).passes) == (5, 2)
        assert (claimer_of(other).wakes, claimer_of(other).passes) == (0, 1)
        assert ours.stop_reason is other.stop_reason is None


async def test_a_stopping_consumer_ignores_the_notice(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    await topic.publish("job", {})
    gate = anyio.Event()
    started = anyio.Event()
    consumer = make_consumer(redis_client, "b", shutdown_timeout=10.0)

    @consumer.handler("job")
    async def hold(msg: Message[Any]) -> None:
        started.set()
        await gate.wait()

    async with consumer:
        with anyio.fail_after(10):
            await started.wait()
        consumer.request_stop()  # waits for the running handler
        await redis_client.publish(topic.keys.control_channel, f"handback {GROUP}")
        await heard_everything_before(consumer, topic, "1-1")
        assert claimer_of(consumer).wakes == 0
        gate.set()
    assert consumer.stop_reason is StopReason.STOPPED
    assert consumer.stats.handled == 1


@pytest.mark.private_server
async def test_a_consumer_that_may_not_publish_still_stops_and_hands_back(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    admin = redis.asyncio.Redis.from_url(private_redis.url)
    await admin.execute_command(
        "ACL", "SETUSER", "quiet", "on", ">pw", "~*", "&*", "+@all", "-publish"
    )
    client = redis.asyncio.Redis(
        host="127.0.0.1", port=private_redis.port, username="quiet", password="pw"
    )
    try:
        ids = await Topic(client, STREAM).publish_many([("job", {"n": n}) for n in range(10)])
        started = anyio.Event()
        consumer = make_consumer(client, "a", concurrency=1, shutdown_timeout=0.2)

        @consumer.handler("job")
        async def hang(msg: Message[Any]) -> None:
            started.set()
            await anyio.Event().wait()

        with caplog.at_level(logging.INFO, logger="redcurrent"):
            async with consumer:
                with anyio.fail_after(10):
                    await started.wait()
        assert consumer.stop_reason is StopReason.STOPPED
        refused = [r for r in caplog.records if "could not announce" in r.getMessage()]
        # At the stop (what was queued) and at the end (all still pending).
        assert {r.levelno for r in refused} == {logging.WARNING}
        counts = [int(re.search(r"handed back (\d+) entries", r.getMessage())[1]) for r in refused]
        assert counts[-1] == 10  # the last covers everything still pending
        # Handed back all the same: idle far beyond any claim_idle.
        pel = await pel_of(admin, STREAM, GROUP)
        assert sorted(pel) == sorted(ids)
        assert all(idle >= 86_400_000 for _, idle, _ in pel.values())
    finally:
        await client.aclose()
        await admin.aclose()


async def test_the_listener_ignores_notices_it_does_not_know(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    heard: list[tuple[str, str]] = []
    listener = ControlListener(
        redis_client,
        topic.keys,
        on_stop=lambda entry_id: heard.append(("stop", entry_id)),
        on_resume=lambda entry_id: heard.append(("resume", entry_id)),
        on_terminate=lambda: heard.append(("terminate", "")),
        on_scheduled=lambda due: heard.append(("scheduled", str(due))) if due else None,
        on_hand_back=lambda group: heard.append(("handback", group)),
    )
    # A listener built without the callback (as before hand-back notices).
    old = ControlListener(
        redis_client,
        topic.keys,
        on_stop=lambda entry_id: heard.append(("old stop", entry_id)),
        on_resume=lambda entry_id: None,
        on_terminate=lambda: heard.append(("old terminate", "")),
    )
    channel = topic.keys.control_channel
    async with anyio.create_task_group() as tg:
        await tg.start(listener.run)
        await tg.start(old.run)
        for text in (
            "frobnicate 1-0",
            "handback",
            "",
            "HANDBACK workers",
            "handback workers",
            "handback a group with spaces",
        ):
            await redis_client.publish(channel, text)
        await topic.stop_message("2-0")
        await wait_until(lambda: ("old stop", "2-0") in heard and ("stop", "2-0") in heard)
        tg.cancel_scope.cancel()
    assert sorted(heard) == [
        ("handback", "a group with spaces"),
        ("handback", "workers"),
        ("old stop", "2-0"),
        ("stop", "2-0"),
    ]


async def test_retry_is_not_counted_as_a_failure(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    consumer = make_consumer(
        redis_client,
        "b",
        claim_idle=5.0,
        retry=RetryPolicy(delay=0.05, jitter=0),
        max_deliveries=2,
    )
    calls: list[tuple[str, int]] = []

    @consumer.handler("asks")
    async def asks(msg: Message[Any]) -> None:
        calls.append(("asks", msg.delivery_count))
        if msg.delivery_count == 1:
            raise Retry(delay=0.05)

    @consumer.handler("breaks")
    async def breaks(msg: Message[Any]) -> None:
        calls.append(("breaks", msg.delivery_count))
        if msg.delivery_count == 1:
            raise RuntimeError("a real failure")

    @consumer.handler("stubborn")
    async def stubborn(msg: Message[Any]) -> None:
        calls.append(("stubborn", msg.delivery_count))
        raise Retry()

    @consumer.batch_handler("bulk", size=3, timeout=0.2)
    async def bulk(msgs: list[Message[Any]]) -> None:
        calls.append(("bulk", max(m.delivery_count for m in msgs)))
        if msgs[0].delivery_count == 1:
            raise Retry()

    await topic.publish_many(
        [("asks", {}), ("breaks", {}), ("stubborn", {}), ("bulk", {}), ("bulk", {}), ("bulk", {})]
    )
    async with consumer:
        await wait_until(lambda: consumer.stats.handled == 5 and consumer.stats.dead_lettered == 1)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
    stats = consumer.stats
    assert sorted(calls) == sorted(
        [(kind, n) for kind in ("asks", "breaks", "stubborn", "bulk") for n in (1, 2)]
    )
    # One real failure; the Retry of every other kind is not one. Each first
    # delivery that did not succeed came back here: 1 + 1 + 1 + 3 retries.
    assert (stats.failed, stats.retried) == (1, 6)
    assert (stats.handled, stats.dead_lettered, stats.received) == (5, 1, 12)
    [letter] = await topic.dead_letters()
    assert (letter.type, letter.error_type, letter.delivery_count) == ("stubborn", "Retry", 2)


async def test_queued_messages_are_handed_back_while_the_running_ones_finish(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    """A graceful stop does not start what was queued: it hands it back at
    once, so a peer handles it while the stopping consumer's running
    handlers are still finishing (here: until the peer is done)."""
    ids = await topic.publish_many([("job", {"n": i}) for i in range(40)])
    release = anyio.Event()
    a_ran: list[str] = []
    a = make_consumer(redis_client, "a", concurrency=2, shutdown_timeout=30)

    @a.handler("job")
    async def slow(msg: Message[Any]) -> None:
        a_ran.append(msg.id)
        await release.wait()

    b_seen = Recorder()
    b = make_consumer(redis_client, "b", concurrency=4)
    async with a:
        await wait_until(lambda: a.stats.held == 40 and a.stats.running == 2)
        b.handler("job")(b_seen)
        async with b:
            await wait_until(lambda: between_passes(b))
            a.request_stop()
            # A's two handlers still run; the other 38 reach B meanwhile.
            await b_seen.wait_for(38, timeout=10)
            assert a.stop_reason is None
            release.set()
            assert await a.done() is StopReason.STOPPED
            await wait_until(nothing_pending(redis_client, STREAM, GROUP))
    assert sorted(a_ran + b_seen.ids) == sorted(ids)
    assert len(a_ran) == 2
