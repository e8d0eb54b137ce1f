"""Topic.publish and Topic.publish_many against a real server."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
import redis.asyncio

from redcurrent import ConfigurationError, Topic
from redcurrent._codec import decode_message, payload_decoder
from redcurrent._topic import PUBLISH_CHUNK, PUBLISH_CHUNK_BYTES

PLAIN = payload_decoder(None)


def id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


async def read_all(client: redis.asyncio.Redis, stream: str) -> list[Any]:
    reply = await client.xrange(stream)
    return [decode_message(i.decode(), f, stream, PLAIN) for i, f in reply]


#: The two ways to publish; tests that hold for both run once for each.
VIA = ["publish", "publish_many"]


async def publish_all(
    topic: Topic,
    via: str,
    items: Iterable[tuple[Any, Any, Any]],
    *,
    maxlen: int | None = None,
) -> list[str]:
    """``(type, data, metadata)`` items, one ``publish`` each or one ``publish_many``."""
    if via == "publish":
        return [await topic.publish(t, d, metadata=m, maxlen=maxlen) for t, d, m in items]
    return await topic.publish_many(items, maxlen=maxlen)


@pytest.mark.parametrize(
    ("via", "count"),
    [
        ("publish", 20),
        ("publish_many", 20),
        ("publish_many", PUBLISH_CHUNK),
        ("publish_many", PUBLISH_CHUNK + 1),
        ("publish_many", 3 * PUBLISH_CHUNK + 17),
    ],
)
async def test_ids_come_back_in_order_and_entries_round_trip(
    redis_client: redis.asyncio.Redis, via: str, count: int
) -> None:
    topic = Topic(redis_client, "orders")
    # A generator: publish_many must not need len() or indexing.
    items = ((f"t{n % 3}", {"n": n}, {"n": str(n)}) for n in range(count))
    ids = await publish_all(topic, via, items)
    assert all(isinstance(i, str) for i in ids)
    assert len(set(ids)) == count
    assert ids == sorted(ids, key=id_key)
    messages = await read_all(redis_client, "orders")
    assert [m.id for m in messages] == ids
    assert [m.data["n"] for m in messages] == list(range(count))
    assert [m.metadata for m in messages] == [{"n": str(n)} for n in range(count)]
    assert [m.type for m in messages] == [f"t{n % 3}" for n in range(count)]


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


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize(
    ("type_", "metadata", "maxlen", "error", "match"),
    [
        pytest.param("t", {"k": 1}, None, TypeError, "metadata", id="metadata-int"),
        pytest.param("t", {"k": None}, None, TypeError, "metadata", id="metadata-none"),
        pytest.param("t", {"k": b"v"}, None, TypeError, "metadata", id="metadata-bytes"),
        pytest.param("t", {2: "v"}, None, TypeError, "metadata", id="metadata-int-key"),
        pytest.param("", None, None, ConfigurationError, "type", id="type-empty"),
        pytest.param(None, None, None, ConfigurationError, "type", id="type-none"),
        pytest.param(b"email", None, None, ConfigurationError, "type", id="type-bytes"),
        pytest.param(3, None, None, ConfigurationError, "type", id="type-int"),
        pytest.param("t", None, -1, ConfigurationError, "maxlen", id="maxlen-negative"),
        pytest.param("t", None, 1.5, ConfigurationError, "maxlen", id="maxlen-float"),
        pytest.param("t", None, "10", ConfigurationError, "maxlen", id="maxlen-str"),
        pytest.param("t", None, True, ConfigurationError, "maxlen", id="maxlen-bool"),
    ],
)
async def test_invalid_calls_raise_and_write_nothing(
    redis_client: redis.asyncio.Redis,
    via: str,
    type_: Any,
    metadata: Any,
    maxlen: Any,
    error: type[Exception],
    match: str,
) -> None:
    topic = Topic(redis_client, "orders")
    # publish_many gets a valid item first: the whole chunk fails before it is sent.
    items = (
        [(type_, {}, metadata)] if via == "publish" else [("ok", {}, None), (type_, {}, metadata)]
    )
    with pytest.raises(error, match=match):
        await publish_all(topic, via, items, maxlen=maxlen)
    assert await redis_client.exists("orders") == 0


async def test_bad_item_in_a_later_chunk_fails_before_sending_it(
    redis_client: redis.asyncio.Redis,
) -> None:
    topic = Topic(redis_client, "orders")
    items: list[Any] = [("ok", {"n": n}) for n in range(PUBLISH_CHUNK + 10)]
    items.append(("", {}))
    with pytest.raises(ConfigurationError):
        await topic.publish_many(items)
    # The first chunk was full, hence sent, before the bad item was reached; the
    # second, which holds it, was not.
    reply = await redis_client.xrange("orders")
    assert [f[b"data"] for _, f in reply] == [b'{"n":%d}' % n for n in range(PUBLISH_CHUNK)]


def test_empty_topic_name_is_rejected(redis_client: redis.asyncio.Redis) -> None:
    with pytest.raises(ConfigurationError):
        Topic(redis_client, "")


@pytest.mark.parametrize("via", VIA)
async def test_unencodable_data_raises_type_error(
    redis_client: redis.asyncio.Redis, via: str
) -> None:
    topic = Topic(redis_client, "orders")
    with pytest.raises(TypeError):
        await publish_all(topic, via, [("t", {"x": object()}, None)])
    assert await redis_client.exists("orders") == 0


@pytest.mark.parametrize("via", VIA)
async def test_maxlen_caps_the_stream_approximately(
    redis_client: redis.asyncio.Redis, via: str
) -> None:
    topic = Topic(redis_client, "capped")
    node = int(
        (await redis_client.config_get("stream-node-max-entries"))["stream-node-max-entries"]
    )
    ids: list[str] = []
    for start in range(0, 1000, 250):
        batch = [("t", {"n": n}, None) for n in range(start, start + 250)]
        ids += await publish_all(topic, via, batch, maxlen=100)
    kept = [i.decode() for i, _ in await redis_client.xrange("capped")]
    # "~" removes whole radix-tree nodes only: never below the cap, and less than
    # one node above it. The newest entries are the ones kept.
    assert 100 <= len(kept) < 100 + node
    assert kept == ids[-len(kept) :]


@pytest.mark.parametrize("via", VIA)
async def test_maxlen_zero_keeps_no_entry(redis_client: redis.asyncio.Redis, via: str) -> None:
    topic = Topic(redis_client, "orders")
    ids = await publish_all(topic, via, [("t", {"n": n}, None) for n in range(10)], maxlen=0)
    assert len(set(ids)) == 10
    assert ids == sorted(ids, key=id_key)
    # XADD MAXLEN ~ 0: each new entry sits alone in the last node, which is whole
    # and above the cap, so the server removes it at once. The ids were issued
    # (the stream remembers the last one) but no entry stays.
    assert await redis_client.xlen("orders") == 0
    info = await redis_client.xinfo_stream("orders")
    assert info["last-generated-id"].decode() == ids[-1]
    # None, unlike 0, is no cap at all.
    more = await publish_all(topic, via, [("t", {"n": n}, None) for n in range(10)])
    assert [i.decode() for i, _ in await redis_client.xrange("orders")] == more


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


@pytest.mark.parametrize("item", [("t",), ("t", {}, None, "key", "extra"), ()])
async def test_publish_many_rejects_malformed_items(
    redis_client: redis.asyncio.Redis, item: tuple[Any, ...]
) -> None:
    topic = Topic(redis_client, "orders")
    with pytest.raises(ConfigurationError, match="items are"):
        await topic.publish_many([("ok", {}), item])  # type: ignore[list-item]
    assert await redis_client.exists("orders") == 0


# -- chunks sent ahead of their replies (one server) -----------------------------


async def test_chunks_sent_ahead_keep_their_order_and_survive_a_script_flush(
    redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    """Chunks after the first go out while the server still runs the one
    before. A SCRIPT FLUSH (as a restart does) while chunks are on their way:
    those that met it are sent again, in order, nothing twice."""
    total = 5 * PUBLISH_CHUNK + 3
    flusher = redis.Redis.from_url(redis_url)  # sync: flushes between two items

    def items() -> Iterable[Any]:
        for n in range(total):
            if n == 2 * PUBLISH_CHUNK + 500:
                flusher.script_flush()
            yield ("n", {"n": n})

    topic = Topic(redis_client, "ahead")
    try:
        ids = await topic.publish_many(items())
    finally:
        flusher.close()
    entries = await redis_client.xrange("ahead")
    assert [e[0].decode() for e in entries] == ids
    assert [e[1][b"data"] for e in entries] == [b'{"n":%d}' % n for n in range(total)]


async def test_a_chunk_failing_ahead_raises_and_leaves_the_connection_clean(
    redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    """The key turns into a string after the first chunk went: the chunks sent
    ahead fail (WRONGTYPE), publish_many raises the server's error, and the
    client's connections carry no unread reply afterwards."""
    saboteur = redis.Redis.from_url(redis_url)

    def items() -> Iterable[Any]:
        for n in range(4 * PUBLISH_CHUNK):
            if n == PUBLISH_CHUNK + 1:  # the first chunk was written and answered
                saboteur.delete("turns")
                saboteur.set("turns", "not a stream")
            yield ("n", {"n": n})

    topic = Topic(redis_client, "turns")
    try:
        with pytest.raises(redis.exceptions.ResponseError) as raised:
            await topic.publish_many(items())
    finally:
        saboteur.close()
    assert "WRONGTYPE" in str(raised.value)
    for _ in range(20):  # every pooled connection answers its own command
        assert await redis_client.ping()
    assert await redis_client.get("turns") == b"not a stream"


async def test_a_bad_item_after_chunks_sent_ahead_waits_for_them(
    redis_client: redis.asyncio.Redis,
) -> None:
    topic = Topic(redis_client, "bad-later")
    items: list[Any] = [("n", {"n": n}) for n in range(3 * PUBLISH_CHUNK + 10)]
    items[3 * PUBLISH_CHUNK + 5] = ("n", {"bad": object()})
    with pytest.raises(ConfigurationError, match=f"item {3 * PUBLISH_CHUNK + 5}"):
        await topic.publish_many(items)
    # The three chunks before the bad item are written, whole and in order.
    entries = await redis_client.xrange("bad-later")
    assert [e[1][b"data"] for e in entries] == [b'{"n":%d}' % n for n in range(3 * PUBLISH_CHUNK)]
    assert await topic.publish("n", {"n": -1})
    assert await redis_client.xlen("bad-later") == 3 * PUBLISH_CHUNK + 1
