"""Partitioned topics on one server (issue 19): the layout, keyed routing, ids,
the operator methods across partitions, and consumers sharing the partitions
of a group with per-key order. The cluster variants are in
test_partitions_cluster.py; partitions are plain streams on one server."""

from __future__ import annotations

import collections
import random
import uuid
from typing import Any

import anyio
import pytest
import redis.asyncio
from redis.crc import key_slot

from helpers import wait_until
from redcurrent import (
    CleanupPolicy,
    Message,
    PartitionCountError,
    StartFrom,
    StopReason,
    StreamConsumer,
    Topic,
)
from redcurrent._membership import assign
from redcurrent._partitions import partition_for, spread_streams

FAST: dict[str, Any] = {
    "start": StartFrom.EARLIEST,
    "member_ttl": 1.0,
    "claim_idle": 2.0,
    "block": 0.5,
    "shutdown_timeout": 2.0,
}


@pytest.fixture
def name() -> str:
    return f"parts-{uuid.uuid4().hex[:8]}"


async def keys_of(client: redis.asyncio.Redis, name: str) -> list[str]:
    return sorted(k.decode() for k in await client.keys(f"*{name}*"))


# -- layout -----------------------------------------------------------------


@pytest.mark.parametrize("count", [3, 6, 12])
def test_partition_streams_spread_evenly_over_three_equal_shards(count: int) -> None:
    for topic in ("orders", "events-2026", "a{tag}b"):
        streams = spread_streams(topic, count)
        assert len(set(streams)) == count
        shards = collections.Counter(min(key_slot(s.encode()) * 3 // 16384, 2) for s in streams)
        # Within one partition of the fair share on each of 3 equal slot ranges.
        assert all(abs(n - count / 3) <= 1 for n in shards.values()), (topic, shards)
        assert sum(shards.values()) == count


def test_the_partition_of_a_key_is_crc32_as_go_computes_it() -> None:
    # The standard check value of CRC-32/IEEE (Go's crc32.ChecksumIEEE).
    assert partition_for("123456789", 1 << 32) == 0xCBF43926
    assert partition_for("123456789", 12) == 0xCBF43926 % 12


def test_capped_rendezvous_keeps_every_member_within_one_of_its_share() -> None:
    for members in (1, 2, 3, 5, 7):
        names = [f"worker-{i}" for i in range(members)]
        for count in (3, 6, 12, 16):
            mapping = assign(names, count)
            assert sorted(mapping) == list(range(count))
            load = collections.Counter(mapping.values())
            assert max(load.values()) <= -(-count // members)
    before = assign(["a", "b", "c"], 12)
    after = assign(["a", "b", "c", "d"], 12)
    moved = sum(before[p] != after[p] for p in range(12))
    assert 3 <= moved <= 6  # the newcomer's share (3), not a reshuffle


async def test_the_count_is_stored_and_fixed(redis_client: redis.asyncio.Redis, name: str) -> None:
    topic = Topic(redis_client, name, partitions=4)
    streams = await topic.partition_streams()
    assert len(streams) == 4
    assert await Topic(redis_client, name).partition_streams() == streams
    with pytest.raises(PartitionCountError) as raised:
        await Topic(redis_client, name, partitions=3).publish("t", {})
    assert (raised.value.stored, raised.value.requested) == (4, 3)
    with pytest.raises(PartitionCountError):
        await Topic(redis_client, name, partitions=1).info()
    meta = await redis_client.hgetall(topic.keys.meta)
    assert meta[b"partitions"] == b"4"
    assert meta[b"hash"] == b"crc32"


async def test_a_plain_stream_is_not_silently_partitioned(
    redis_client: redis.asyncio.Redis, name: str
) -> None:
    await Topic(redis_client, name).publish("t", {})
    with pytest.raises(PartitionCountError) as raised:
        await Topic(redis_client, name, partitions=2).publish("t", {})
    assert raised.value.plain
    # One partition is the plain layout: no meta hash, today's stream.
    assert await Topic(redis_client, name, partitions=1).partition_streams() == [name]
    assert await redis_client.exists(Topic(redis_client, name).keys.meta) == 0


# -- publishing ---------------------------------------------------------------


async def test_keyed_messages_keep_their_partition_and_ids_name_it(
    redis_client: redis.asyncio.Redis, name: str
) -> None:
    topic = Topic(redis_client, name, partitions=5)
    streams = await topic.partition_streams()
    ids = [await topic.publish("t", {"n": n}, key=f"k{n % 7}") for n in range(35)]
    for n, message_id in enumerate(ids):
        partition, _, entry_id = message_id.partition(":")
        assert int(partition) == partition_for(f"k{n % 7}", 5)
        fields = await redis_client.xrange(streams[int(partition)], entry_id, entry_id)
        assert fields[0][1][b"key"] == f"k{n % 7}".encode()
    keyless = {(await topic.publish("t", {})).split(":")[0] for _ in range(10)}
    assert keyless == {"0", "1", "2", "3", "4"}  # round-robin


async def test_publish_many_routes_each_item_and_keeps_the_input_order(
    redis_client: redis.asyncio.Redis, name: str
) -> None:
    topic = Topic(redis_client, name, partitions=3)
    keys: list[str | None] = [f"c{n % 10}" if n % 4 else None for n in range(600)]
    ids = await topic.publish_many([("t", {"n": n}) for n in range(600)], keys=keys)
    assert len(ids) == 600
    streams = await topic.partition_streams()
    for n, message_id in enumerate(ids):
        partition, _, entry_id = message_id.partition(":")
        key = keys[n]
        if key is not None:
            assert int(partition) == partition_for(key, 3)
        entry = await redis_client.xrange(streams[int(partition)], entry_id, entry_id)
        assert entry[0][1][b"data"] == f'{{"n":{n}}}'.encode()
    info = await topic.info()
    assert info.length == 600
    assert [row.length for row in info.partitions] == [await redis_client.xlen(s) for s in streams]
    with pytest.raises(Exception, match="keys"):
        await topic.publish_many([("t", {})], keys=["a", "b"])


# -- consuming ----------------------------------------------------------------


def keyed_recorder(
    consumer: StreamConsumer, log: list[tuple[str, int, str, int]], *, pause: float = 0.002
) -> None:
    @consumer.handler("t")
    async def record(msg: Message[Any]) -> None:
        assert msg.key is not None
        assert msg.partition is not None
        log.append((msg.key, msg.data["n"], consumer.name, msg.partition))
        await anyio.sleep(random.random() * pause)


async def test_consumers_share_the_partitions_and_keep_per_key_order(
    redis_client: redis.asyncio.Redis, name: str
) -> None:
    total = 3000
    topic = Topic(redis_client, name, partitions=6)
    await topic.partition_streams()
    log: list[tuple[str, int, str, int]] = []
    consumers = [StreamConsumer(redis_client, name, "g", f"c{i}", **FAST) for i in range(3)]
    for consumer in consumers:
        keyed_recorder(consumer, log)
    async with consumers[0]:
        await topic.publish_many(
            [("t", {"n": n}) for n in range(total // 2)],
            keys=[f"key-{n % 60}" for n in range(total // 2)],
        )
        async with consumers[1], consumers[2]:
            await topic.publish_many(
                [("t", {"n": n}) for n in range(total // 2, total)],
                keys=[f"key-{n % 60}" for n in range(total // 2, total)],
            )
            await wait_until(lambda: len({e[1] for e in log}) == total, timeout=30)

            async def spread() -> bool:
                owned = [set(c.partitions or ()) for c in consumers]
                return sum(map(len, owned)) == 6 and all(len(o) == 2 for o in owned)

            await wait_until(spread, timeout=10)
            info = await topic.info()
            owners = [row.owners["g"] for row in info.partitions]
            assert sorted(collections.Counter(owners).values()) == [2, 2, 2]
    first: dict[str, list[int]] = collections.defaultdict(list)
    seen: set[int] = set()
    for key, n, _, _ in log:
        if n not in seen:
            seen.add(n)
            first[key].append(n)
    assert len(seen) == total
    for key, numbers in first.items():
        assert numbers == sorted(numbers), key
    assert (await topic.info()).groups[0].pending == 0


async def test_a_leaving_member_hands_its_partitions_over(
    redis_client: redis.asyncio.Redis, name: str
) -> None:
    topic = Topic(redis_client, name, partitions=4)
    await topic.partition_streams()
    log: list[tuple[str, int, str, int]] = []
    a = StreamConsumer(redis_client, name, "g", "a", **FAST)
    b = StreamConsumer(redis_client, name, "g", "b", **FAST)
    keyed_recorder(a, log)
    keyed_recorder(b, log)
    async with a:
        async with b:
            await wait_until(lambda: len(a.partitions or ()) == len(b.partitions or ()) == 2)
        assert b.stop_reason is StopReason.STOPPED
        await wait_until(lambda: a.partitions == [0, 1, 2, 3], timeout=10)
        await topic.publish_many(
            [("t", {"n": n}) for n in range(200)], keys=[f"k{n}" for n in range(200)]
        )
        await wait_until(lambda: len(log) >= 200)
    assert {entry[2] for entry in log} == {"a"}
    assert sorted(entry[1] for entry in log) == list(range(200))


async def test_stop_and_resume_take_partitioned_ids(
    redis_client: redis.asyncio.Redis, name: str
) -> None:
    topic = Topic(redis_client, name, partitions=3)
    ids = await topic.publish_many([("t", {"n": n}) for n in range(30)])
    held = ids[7]
    await topic.stop_message(held)
    assert (await topic.info()).stopped == [held]
    log: list[tuple[str, int, str, int]] = []
    consumer = StreamConsumer(redis_client, name, "g", "c", **FAST)

    @consumer.handler("t")
    async def record(msg: Message[Any]) -> None:
        log.append((msg.id, msg.data["n"], "c", msg.partition or 0))

    async with consumer:
        await wait_until(lambda: len(log) == 29)
        assert held not in {entry[0] for entry in log}
        await topic.resume_message(held)
        await wait_until(lambda: len(log) == 30)
    assert {entry[0] for entry in log} == set(ids)
    assert all(entry[0].startswith(f"{entry[3]}:") for entry in log)


async def test_dead_letters_merge_over_partitions_and_replay_to_their_partition(
    redis_client: redis.asyncio.Redis, name: str
) -> None:
    topic = Topic(redis_client, name, partitions=3)
    ids = await topic.publish_many(
        [("t", {"n": n}) for n in range(9)], keys=[f"k{n}" for n in range(9)]
    )
    failing = True
    handled: list[str] = []
    consumer = StreamConsumer(redis_client, name, "g", "c", max_deliveries=1, retry=None, **FAST)

    @consumer.handler("t")
    async def flaky(msg: Message[Any]) -> None:
        if failing:
            raise RuntimeError("boom")
        handled.append(msg.id)

    async with consumer:

        async def buried() -> bool:
            return len(await topic.dead_letters()) == 9

        await wait_until(buried, timeout=15)
        letters = await topic.dead_letters()
        assert sorted(letter.original_id for letter in letters) == sorted(ids)
        assert all(letter.id.startswith(f"{letter.partition}:") for letter in letters)
        assert (await topic.info()).dead_letters == 9
        failing = False
        replayed = await topic.replay_dead_letters([letter.id for letter in letters])
        assert sorted(r.split(":")[0] for r in replayed) == sorted(i.split(":")[0] for i in ids)
        await wait_until(lambda: len(handled) == 9)
    assert await topic.dead_letters() == []


async def test_terminate_stops_consumers_and_removes_every_key(
    redis_client: redis.asyncio.Redis, name: str
) -> None:
    topic = Topic(redis_client, name, partitions=4)
    await topic.publish_many([("t", {"n": n}) for n in range(40)])
    consumer = StreamConsumer(redis_client, name, "g", "c", **FAST)
    handled: list[int] = []

    @consumer.handler("t")
    async def record(msg: Message[Any]) -> None:
        handled.append(msg.data["n"])

    async with consumer:
        await wait_until(lambda: len(handled) == 40)
        await topic.stop_message(await topic.publish("t", {"n": 99}))
        await topic.terminate()
        with anyio.fail_after(5):
            assert await consumer.done() is StopReason.TERMINATED
    assert await keys_of(redis_client, name) == []
    # Used again afterwards, even with another count.
    again = Topic(redis_client, name, partitions=2)
    assert len(await again.partition_streams()) == 2
    await again.terminate()
    assert await keys_of(redis_client, name) == []


async def test_an_interrupted_terminate_finishes_on_rerun(
    redis_client: redis.asyncio.Redis, name: str
) -> None:
    topic = Topic(redis_client, name, partitions=3)
    streams = await topic.partition_streams()
    await topic.publish_many([("t", {"n": n}) for n in range(30)])
    # Halfway: marked terminating, one partition gone, the rest still there.
    await redis_client.hset(topic.keys.meta, "state", "terminating")
    await redis_client.delete(streams[0])
    await Topic(redis_client, name).terminate()
    assert await keys_of(redis_client, name) == []


async def test_cleanup_runs_on_every_partition_and_sums(
    redis_client: redis.asyncio.Redis, name: str
) -> None:
    topic = Topic(redis_client, name, partitions=3)
    await topic.publish_many([("t", {"n": n}) for n in range(90)])
    consumer = StreamConsumer(redis_client, name, "g", "c", **FAST)
    handled: list[int] = []

    @consumer.handler("t")
    async def record(msg: Message[Any]) -> None:
        handled.append(msg.data["n"])

    async with consumer:
        await wait_until(lambda: len(handled) == 90)
        await wait_until(lambda: consumer.stats.held == 0)

        async def acked() -> bool:
            return (await topic.info()).groups[0].pending == 0

        await wait_until(acked)
    removed = await topic.cleanup(CleanupPolicy(min_retention=0.0, max_length=0))
    assert removed == 90
    assert (await topic.info()).length == 0


async def test_members_react_to_a_join_at_once_not_at_their_next_heartbeat(
    redis_client: redis.asyncio.Redis, name: str
) -> None:
    topic = Topic(redis_client, name, partitions=4)
    await topic.partition_streams()
    # Heartbeats 10 s apart: only the members notice can move partitions sooner.
    slow = {**FAST, "member_ttl": 30.0}
    a = StreamConsumer(redis_client, name, "g", "a", **slow)
    b = StreamConsumer(redis_client, name, "g", "b", **slow)
    log: list[tuple[str, int, str, int]] = []
    keyed_recorder(a, log)
    keyed_recorder(b, log)
    async with a:
        await wait_until(lambda: a.partitions == [0, 1, 2, 3])
        async with b:
            await wait_until(lambda: len(b.partitions or ()) == 2, timeout=5)
            assert len(a.partitions or ()) == 2
        await wait_until(lambda: a.partitions == [0, 1, 2, 3], timeout=5)


async def test_standby_members_stop_on_terminate_too(
    redis_client: redis.asyncio.Redis, name: str
) -> None:
    topic = Topic(redis_client, name, partitions=2)
    await topic.partition_streams()
    consumers = [StreamConsumer(redis_client, name, "g", f"c{i}", **FAST) for i in range(3)]
    log: list[tuple[str, int, str, int]] = []
    for consumer in consumers:
        keyed_recorder(consumer, log)
    async with consumers[0], consumers[1], consumers[2]:

        def one_standby() -> bool:
            owned = sorted(len(c.partitions or ()) for c in consumers)
            return owned == [0, 1, 1]

        await wait_until(one_standby)
        await topic.terminate()
        with anyio.fail_after(5):
            for consumer in consumers:
                assert await consumer.done() is StopReason.TERMINATED


async def test_an_idempotent_publish_repeated_lands_in_the_same_partition(
    redis_client: redis.asyncio.Redis, name: str
) -> None:
    topic = Topic(redis_client, name, partitions=4)
    first = [await topic.publish("t", {"n": n}, idempotency_key=f"op-{n}") for n in range(8)]
    again = [await topic.publish("t", {"n": n}, idempotency_key=f"op-{n}") for n in range(8)]
    assert again == first
    many = await topic.publish_many([("t", {"n": n}, None, f"op-{n}") for n in range(8)])
    assert many == first
    assert (await topic.info()).length == 8
