"""Topic.info() against states built with raw commands on a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aredis

from helpers import Recorder, nothing_pending, pending, wait_until, xadd_raw
from redcurrent import GroupInfo, StartFrom, StreamConsumer, Topic, TopicInfo, _info


async def _build(client: aredis.Redis) -> tuple[Topic, list[str]]:
    """Four entries; group ``a`` read three and acked one, group ``b`` read and
    acked everything; one stopped id; two dead letters."""
    topic = Topic(client, "orders")
    ids = [await topic.publish("email", {"n": n}) for n in range(4)]
    await client.xgroup_create(topic.name, "a", "0")
    await client.xgroup_create(topic.name, "b", "0")
    await client.xreadgroup("a", "a1", {topic.name: ">"}, count=3)
    await client.xack(topic.name, "a", ids[0])
    await client.xreadgroup("b", "b1", {topic.name: ">"})
    await client.xack(topic.name, "b", *ids)
    await topic.stop_message(ids[1])
    await client.xadd(topic.keys.dead_letters, {"type": "email", "dlq:reason": "x"})
    await client.xadd(topic.keys.dead_letters, {"type": "sms", "dlq:reason": "y"})
    return topic, ids


async def test_info_of_a_known_state(redis_client: aredis.Redis) -> None:
    topic, ids = await _build(redis_client)
    info = await topic.info()
    assert info == TopicInfo(
        length=4,
        first_id=ids[0],
        last_id=ids[3],
        groups=[
            GroupInfo(name="a", consumers=1, pending=2, lag=1, last_delivered_id=ids[2]),
            GroupInfo(name="b", consumers=1, pending=0, lag=0, last_delivered_id=ids[3]),
        ],
        stopped=[ids[1]],
        dead_letters=2,
    )


async def test_info_of_a_missing_stream(redis_client: aredis.Redis) -> None:
    info = await Topic(redis_client, "nothing-here").info()
    assert info == TopicInfo(
        length=0, first_id=None, last_id=None, groups=[], stopped=[], dead_letters=0
    )


async def test_info_of_a_missing_stream_still_shows_stopped_ids_and_dead_letters(
    redis_client: aredis.Redis,
) -> None:
    topic = Topic(redis_client, "gone")
    await topic.stop_message("5-0")
    await redis_client.xadd(topic.keys.dead_letters, {"type": "x"})
    info = await topic.info()
    assert (info.length, info.groups, info.stopped, info.dead_letters) == (0, [], ["5-0"], 1)


async def test_info_of_an_emptied_stream_without_groups(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    entry_id = await topic.publish("email", {})
    await redis_client.xdel(topic.name, entry_id)
    info = await topic.info()
    assert (info.length, info.first_id, info.last_id, info.groups) == (0, None, None, [])


async def test_stopped_ids_are_sorted_numerically(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    for entry_id in ("10-0", "9-10", "9-2", "9-0", "100-1"):
        await topic.stop_message(entry_id)
    assert (await topic.info()).stopped == ["9-0", "9-2", "9-10", "10-0", "100-1"]


async def test_lag_of_a_group_that_has_read_nothing(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    await topic.publish_many([("email", {}), ("email", {}), ("email", {})])
    await redis_client.xgroup_create(topic.name, "fresh", "0")
    [group] = (await topic.info()).groups
    assert (group.lag, group.pending, group.consumers, group.last_delivered_id) == (3, 0, 0, "0-0")


@pytest.mark.redis_min("7.0")
async def test_lag_is_the_servers_on_redis_7(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    ids = await topic.publish_many([("email", {"n": n}) for n in range(5)])
    await redis_client.xgroup_create(topic.name, "g", "0")
    await redis_client.xreadgroup("g", "c", {topic.name: ">"}, count=2)
    [raw] = await redis_client.xinfo_groups(topic.name)
    assert raw["lag"] == 3  # the server gives it: no computation involved
    [group] = (await topic.info()).groups
    assert group.lag == 3
    assert group.last_delivered_id == ids[1]


@pytest.mark.redis_min("7.0")
async def test_lag_is_counted_when_the_server_cannot_tell(
    redis_client: aredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = Topic(redis_client, "orders")
    ids = await topic.publish_many([("email", {"n": n}) for n in range(6)])
    await redis_client.xgroup_create(topic.name, "g", "0")
    await redis_client.xreadgroup("g", "c", {topic.name: ">"}, count=2)
    await redis_client.xdel(topic.name, ids[4])  # a deletion after the group's position
    [raw] = await redis_client.xinfo_groups(topic.name)
    assert raw["lag"] is None

    [group] = (await topic.info()).groups
    assert group.lag == 3  # ids[2], ids[3], ids[5]

    monkeypatch.setattr(_info, "LAG_SCAN_LIMIT", 2)
    [group] = (await topic.info()).groups
    assert group.lag is None  # too far behind to count cheaply


async def test_info_does_not_create_keys(redis_client: aredis.Redis) -> None:
    await Topic(redis_client, "orders").info()
    assert await redis_client.dbsize() == 0


# -- clients with decode_responses=True --------------------------------------------

BINARY: dict[bytes, bytes] = {
    b"type": b"\xffbin\xfe",
    b"data": b'{"a":"\xc3\x28"}',
    b"metadata": b"\x80\x81",
}


@pytest.fixture
async def decoded(redis_url: str, redis_client: aredis.Redis) -> AsyncIterator[aredis.Redis]:
    """A client that decodes replies to str, on the test's (flushed) server."""
    client = aredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def test_info_on_a_decode_responses_client_with_binary_ends(
    redis_client: aredis.Redis, decoded: aredis.Redis
) -> None:
    topic = Topic(decoded, "orders")
    first = await xadd_raw(redis_client, topic.name, BINARY)
    middle = await topic.publish_many([("email", {"n": n}) for n in range(300)])
    last = await xadd_raw(redis_client, topic.name, {**BINARY, b"data": b"\xfe" * 100})
    await redis_client.xgroup_create(topic.name, "g", "0")
    await redis_client.xreadgroup("g", "c", {topic.name: ">"}, count=150)
    await redis_client.xadd(topic.keys.dead_letters, {**BINARY, b"dlq:reason": b"not UTF-8"})
    await topic.stop_message(middle[7])
    await topic.stop_message(last)

    info = await topic.info()

    assert info == TopicInfo(
        length=302,
        first_id=first,
        last_id=last,
        groups=[
            GroupInfo(name="g", consumers=1, pending=150, lag=152, last_delivered_id=middle[148])
        ],
        stopped=[middle[7], last],
        dead_letters=1,
    )
    await topic.resume_message(last)
    assert (await topic.info()).stopped == [middle[7]]


async def test_stop_and_resume_through_a_decode_responses_client(
    redis_client: aredis.Redis, decoded: aredis.Redis
) -> None:
    """200 messages, 50 of them stopped, on a client that decodes replies."""
    topic = Topic(decoded, "orders")
    ids = await topic.publish_many([("job", {"n": n}) for n in range(200)])
    stopped = ids[::4]
    for entry_id in stopped:
        await topic.stop_message(entry_id)
    seen = Recorder()
    consumer = StreamConsumer(
        decoded,
        topic.name,
        "g",
        start=StartFrom.EARLIEST,
        concurrency=4,
        claim_idle=0.5,
        block=0.2,
        shutdown_timeout=1.0,
    )
    consumer.handler("job")(seen)
    async with consumer:
        await seen.wait_for(150)

        async def only_stopped_pending() -> bool:
            held = await pending(redis_client, topic.name, "g")
            return sorted(entry_id for entry_id, _, _ in held) == sorted(stopped)

        await wait_until(only_stopped_pending)
        assert sorted(seen.ids) == sorted(set(ids) - set(stopped))
        assert (await topic.info()).stopped == stopped

        for entry_id in stopped:
            await topic.resume_message(entry_id)
        await seen.wait_for(200)
        await wait_until(nothing_pending(redis_client, topic.name, "g"))
    assert sorted(seen.ids) == sorted(ids)  # each exactly once
    info = await topic.info()
    assert info.stopped == []
    assert info.groups[0].pending == 0
    assert info.groups[0].lag == 0


async def test_reading_through_a_decoding_client_opens_no_other_connections(
    redis_client: aredis.Redis, decoded: aredis.Redis
) -> None:
    """Bytes are read on the client's own pool: many Topics, no pools of their own."""
    await xadd_raw(redis_client, "orders", BINARY)
    await redis_client.xadd(Topic(decoded, "orders").keys.dead_letters, BINARY)  # type: ignore[arg-type]
    await decoded.ping()
    before = len(await redis_client.client_list())
    for _ in range(200):
        topic = Topic(decoded, "orders")
        assert (await topic.info()).first_id is not None
        [letter] = await topic.dead_letters()
        assert letter.fields == BINARY
    assert len(await redis_client.client_list()) == before
