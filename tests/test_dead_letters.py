"""Dead letters: the atomic ack-and-copy script, reading them back, replaying them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio

from helpers import Recorder, nothing_pending, wait_until
from redcurrent import DeadLetter, StartFrom, StreamConsumer, Topic
from redcurrent._codec import decode_message, payload_decoder
from redcurrent._dead import DeadLetterWriter

STREAM = "orders"
GROUP = "workers"
CONSUMER = "worker-1"


async def pending_entries(
    client: redis.asyncio.Redis, topic: Topic, count: int = 100
) -> list[tuple[str, dict[bytes, bytes]]]:
    """Create the group from the start and read everything as CONSUMER (now pending)."""
    try:
        await client.xgroup_create(topic.name, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    reply = await client.xreadgroup(GROUP, CONSUMER, {topic.name: ">"}, count=count)
    if not reply:
        return []
    return [(entry_id.decode(), fields) for entry_id, fields in reply[0][1]]


async def pending_ids(client: redis.asyncio.Redis) -> list[str]:
    reply = await client.xpending_range(STREAM, GROUP, min="-", max="+", count=1000)
    return [p["message_id"].decode() for p in reply]


@pytest.fixture
def topic(redis_client: redis.asyncio.Redis) -> Topic:
    return Topic(redis_client, STREAM)


@pytest.fixture
def writer(redis_client: redis.asyncio.Redis, topic: Topic) -> DeadLetterWriter:
    return DeadLetterWriter(redis_client, topic.keys, GROUP, CONSUMER)


async def test_move_acks_and_copies(
    redis_client: redis.asyncio.Redis, topic: Topic, writer: DeadLetterWriter
) -> None:
    kept = await topic.publish("email", {"to": "a"})
    failing = await topic.publish("email", {"to": "Zoë <x>"}, metadata={"retry": "3"})
    [(_, _), (entry_id, fields)] = await pending_entries(redis_client, topic)
    assert entry_id == failing
    before = time.time()

    moved = await writer.move(
        entry_id, fields, reason="handler raised: boom", error_type="RuntimeError", delivery_count=4
    )

    assert moved is True
    assert await pending_ids(redis_client) == [kept]
    # The original stays in the stream (other groups may still need it).
    assert await redis_client.xlen(STREAM) == 2
    letters = await topic.dead_letters()
    assert len(letters) == 1
    letter = letters[0]
    assert isinstance(letter, DeadLetter)
    assert letter.original_id == failing
    assert letter.fields == fields  # byte for byte, nothing added
    assert letter.fields == {
        b"type": b"email",
        b"data": '{"to":"Zoë <x>"}'.encode(),
        b"metadata": b'{"retry":"3"}',
    }
    assert letter.type == "email"
    assert letter.data == {"to": "Zoë <x>"}
    assert letter.metadata == {"retry": "3"}
    assert letter.group == GROUP
    assert letter.consumer == CONSUMER
    assert letter.reason == "handler raised: boom"
    assert letter.error_type == "RuntimeError"
    assert letter.delivery_count == 4
    assert before - 1 <= letter.failed_at <= time.time() + 1
    raw = await redis_client.xrange(topic.keys.dead_letters)
    assert raw[0][0].decode() == letter.id
    assert raw[0][1][b"dlq:stream"] == STREAM.encode()


async def test_move_of_an_acked_entry_writes_nothing(
    redis_client: redis.asyncio.Redis, topic: Topic, writer: DeadLetterWriter
) -> None:
    await topic.publish("email", {"to": "a"})
    [(entry_id, fields)] = await pending_entries(redis_client, topic)
    assert await redis_client.xack(STREAM, GROUP, entry_id) == 1

    moved = await writer.move(entry_id, fields, reason="late", error_type="X", delivery_count=1)

    assert moved is False
    assert await redis_client.exists(topic.keys.dead_letters) == 0
    assert await topic.dead_letters() == []


async def test_move_twice_copies_once(
    redis_client: redis.asyncio.Redis, topic: Topic, redis_url: str
) -> None:
    await topic.publish("email", {"to": "a"})
    [(entry_id, fields)] = await pending_entries(redis_client, topic)
    other = redis.asyncio.Redis.from_url(redis_url)
    try:
        first = DeadLetterWriter(redis_client, topic.keys, GROUP, CONSUMER)
        second = DeadLetterWriter(other, topic.keys, GROUP, "worker-2")
        results = [
            await first.move(entry_id, fields, reason="a", error_type="A", delivery_count=2),
            await second.move(entry_id, fields, reason="b", error_type="B", delivery_count=2),
        ]
    finally:
        await other.aclose()
    assert results == [True, False]
    assert len(await topic.dead_letters()) == 1


async def test_move_with_a_gone_group_writes_nothing(
    redis_client: redis.asyncio.Redis, topic: Topic, writer: DeadLetterWriter
) -> None:
    await topic.publish("email", {})
    [(entry_id, fields)] = await pending_entries(redis_client, topic)
    await redis_client.xgroup_destroy(STREAM, GROUP)
    # XACK on a missing group answers 0: nothing is pending there any more.
    assert not await writer.move(entry_id, fields, reason="r", error_type="E", delivery_count=1)
    assert await redis_client.exists(topic.keys.dead_letters) == 0


async def dead_letter_all(
    redis_client: redis.asyncio.Redis, topic: Topic, writer: DeadLetterWriter
) -> list[tuple[str, dict[bytes, bytes]]]:
    entries = await pending_entries(redis_client, topic)
    for n, (entry_id, fields) in enumerate(entries):
        assert await writer.move(
            entry_id, fields, reason=f"reason {n}", error_type="E", delivery_count=n + 1
        )
    return entries


async def test_replay_puts_originals_back(
    redis_client: redis.asyncio.Redis, topic: Topic, writer: DeadLetterWriter
) -> None:
    published = await topic.publish_many([("email", {"n": n}, {"m": str(n)}) for n in range(3)])
    entries = await dead_letter_all(redis_client, topic, writer)
    assert [e[0] for e in entries] == published
    assert len(await topic.dead_letters()) == 3

    new_ids = await topic.replay_dead_letters()

    assert len(new_ids) == 3
    assert not set(new_ids) & set(published)
    assert await topic.dead_letters() == []
    assert await redis_client.xlen(topic.keys.dead_letters) == 0
    tail = await redis_client.xrange(STREAM, min=new_ids[0])
    assert [i.decode() for i, _ in tail] == new_ids
    assert [f for _, f in tail] == [f for _, f in entries]
    # The group sees them as new messages.
    again = await pending_entries(redis_client, topic)
    assert [i for i, _ in again] == new_ids
    decoded = [decode_message(i, f, STREAM, payload_decoder(None)) for i, f in again]
    assert [(m.type, m.data, m.metadata) for m in decoded] == [
        ("email", {"n": n}, {"m": str(n)}) for n in range(3)
    ]


async def test_replay_chosen_ids_only(
    redis_client: redis.asyncio.Redis, topic: Topic, writer: DeadLetterWriter
) -> None:
    await topic.publish_many([("t", {"n": n}) for n in range(4)])
    await dead_letter_all(redis_client, topic, writer)
    letters = await topic.dead_letters()
    chosen = [letters[1].id, letters[3].id]

    new_ids = await topic.replay_dead_letters(chosen)

    assert len(new_ids) == 2
    left = await topic.dead_letters()
    assert [letter.id for letter in left] == [letters[0].id, letters[2].id]
    replayed = await redis_client.xrange(STREAM, min=new_ids[0])
    assert [f[b"data"] for _, f in replayed] == [b'{"n":1}', b'{"n":3}']
    # Unknown ids are skipped; an empty selection does nothing.
    assert await topic.replay_dead_letters(["1-1"]) == []
    assert await topic.replay_dead_letters([]) == []
    assert len(await topic.dead_letters()) == 2


async def test_replay_count_takes_the_oldest(
    redis_client: redis.asyncio.Redis, topic: Topic, writer: DeadLetterWriter
) -> None:
    await topic.publish_many([("t", {"n": n}) for n in range(5)])
    await dead_letter_all(redis_client, topic, writer)
    new_ids = await topic.replay_dead_letters(count=2)
    assert len(new_ids) == 2
    replayed = await redis_client.xrange(STREAM, min=new_ids[0])
    assert [f[b"data"] for _, f in replayed] == [b'{"n":0}', b'{"n":1}']
    assert [letter.data for letter in await topic.dead_letters()] == [
        {"n": 2},
        {"n": 3},
        {"n": 4},
    ]


async def test_dead_letters_paging(
    redis_client: redis.asyncio.Redis, topic: Topic, writer: DeadLetterWriter
) -> None:
    await topic.publish_many([("t", {"n": n}) for n in range(5)])
    await dead_letter_all(redis_client, topic, writer)
    first = await topic.dead_letters(count=2)
    assert [letter.data for letter in first] == [{"n": 0}, {"n": 1}]
    rest = await topic.dead_letters(count=10, start=first[-1].id)
    assert [letter.data for letter in rest] == [{"n": n} for n in range(1, 5)]


NON_UTF8: dict[bytes, bytes] = {
    b"type": b"\xffbin\xfe",
    b"data": b'{"a":"\xc3\x28"}',
    b"metadata": b"\x80\x81",
    b"\xfe-extra": b"\x00\xff\x00",
}


async def test_non_utf8_fields_survive_the_round_trip(
    redis_client: redis.asyncio.Redis, topic: Topic, writer: DeadLetterWriter
) -> None:
    flat: list[Any] = [x for pair in NON_UTF8.items() for x in pair]
    await redis_client.execute_command("XADD", STREAM, "*", *flat)
    [(entry_id, fields)] = await pending_entries(redis_client, topic)
    assert fields == NON_UTF8
    assert await writer.move(
        entry_id, fields, reason="not UTF-8", error_type="DecodeError", delivery_count=1
    )

    [letter] = await topic.dead_letters()
    assert letter.fields == NON_UTF8
    assert letter.original_id == entry_id
    assert letter.reason == "not UTF-8"
    assert isinstance(letter.type, str)  # replacement characters, never an exception
    assert letter.metadata == {}

    [new_id] = await topic.replay_dead_letters([letter.id])
    [(got_id, got_fields)] = await redis_client.xrange(STREAM, min=new_id, max=new_id)
    assert got_id.decode() == new_id
    assert got_fields == NON_UTF8
    assert await topic.dead_letters() == []


async def test_goStream_shaped_entry_dead_letters(
    redis_client: redis.asyncio.Redis, topic: Topic, writer: DeadLetterWriter
) -> None:
    await redis_client.execute_command(
        "XADD", STREAM, "*", "metadata", "null", "type", "job", "data", "null"
    )
    [(entry_id, fields)] = await pending_entries(redis_client, topic)
    assert await writer.move(entry_id, fields, reason="r", error_type="E", delivery_count=1)
    [letter] = await topic.dead_letters()
    assert letter.type == "job"
    assert letter.data is None
    assert letter.metadata == {}
    assert letter.fields == fields


# -- clients with decode_responses=True --------------------------------------------


@pytest.fixture
async def decoded(
    redis_url: str, redis_client: redis.asyncio.Redis
) -> AsyncIterator[redis.asyncio.Redis]:
    """A client that decodes replies to str, on the test's (flushed) server."""
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


def binary_entry(n: int) -> dict[bytes, bytes]:
    """Fields that are not UTF-8: a bad type, or bad bytes inside the JSON data."""
    if n % 2:
        return {b"type": b"job\xff", b"data": b'{"n":%d}' % n, b"metadata": b"{}"}
    return {b"type": b"job", b"data": b'{"n":%d,"s":"\xc3\x28"}' % n, b"metadata": b"\x80"}


async def test_binary_dead_letters_on_a_decode_responses_client(
    redis_client: redis.asyncio.Redis, decoded: redis.asyncio.Redis
) -> None:
    """601 entries, every third not UTF-8 (the first and the last among them),
    consumed, read back, replayed and inspected through clients that decode."""
    pipe = redis_client.pipeline(transaction=False)
    originals: list[dict[bytes, bytes]] = []
    for n in range(601):
        if n % 3 == 0:
            fields = binary_entry(n)
        else:
            fields = {b"type": b"job", b"data": b'{"n":%d}' % n, b"metadata": b"{}"}
        originals.append(fields)
        pipe.xadd(STREAM, fields)  # type: ignore[arg-type]
    ids = [entry_id.decode() for entry_id in await pipe.execute()]
    bad = {ids[n]: originals[n] for n in range(0, 601, 3)}

    topic = Topic(decoded, STREAM)
    seen = Recorder()
    consumer = StreamConsumer(
        decoded,
        STREAM,
        GROUP,
        CONSUMER,
        start=StartFrom.EARLIEST,
        concurrency=8,
        claim_idle=0.5,
        block=0.2,
        shutdown_timeout=1.0,
    )
    consumer.handler("job")(seen)
    async with consumer:
        await seen.wait_for(400)
        await wait_until(lambda: consumer.stats.dead_lettered == 201)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
    assert sorted(seen.ids) == sorted(set(ids) - set(bad))

    info = await topic.info()
    assert (info.length, info.first_id, info.last_id) == (601, ids[0], ids[600])
    assert info.dead_letters == 201

    letters = await topic.dead_letters(count=1000)
    assert {letter.original_id: letter.fields for letter in letters} == bad
    assert {letter.error_type for letter in letters} == {"DecodeError"}
    assert {(letter.group, letter.consumer) for letter in letters} == {(GROUP, CONSUMER)}
    assert all(isinstance(letter.type, str) and letter.reason for letter in letters)
    # Paging by dead-letter id works on this client too.
    page = await topic.dead_letters(count=50, start=letters[100].id)
    assert [letter.id for letter in page] == [letter.id for letter in letters[100:150]]

    new_ids = await topic.replay_dead_letters(count=1000)
    assert len(new_ids) == 201
    assert await topic.dead_letters() == []
    replayed = await redis_client.xrange(STREAM, min=new_ids[0])
    assert [entry_id.decode() for entry_id, _ in replayed] == new_ids
    assert [fields for _, fields in replayed] == [letter.fields for letter in letters]
    info = await topic.info()
    assert (info.length, info.last_id, info.dead_letters) == (802, new_ids[-1], 0)


# -- original fields named like the dead letter's own ----------------------------------------

#: In this order; names the dead-letter stream uses itself, its escape, and binary ones.
DLQ_NAMED: dict[bytes, bytes] = {
    b"type": b"email",
    b"data": b'{"to":"a"}',
    b"dlq:note": b"x",
    b"dlq:reason": b"the producer's own reason",
    b"dlq:original_id": b"0-1",
    b"dlq:field:x": b"escape-like",
    b"dlq:field:dlq:y": b"escaped-like",
    b"dlq:": b"just the prefix",
    b"dlq:field:": b"just the escape",
    b"dlq:\xff\x00\xfe": b"\x00binary\xff",
    b"\xfe\x00": b"binary name, not ours",
    b"metadata": b"{}",
}


async def test_original_dlq_named_fields_survive_byte_for_byte(
    redis_client: redis.asyncio.Redis, topic: Topic, writer: DeadLetterWriter
) -> None:
    flat: list[Any] = [x for pair in DLQ_NAMED.items() for x in pair]
    await redis_client.execute_command("XADD", STREAM, "*", *flat)
    [(entry_id, fields)] = await pending_entries(redis_client, topic)
    assert list(fields.items()) == list(DLQ_NAMED.items())
    assert await writer.move(
        entry_id, fields, reason="handler raised: boom", error_type="RuntimeError", delivery_count=5
    )

    [letter] = await topic.dead_letters()
    assert list(letter.fields.items()) == list(DLQ_NAMED.items())  # byte for byte, in order
    # The dead letter's own fields are its own, whatever the original's say.
    assert letter.reason == "handler raised: boom"
    assert letter.original_id == entry_id
    assert letter.delivery_count == 5
    assert (letter.type, letter.data, letter.metadata) == ("email", {"to": "a"}, {})
    # XRANGE shows the original's dlq: names escaped, readable, beside ours.
    [(_, raw)] = await redis_client.xrange(topic.keys.dead_letters)
    assert raw[b"dlq:field:dlq:note"] == b"x"
    assert raw[b"dlq:field:dlq:reason"] == b"the producer's own reason"
    assert raw[b"dlq:field:dlq:field:x"] == b"escape-like"
    assert raw[b"dlq:reason"] == b"handler raised: boom"
    assert raw[b"\xfe\x00"] == b"binary name, not ours"

    [new_id] = await topic.replay_dead_letters([letter.id])
    [(got_id, got)] = await redis_client.xrange(STREAM, min=new_id, max=new_id)
    assert got_id.decode() == new_id
    assert list(got.items()) == list(DLQ_NAMED.items())
    assert await topic.dead_letters() == []


async def test_consumer_dead_letters_keep_and_replay_dlq_named_fields(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    """The reproducer: an entry with a ``dlq:note`` field and no handler."""
    original = {b"type": b"nohandler", b"data": b"{}", b"dlq:note": b"x"}
    entry_id = (await redis_client.xadd(STREAM, original)).decode()  # type: ignore[arg-type]
    seen = Recorder()
    consumer = StreamConsumer(
        redis_client, STREAM, GROUP, CONSUMER, start=StartFrom.EARLIEST, block=0.2
    )
    consumer.handler("email")(seen)
    async with consumer:
        await wait_until(lambda: consumer.stats.dead_lettered == 1)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))

    [letter] = await topic.dead_letters()
    assert letter.original_id == entry_id
    assert letter.error_type == "NoHandlerError"
    assert letter.fields == original
    [new_id] = await topic.replay_dead_letters()
    [(_, got)] = await redis_client.xrange(STREAM, min=new_id, max=new_id)
    assert list(got.items()) == list(original.items())


async def test_dead_letters_of_the_previous_layout_read_and_replay_unchanged(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    """Dead letters written before original ``dlq:`` names were escaped: the
    original fields are the names outside ``dlq:``, as they always were."""
    old = {
        b"type": b"email",
        b"data": b'{"n":1}',
        b"metadata": b"{}",
        b"dlq:original_id": b"5-0",
        b"dlq:stream": STREAM.encode(),
        b"dlq:group": GROUP.encode(),
        b"dlq:consumer": CONSUMER.encode(),
        b"dlq:reason": b"handler raised: boom",
        b"dlq:error_type": b"RuntimeError",
        b"dlq:delivery_count": b"5",
        b"dlq:failed_at": b"1700000000.000",
    }
    await redis_client.xadd(topic.keys.dead_letters, old)  # type: ignore[arg-type]

    [letter] = await topic.dead_letters()
    assert letter.fields == {b"type": b"email", b"data": b'{"n":1}', b"metadata": b"{}"}
    assert (letter.original_id, letter.reason, letter.delivery_count) == (
        "5-0",
        "handler raised: boom",
        5,
    )
    [new_id] = await topic.replay_dead_letters()
    [(_, got)] = await redis_client.xrange(STREAM, min=new_id, max=new_id)
    assert got == letter.fields
