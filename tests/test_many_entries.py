"""Consumers holding many entries at once, the way production runs them.

Almost every other test holds one or two entries at a time, and some code paths
only run with many: lease renewal and hand-back of a whole set of held entries
(a script that passed only the first id went unnoticed), the prefetch budget,
stopped messages parked in that budget, recovery of more than one page of own
pending entries. Each test here holds dozens to thousands of entries, usually
with a peer consumer of the same group polling all along.

Absence windows ("B never takes anything for 3 x claim_idle") have no event to
await: they are watched by sampling the group's pending list (PEL) for the
whole window and asserting on every sample.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
import redis as sync_redis
import redis.asyncio

from helpers import Recorder, nothing_pending, pel_of, pending_count, wait_until
from redcurrent import BatchConfig, Message, StartFrom, StopReason, StreamConsumer, Topic

STREAM = "many"
GROUP = "g"


def make(client: redis.asyncio.Redis, name: str, **kwargs: Any) -> StreamConsumer:
    """A consumer of the shared group with durations small enough for tests."""
    options: dict[str, Any] = {
        "start": StartFrom.EARLIEST,
        "claim_idle": 1.0,
        "block": 0.2,
        "shutdown_timeout": 1.0,
    }
    options.update(kwargs)
    return StreamConsumer(client, STREAM, GROUP, name, **options)


@pytest.fixture
def topic(redis_client: redis.asyncio.Redis) -> Topic:
    return Topic(redis_client, STREAM)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def pel(client: redis.asyncio.Redis) -> dict[str, tuple[str, int, int]]:
    """The group's pending list: id -> (consumer, idle ms, delivery count)."""
    return await pel_of(client, STREAM, GROUP)


async def owned_by(client: redis.asyncio.Redis, consumer: str) -> int:
    """How many pending entries ``consumer`` owns (one XPENDING summary)."""
    summary = await client.xpending(STREAM, GROUP)
    for row in summary["consumers"] or []:
        if _s(row["name"]) == consumer:
            return int(row["pending"])
    return 0


async def watch(check: Callable[[], Awaitable[None]], seconds: float, every: float = 0.1) -> None:
    """Run ``check`` (which asserts) again and again for ``seconds``: an absence
    window, for which there is no event to await."""
    end = anyio.current_time() + seconds
    while True:
        await check()
        if anyio.current_time() >= end:
            return
        await anyio.sleep(every)


async def leave_pending(
    client: redis.asyncio.Redis, topic: Topic, n: int, consumer: str
) -> list[str]:
    """Publish ``n`` messages and read them as ``consumer`` with a raw XREADGROUP,
    never acknowledged: what a consumer that died leaves behind."""
    await client.xgroup_create(STREAM, GROUP, id="$", mkstream=True)
    ids = await topic.publish_many([("job", {"n": i}) for i in range(n)])
    reply = await client.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=n)
    assert [_s(i) for i, _ in reply[0][1]] == ids
    return ids


def warnings_of_redcurrent(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.levelname} {r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("redcurrent")
    ]


# -- leases --------------------------------------------------------------------------------------


async def test_four_slow_handlers_keep_their_messages_from_a_polling_peer(
    redis_client: redis.asyncio.Redis, topic: Topic, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="redcurrent")
    ids = await topic.publish_many([("job", {"n": i}) for i in range(4)])
    release = anyio.Event()
    running: set[str] = set()
    all_running = anyio.Event()
    done_by_a: list[str] = []

    a = make(redis_client, "a", concurrency=4)

    @a.handler("job")
    async def slow(msg: Message[Any]) -> None:
        running.add(msg.id)
        if len(running) == len(ids):
            all_running.set()
        await release.wait()
        done_by_a.append(msg.id)

    b = make(redis_client, "b", concurrency=4)
    seen_by_b = Recorder()
    b.handler("job")(seen_by_b)

    async def a_keeps_all_of_them() -> None:
        rows = await pel(redis_client)
        got = {i: (owner, count) for i, (owner, _, count) in rows.items()}
        assert got == dict.fromkeys(ids, ("a", 1)), (
            "an entry whose handler still runs was claimed (or its delivery count rose)"
        )
        assert seen_by_b.ids == []

    async with a:
        with anyio.fail_after(5):
            await all_running.wait()
        async with b:
            await watch(a_keeps_all_of_them, seconds=3.0)  # handlers run 3 x claim_idle
            assert a.stats.held == len(ids)
            release.set()
            await wait_until(nothing_pending(redis_client, STREAM, GROUP))
            assert b.stats.received == 0
    assert sorted(done_by_a) == sorted(ids)
    assert seen_by_b.ids == []
    assert warnings_of_redcurrent(caplog) == []  # in particular: A lost nothing


async def test_more_than_a_thousand_held_entries_stay_with_their_consumer(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    n = 1200
    ids = await topic.publish_many([("job", {"n": i}) for i in range(n)])
    release = anyio.Event()
    done_by_a: list[str] = []

    a = make(redis_client, "a", concurrency=16, prefetch=n)

    @a.handler("job")
    async def blocked(msg: Message[Any]) -> None:
        await release.wait()
        done_by_a.append(msg.id)

    b = make(redis_client, "b", concurrency=4)
    seen_by_b = Recorder()
    b.handler("job")(seen_by_b)

    async def a_keeps_all_of_them() -> None:
        assert seen_by_b.ids == [], f"the peer ran {len(seen_by_b.ids)} held entries"
        rows = await pel(redis_client)
        assert len(rows) == n
        taken = sorted(i for i, (owner, _, _) in rows.items() if owner != "a")
        assert taken == [], f"{len(taken)} held entries were claimed by a peer"
        raised = sorted(i for i, (_, _, count) in rows.items() if count != 1)
        assert raised == [], f"{len(raised)} held entries were delivered again"

    async with a:
        await wait_until(lambda: a.stats.held == n, timeout=10)

        async def a_owns_all() -> bool:
            return await owned_by(redis_client, "a") == n

        await wait_until(a_owns_all, timeout=5)
        async with b:
            await watch(a_keeps_all_of_them, seconds=3.0, every=0.25)  # 3 x claim_idle
            assert b.stats.received == 0
            release.set()
            await wait_until(nothing_pending(redis_client, STREAM, GROUP), timeout=15)
    assert sorted(done_by_a) == sorted(ids)
    assert len(done_by_a) == n
    assert seen_by_b.ids == []


async def test_slow_failures_do_not_inflate_delivery_counts(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    """Handlers that run longer than claim_idle and fail once are retried once,
    never dead-lettered for deliveries they did not get."""
    n = 6
    ids = await topic.publish_many([("job", {"n": i}) for i in range(n)])
    release = anyio.Event()
    attempts: Counter[str] = Counter()
    first_tries = anyio.Event()
    succeeded: dict[str, int] = {}

    consumer = make(redis_client, "c", concurrency=8, max_deliveries=3)

    @consumer.handler("job")
    async def fails_once_slowly(msg: Message[Any]) -> None:
        attempts[msg.id] += 1
        if attempts[msg.id] == 1:
            if len(attempts) == n:
                first_tries.set()
            await release.wait()
            raise RuntimeError("first attempt fails")
        succeeded[msg.id] = msg.delivery_count

    counts_seen: set[int] = set()

    async def record_counts() -> None:
        counts_seen.update(count for _, _, count in (await pel(redis_client)).values())

    async with consumer:
        with anyio.fail_after(5):
            await first_tries.wait()
        await watch(record_counts, seconds=1.5)  # the first attempts run 1.5 x claim_idle
        release.set()
        # Retries come after claim_idle; dead-lettered entries are acked too.
        await wait_until(nothing_pending(redis_client, STREAM, GROUP), timeout=10)
    letters = await topic.dead_letters()
    assert [(d.original_id, d.reason) for d in letters] == []
    assert consumer.stats.dead_lettered == 0
    assert succeeded == dict.fromkeys(ids, 2)  # delivery 1 failed, delivery 2 succeeded
    assert counts_seen == {1}, "delivery counts rose while the first attempts still ran"


# -- stopping ------------------------------------------------------------------------------------


async def test_graceful_stop_hands_back_all_it_holds(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    n = 50
    ids = await topic.publish_many([("job", {"n": i}) for i in range(n)])
    a = make(redis_client, "a", concurrency=8, prefetch=64, claim_idle=30, shutdown_timeout=0.5)

    @a.handler("job")
    async def never_finishes(msg: Message[Any]) -> None:
        await anyio.Event().wait()

    async with a:
        await wait_until(lambda: a.stats.held == n)
        assert await a.stop() is StopReason.STOPPED
    rows = await pel(redis_client)
    assert sorted(rows) == sorted(ids)
    not_back = [i for i, (_, idle, _) in rows.items() if idle < 29_000]
    assert not_back == [], f"{len(not_back)} of {n} held entries were not handed back"

    # A peer that claims only after 30 s of idleness gets all of them at once.
    b = make(redis_client, "b", concurrency=8, claim_idle=30)
    seen = Recorder()
    b.handler("job")(seen)
    async with b:
        await seen.wait_for(n, timeout=10)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
    assert sorted(seen.ids) == sorted(ids)
    assert len(seen.ids) == n


# -- the prefetch bound ------------------------------------------------------------------------


@pytest.mark.parametrize("left_idle", [0, 1000], ids=["new-only", "claims-and-reads"])
async def test_prefetch_bounds_what_one_consumer_holds(
    redis_client: redis.asyncio.Redis, topic: Topic, left_idle: int
) -> None:
    """2,000 entries, ``prefetch=64``: neither the consumer's memory nor its share
    of the PEL ever exceeds 64, and a peer gets the rest. With ``left_idle``,
    that many entries were left idle by a dead consumer, so that the claim loop
    and the read loop both take entries at the same time."""
    n, prefetch = 2000, 64
    ids: list[str] = []
    if left_idle:
        ids += await leave_pending(redis_client, topic, left_idle, "dead-1")
    ids += await topic.publish_many([("job", {"n": i}) for i in range(n - len(ids))])
    if left_idle:

        async def left_long_enough() -> bool:
            rows = await pel(redis_client)
            return min(idle for _, idle, _ in rows.values()) > 600

        await wait_until(left_long_enough)

    handled: list[tuple[str, str]] = []
    peaks = {"in_flight": 0, "pel": 0}
    a = make(redis_client, "a", concurrency=8, prefetch=prefetch, claim_idle=0.5)

    @a.handler("job")
    async def slowish(msg: Message[Any]) -> None:
        peaks["in_flight"] = max(peaks["in_flight"], a.stats.held)
        await anyio.sleep(0.005)
        handled.append((msg.id, "a"))

    b = make(redis_client, "b", concurrency=8, claim_idle=0.5)

    @b.handler("job")
    async def also_slowish(msg: Message[Any]) -> None:
        await anyio.sleep(0.005)
        handled.append((msg.id, "b"))

    async def sample() -> None:
        while True:
            peaks["in_flight"] = max(peaks["in_flight"], a.stats.held)
            peaks["pel"] = max(peaks["pel"], await owned_by(redis_client, "a"))
            await anyio.sleep(0.005)

    async with a, anyio.create_task_group() as tg:  # A created the group: sample from now on
        tg.start_soon(sample)
        async with b:
            await wait_until(lambda: len(handled) >= n, timeout=15)
            await wait_until(nothing_pending(redis_client, STREAM, GROUP))
        tg.cancel_scope.cancel()
    assert peaks["in_flight"] <= prefetch, f"A held {peaks['in_flight']} entries in memory"
    assert peaks["pel"] <= prefetch, f"A owned {peaks['pel']} entries of the PEL"
    by = Counter(name for _, name in handled)
    assert by["a"] > 0
    assert by["b"] > 0
    assert Counter(i for i, _ in handled) == Counter(ids)  # each exactly once


# -- stopped messages --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "every", "n_stopped", "options"),
    [
        (1000, 7, 130, {}),  # the defaults: prefetch 256, concurrency 16
        (400, 4, 100, {"prefetch": 32, "concurrency": 8}),
    ],
    ids=["defaults", "small-prefetch"],
)
async def test_stopped_messages_do_not_stall_the_others(
    redis_client: redis.asyncio.Redis,
    topic: Topic,
    n: int,
    every: int,
    n_stopped: int,
    options: dict[str, Any],
) -> None:
    ids = await topic.publish_many([("job", {"n": i}) for i in range(n)])
    stopped = ids[3::every][:n_stopped]
    assert len(stopped) == n_stopped
    for entry_id in stopped:
        await topic.stop_message(entry_id)
    others = sorted(set(ids) - set(stopped))

    consumer = make(redis_client, "c", claim_idle=30, **options)
    seen = Recorder()
    consumer.handler("job")(seen)
    async with consumer:
        await seen.wait_for(len(others), timeout=10)

        async def stopped_ones_wait() -> bool:
            return await pending_count(redis_client, STREAM, GROUP) == n_stopped

        await wait_until(stopped_ones_wait)
        info = await topic.info()
        assert [(g.name, g.lag, g.pending) for g in info.groups] == [(GROUP, 0, n_stopped)]
        assert sorted(seen.ids) == others  # none of the stopped ones, none twice

        for entry_id in stopped:
            await topic.resume_message(entry_id)
        await seen.wait_for(n, timeout=10)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
    assert Counter(seen.ids) == Counter(ids)


# -- recovery of what a dead consumer left ----------------------------------------------------


@pytest.mark.parametrize("prefetch", [None, 2000], ids=["default-prefetch", "prefetch-2000"])
async def test_a_restarted_consumer_recovers_all_it_left(
    redis_client: redis.asyncio.Redis, topic: Topic, prefetch: int | None
) -> None:
    """1,200 entries pending for "dead-1": a new "dead-1" finishes them all from
    its own pending list (pages of up to 500), without waiting for claim_idle."""
    n = 1200
    ids = await leave_pending(redis_client, topic, n, "dead-1")
    consumer = make(redis_client, "dead-1", claim_idle=30, prefetch=prefetch)
    seen = Recorder()
    consumer.handler("job")(seen)
    async with consumer:
        await seen.wait_for(n, timeout=10)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
    assert Counter(seen.ids) == Counter(ids)
    assert consumer.stats.claimed == 0  # its own, not taken over


async def test_another_consumer_claims_all_a_dead_one_left(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    """1,200 entries idle for "dead-1" are all taken over by "new-1", step after
    step, while its read loop blocks for new entries (the default ``block``, 5 s):
    a blocked read must not keep the claim loop waiting."""
    n = 1200
    ids = await leave_pending(redis_client, topic, n, "dead-1")
    consumer = make(redis_client, "new-1", claim_idle=0.5, block=5.0)
    seen = Recorder()
    consumer.handler("job")(seen)
    async with consumer:
        await seen.wait_for(n, timeout=10)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
    assert Counter(seen.ids) == Counter(ids)
    assert consumer.stats.claimed == n


# -- many messages, competing consumers ---------------------------------------------------


async def test_five_thousand_messages_two_consumers_each_handled_once(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    """Entries wait in memory longer than claim_idle (prefetch 512 at about 400
    per second per consumer): only leases keep the peer from taking them."""
    n = 5000
    ids = await topic.publish_many([("job", {"n": i}) for i in range(n)])
    handled: list[tuple[str, str]] = []
    consumers = []
    for name in ("a", "b"):
        consumer = make(redis_client, name, concurrency=8, prefetch=512, claim_idle=1.0)

        async def handle(msg: Message[Any], name: str = name) -> None:
            await anyio.sleep(0.02)
            handled.append((msg.id, name))

        consumer.handler("job")(handle)
        consumers.append(consumer)
    a, b = consumers
    async with a, b:
        await wait_until(lambda: len(handled) >= n, timeout=15)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
    twice = [i for i, k in Counter(i for i, _ in handled).items() if k > 1]
    assert twice == [], f"{len(twice)} messages were handled more than once"
    assert sorted(i for i, _ in handled) == sorted(ids)
    assert {name for _, name in handled} == {"a", "b"}
    assert a.stats.claimed == 0
    assert b.stats.claimed == 0


# -- batches and stops ---------------------------------------------------------------------


async def test_a_stop_during_running_batches_acks_the_finished_and_hands_back_the_rest(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    n = 120  # batches of 50, 50 and 20, all running at once
    ids = await topic.publish_many([("job", {"n": i}) for i in range(n)])
    consumer = make(
        redis_client,
        "c",
        concurrency=4,
        claim_idle=30,
        shutdown_timeout=1.0,
        batch=BatchConfig(size=50, timeout=0.2),
    )
    batches: dict[str, list[str]] = {}
    gates: dict[str, anyio.Event] = {}
    all_running = anyio.Event()
    completed: list[str] = []

    @consumer.batch_handler("job", size=50)
    async def handle(msgs: list[Message[Any]]) -> None:
        key = msgs[0].id
        batches[key] = [m.id for m in msgs]
        gate = gates.setdefault(key, anyio.Event())
        if sum(map(len, batches.values())) == n:
            all_running.set()
        await gate.wait()
        completed.extend(m.id for m in msgs)

    async with consumer:
        with anyio.fail_after(5):
            await all_running.wait()
        [first] = [k for k, v in batches.items() if ids[0] in v]
        consumer.request_stop()
        gates[first].set()  # this batch finishes within shutdown_timeout, the others do not
        assert await consumer.done() is StopReason.STOPPED
    rows = await pel(redis_client)
    finished = set(completed)
    assert finished == set(batches[first])
    assert not finished & rows.keys(), "handled messages were left pending"
    assert finished | rows.keys() == set(ids), "messages were lost"
    not_back = sorted(i for i, (_, idle, _) in rows.items() if idle < 29_000)
    assert not_back == [], f"{len(not_back)} of {len(rows)} unfinished messages not handed back"


async def test_stopping_one_message_of_a_running_batch_handles_the_others_once(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    n = 50
    ids = await topic.publish_many([("job", {"n": i}) for i in range(n)])
    target = ids[10]
    consumer = make(
        redis_client, "c", concurrency=4, claim_idle=30, batch=BatchConfig(size=n, timeout=0.2)
    )
    calls: list[list[str]] = []
    first_call = anyio.Event()
    cancelled = anyio.Event()
    gate = anyio.Event()
    completed: list[Message[Any]] = []

    @consumer.batch_handler("job", size=n)
    async def handle(msgs: list[Message[Any]]) -> None:
        calls.append([m.id for m in msgs])
        first_call.set()
        if len(calls) == 1:
            try:
                await gate.wait()
            except anyio.get_cancelled_exc_class():
                cancelled.set()
                raise
        completed.extend(msgs)

    async with consumer:
        with anyio.fail_after(5):
            await first_call.wait()
        assert sorted(calls[0]) == sorted(ids)
        await topic.stop_message(target)
        with anyio.fail_after(5):
            await cancelled.wait()  # README: a running handler of a stopped message is cancelled
        gate.set()
        await wait_until(lambda: len(completed) >= n - 1)

        async def only_the_stopped_one_left() -> bool:
            return list(await pel(redis_client)) == [target]

        await wait_until(only_the_stopped_one_left)
        counts = Counter(m.id for m in completed)
        assert counts == Counter(i for i in ids if i != target)  # the others: once each
        assert {m.delivery_count for m in completed} == {1}
        await topic.resume_message(target)
        await wait_until(lambda: len(completed) >= n)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
    assert Counter(m.id for m in completed) == Counter(ids)


# -- a stop racing a read the server already served -------------------------------------------


async def test_a_stop_hands_back_entries_whose_read_it_cancelled(
    redis_client: redis.asyncio.Redis, topic: Topic, redis_url: str
) -> None:
    """The server delivers entries to a blocked XREADGROUP in the same step as the
    write that wakes it; a stop that cancels the read before its reply is parsed
    leaves them pending for this consumer though it never held them. They must
    still be handed back (idle = claim_idle), not wait claim_idle for a peer.

    To force it, the entries are written with a *blocking* client from the event
    loop's own thread: the server has served the read when the write returns,
    and the loop has not run since, so the stop cancels a read whose reply sits
    unparsed in the socket."""
    consumer = make(redis_client, "c", claim_idle=30, block=5.0)
    seen = Recorder()
    consumer.handler("job")(seen)

    async def reader_blocked() -> bool:
        clients = await redis_client.client_list()
        return any(c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "") for c in clients)

    with sync_redis.Redis.from_url(redis_url) as blocking:
        blocking.ping()
        async with consumer:
            await wait_until(reader_blocked, timeout=5)
            with blocking.pipeline(transaction=True) as multi:  # one step: one read serves all
                for i in range(50):
                    multi.xadd(STREAM, {"type": "job", "data": f'{{"n":{i}}}', "metadata": "{}"})
                ids = [_s(i) for i in multi.execute()]
            consumer.request_stop()  # the loop has not run since the write
            assert await consumer.done() is StopReason.STOPPED
    rows = await pel(redis_client)
    [group] = await redis_client.xinfo_groups(STREAM)
    if _s(group["last-delivered-id"]) != ids[-1]:
        pytest.skip("the read was not blocked when the entries came; nothing was delivered")
    assert not set(seen.ids) & rows.keys()
    assert set(seen.ids) | rows.keys() == set(ids), "delivered entries were lost"
    not_back = sorted(i for i, (_, idle, _) in rows.items() if idle < 29_000)
    assert not_back == [], f"{len(not_back)} entries delivered to the stopped consumer kept"
