"""Topic.publish and Topic.publish_many against a real server."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio

from redcurrent import ConfigurationError, Topic
from redcurrent.codec import decode_message, payload_decoder
from redcurrent.topic import PUBLISH_CHUNK, PUBLISH_CHUNK_BYTES

PLAIN = payload_decoder(None)


def id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


async def read_all(client: redis.asyncio.Redis, stream: str) -> list[Any]:
    reply = await client.xrange(stream)
    return [decode_message(i.decode(), f, stream, PLAIN) for i, f in reply]


async def test_publish_returns_ids_in_order(redis_client: redis.asyncio.Redis) -> None:
    topic = Topic(redis_client, "orders")
    ids = [await topic.publish("email", {"n": n}, metadata={"i": str(n)}) for n in range(20)]
    assert all(isinstance(i, str) for i in ids)
    assert ids == sorted(ids, key=id_key)
    assert len(set(ids)) == 20
    messages = await read_all(redis_client, "orders")
    assert [m.id for m in messages] == ids
    assert [m.data for m in messages] == [{"n": n} for n in range(20)]
    assert [m.metadata for m in messages] == [{"i": str(n)} for n in range(20)]
    assert {m.type for m in messages} == {"email"}


async def test_publish_defaults(redis_client: redis.asyncio.Redis) -> None:
    topic = Topic(redis_client, "orders")
    entry_id = await topic.publish("ping")
    reply = await redis_client.xrange("orders")
    assert reply == [(entry_id.encode(), {b"type": b"ping", b"data": b"null", b"metadata": b"{}"})]


async def test_publish_many_two_and_three_tuples(redis_client: redis.asyncio.Redis) -> None:
    topic = Topic(redis_client, "orders")
    ids = await topic.publish_many(
        [
            ("email", {"to": "x"}),
            ("sms", {"to": "y"}, {"k": "v"}),
            ("sms", [1, 2], None),
            ("push", None),
        ]
    )
    assert len(ids) == 4
    assert ids == sorted(ids, key=id_key)
    messages = await read_all(redis_client, "orders")
    assert [(m.id, m.type, m.data, m.metadata) for m in messages] == [
        (ids[0], "email", {"to": "x"}, {}),
        (ids[1], "sms", {"to": "y"}, {"k": "v"}),
        (ids[2], "sms", [1, 2], {}),
        (ids[3], "push", {}, {}),
    ]


async def test_publish_many_empty(redis_client: redis.asyncio.Redis) -> None:
    topic = Topic(redis_client, "orders")
    assert await topic.publish_many([]) == []
    assert await redis_client.exists("orders") == 0


@pytest.mark.parametrize("count", [PUBLISH_CHUNK, PUBLISH_CHUNK + 1, 3 * PUBLISH_CHUNK + 17])
async def test_publish_many_chunks_keep_order_and_count(
    redis_client: redis.asyncio.Redis, count: int
) -> None:
    topic = Topic(redis_client, "orders")
    # A generator: publish_many must not need len() or indexing.
    items = ((f"t{n % 3}", {"n": n}, {"n": str(n)}) for n in range(count))
    ids = await topic.publish_many(items)
    assert len(ids) == count
    assert len(set(ids)) == count
    assert ids == sorted(ids, key=id_key)
    assert await redis_client.xlen("orders") == count
    messages = await read_all(redis_client, "orders")
    assert [m.id for m in messages] == ids
    assert [m.data["n"] for m in messages] == list(range(count))
    assert [m.metadata["n"] for m in messages] == [str(n) for n in range(count)]
    assert [m.type for m in messages] == [f"t{n % 3}" for n in range(count)]


@pytest.mark.parametrize("metadata", [{"k": 1}, {"k": None}, {"k": b"v"}, {2: "v"}])
async def test_metadata_must_be_str_to_str(
    redis_client: redis.asyncio.Redis, metadata: dict[Any, Any]
) -> None:
    topic = Topic(redis_client, "orders")
    with pytest.raises(TypeError, match="metadata"):
        await topic.publish("t", {}, metadata=metadata)
    with pytest.raises(TypeError, match="metadata"):
        await topic.publish_many([("t", {}, metadata)])
    assert await redis_client.exists("orders") == 0


@pytest.mark.parametrize("bad_type", ["", None, b"email", 3])
async def test_type_must_be_a_non_empty_str(
    redis_client: redis.asyncio.Redis, bad_type: Any
) -> None:
    topic = Topic(redis_client, "orders")
    with pytest.raises(ConfigurationError):
        await topic.publish(bad_type, {})
    with pytest.raises(ConfigurationError):
        await topic.publish_many([("ok", {}), (bad_type, {})])
    assert await redis_client.exists("orders") == 0


async def test_bad_item_in_a_later_chunk_fails_before_sending_it(
    redis_client: redis.asyncio.Redis,
) -> None:
    topic = Topic(redis_client, "orders")
    items: list[Any] = [("ok", {"n": n}) for n in range(PUBLISH_CHUNK + 10)]
    items.append(("", {}))
    with pytest.raises(ConfigurationError):
        await topic.publish_many(items)
    # Only whole chunks before the bad item may have been sent.
    assert await redis_client.xlen("orders") in (0, PUBLISH_CHUNK)


def test_empty_topic_name_is_rejected(redis_client: redis.asyncio.Redis) -> None:
    with pytest.raises(ConfigurationError):
        Topic(redis_client, "")


async def test_unencodable_data_raises_type_error(redis_client: redis.asyncio.Redis) -> None:
    topic = Topic(redis_client, "orders")
    with pytest.raises(TypeError):
        await topic.publish("t", {"x": object()})
    assert await redis_client.exists("orders") == 0


async def test_maxlen_caps_the_stream(redis_client: redis.asyncio.Redis) -> None:
    topic = Topic(redis_client, "capped")
    for _ in range(5):
        await topic.publish_many([("t", {"n": n}) for n in range(400)], maxlen=100)
    length = await redis_client.xlen("capped")
    # Approximate trimming removes whole radix-tree nodes (100 entries by default).
    assert 100 <= length < 400
    await topic.publish("t", {}, maxlen=100)
    assert 100 <= await redis_client.xlen("capped") < 400


async def test_maxlen_publish_one_by_one(redis_client: redis.asyncio.Redis) -> None:
    topic = Topic(redis_client, "capped")
    for n in range(1000):
        await topic.publish("t", {"n": n}, maxlen=50)
    assert 50 <= await redis_client.xlen("capped") <= 150
    last = await redis_client.xrevrange("capped", count=1)
    assert last[0][1][b"data"] == b'{"n":999}'


async def test_decode_responses_client_publishes(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        stream = "decoded-client-stream"
        await client.delete(stream)
        topic = Topic(client, stream)
        first = await topic.publish("email", {"to": "Zoë"}, metadata={"k": "v"})
        more = await topic.publish_many([("sms", {"n": n}) for n in range(PUBLISH_CHUNK + 5)])
        assert isinstance(first, str)
        assert all(isinstance(i, str) for i in more)
        assert [first, *more] == sorted([first, *more], key=id_key)
        reply = await client.xrange(stream, count=1)
        assert reply == [
            (first, {"type": "email", "data": '{"to":"Zoë"}', "metadata": '{"k":"v"}'})
        ]
        assert await client.xlen(stream) == PUBLISH_CHUNK + 6
        await client.delete(stream)
    finally:
        await client.aclose()


async def test_publish_many_chunks_by_bytes(redis_client: redis.asyncio.Redis) -> None:
    topic = Topic(redis_client, "big")
    blob = "x" * (PUBLISH_CHUNK_BYTES // 3)
    ids = await topic.publish_many([("t", {"n": n, "blob": blob}) for n in range(7)])
    assert len(ids) == 7
    assert ids == sorted(ids, key=id_key)
    messages = await read_all(redis_client, "big")
    assert [m.data["n"] for m in messages] == list(range(7))
    assert all(m.data["blob"] == blob for m in messages)


async def test_publish_many_survives_a_script_flush(redis_client: redis.asyncio.Redis) -> None:
    topic = Topic(redis_client, "orders")
    first = await topic.publish_many([("t", {"n": 1})])
    await redis_client.script_flush()
    second = await topic.publish_many([("t", {"n": 2})])
    assert id_key(first[0]) < id_key(second[0])
    assert await redis_client.xlen("orders") == 2


async def test_publish_many_on_a_wrong_type_key(redis_client: redis.asyncio.Redis) -> None:
    await redis_client.set("orders", "not a stream")
    topic = Topic(redis_client, "orders")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        await topic.publish_many([("t", {"n": 1})])
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        await topic.publish("t", {"n": 1})
    assert await redis_client.get("orders") == b"not a stream"


@pytest.mark.parametrize("item", [("t",), ("t", {}, None, "extra"), ()])
async def test_publish_many_rejects_malformed_items(
    redis_client: redis.asyncio.Redis, item: tuple[Any, ...]
) -> None:
    topic = Topic(redis_client, "orders")
    with pytest.raises(ConfigurationError, match="items are"):
        await topic.publish_many([("ok", {}), item])  # type: ignore[list-item]
    assert await redis_client.exists("orders") == 0


@pytest.mark.parametrize("maxlen", [-1, 1.5, "10", True])
async def test_maxlen_must_be_a_non_negative_int(
    redis_client: redis.asyncio.Redis, maxlen: Any
) -> None:
    topic = Topic(redis_client, "orders")
    with pytest.raises(ConfigurationError, match="maxlen"):
        await topic.publish("t", {}, maxlen=maxlen)
    with pytest.raises(ConfigurationError, match="maxlen"):
        await topic.publish_many([("t", {})], maxlen=maxlen)
    assert await redis_client.exists("orders") == 0


async def test_maxlen_zero_is_allowed(redis_client: redis.asyncio.Redis) -> None:
    topic = Topic(redis_client, "orders")
    ids = await topic.publish_many([("t", {"n": n}) for n in range(10)], maxlen=0)
    assert len(ids) == 10
    # "~" trims whole nodes only, so a few entries may stay; never more than written.
    assert await redis_client.xlen("orders") <= 10
