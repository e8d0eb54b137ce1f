"""Bad input: a fuzz corpus of raw entries, malformed ids and arguments, awkward
names, and the payload size limit (``max_payload_bytes``).

The corpus is generated here, never committed: each category below builds one
raw entry (a dict of field bytes, XADDed as is, bypassing ``Topic``) from a
``random.Random`` and says what must become of it. The 10,000-entry run draws
them from a seeded generator; the Hypothesis test draws them (and arbitrary
field sets whose fate it does not predict) from Hypothesis's own randomness.
Either way a consumer with several handlers (one with ``model=``, one batch)
must handle every good entry exactly once and dead-letter every bad one with
a readable reason, never crash or stall, and leave the pending list empty.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import gc
import logging
import random
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import msgspec
import pytest
import redis
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from helpers import nothing_pending, pel_of, wait_while_running
from redcurrent import (
    CleanupPolicy,
    ConfigurationError,
    DeadLetter,
    DecodeError,
    EncodeError,
    Message,
    PayloadTooLargeError,
    RedcurrentError,
    StartFrom,
    StopReason,
    StreamConsumer,
    Topic,
)

Fields = dict[bytes, bytes]
GROUP = "fuzz"
MiB = 1024 * 1024
DEFAULT_LIMIT = 8 * MiB


class Order(msgspec.Struct):
    sku: str
    qty: int


# --------------------------------------------------------------------------- the corpus


@dataclasses.dataclass(frozen=True)
class Expect:
    """What must become of an entry: handled by ``route``, or a dead letter of
    ``error_type`` (with its decode ``category``, when it has one)."""

    route: str | None = None
    error_type: str | None = None
    category: str | None = None

    @property
    def good(self) -> bool:
        return self.route is not None


ROUTES = ("plain", "order", "bulk")
#: Characters that tend to break things: braces, blanks, controls, NUL, LS,
#: accents, CJK, an emoji, quotes and backslashes.
CHARS = 'ab{}[]:,"\\ \n\t\r\x00\u2028é名😀-_'
#: Never valid JSON, and wrong before any value could misfit a schema (msgspec
#: validates as it parses: ``[1,2`` is reported as "not an object" to a typed
#: decoder). Truncated objects are added at random.
NOT_JSON = [
    b"",
    b" ",
    b"{",
    b"{'a': 1}",
    b'{"a":}',
    b'{"a"',
    b'{"a":"b",}',
    b"{a:1}",
    b"{,}",
    b"nul",
    b"tru",
    b"undefined",
    b"NaN",
    b"01",
    b"-",
    b'"unterminated',
    b"\x00",
]
#: Not JSON either, but a typed decoder sees a misfit first.
NOT_JSON_UNTYPED = [b"[1,2", b'{"a":1} trailing']
METADATA_WRONG_SCHEMA = [
    b'{"retry":2}',
    b'{"a":null}',
    b'{"a":["x"]}',
    b'{"a":{"b":"c"}}',
    b'["a"]',
    b'"s"',
    b"1",
    b"true",
]
NOT_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xa0\xa1", b"\xed\xa0\x80", b"\xf8\x88\x80\x80"]


def text(rng: random.Random, low: int = 0, high: int = 12) -> str:
    return "".join(rng.choice(CHARS) for _ in range(rng.randint(low, high)))


def json_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randint(-(2**63), 2**64 - 1)
    if kind == 3:
        return rng.uniform(-1e9, 1e9)
    if kind in (4, 5):
        return text(rng)
    if kind == 6:
        return [json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {text(rng): json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def encode(value: Any) -> bytes:
    return msgspec.json.encode(value)


def good_metadata(rng: random.Random) -> bytes | None:
    """Missing, ``null`` (goStream's empty map), or an object of strings."""
    kind = rng.randrange(4)
    if kind == 0:
        return None
    if kind == 1:
        return b"null"
    return encode({text(rng, 1): text(rng) for _ in range(rng.randint(0, 3))})


def good_data(rng: random.Random, route: str) -> bytes:
    if route == "order":
        order = {"sku": text(rng), "qty": rng.randint(-(2**63), 2**63 - 1)}
        if rng.random() < 0.3:
            order[text(rng, 1) + "_extra"] = json_value(rng)  # unknown keys are ignored
        return encode(order)
    return encode(json_value(rng))


def not_json(rng: random.Random, *, typed: bool) -> bytes:
    """Text that is not JSON; ``typed``: for a decoder with a schema (a model,
    metadata), so nothing in it may misfit the schema before it breaks."""
    if rng.random() < 0.3:
        # A valid object cut short: never valid JSON. Its key is never a field
        # of the model (no such letters in CHARS) and its value is a string.
        # Cut between characters, not inside one: that would be bad UTF-8.
        whole = encode({text(rng, 1): text(rng) if typed else json_value(rng)}).decode()
        return whole[: rng.randrange(1, len(whole))].encode()
    return rng.choice(NOT_JSON if typed else NOT_JSON + NOT_JSON_UNTYPED)


def not_utf8(rng: random.Random) -> bytes:
    bad = rng.choice(NOT_UTF8)
    return rng.choice([bad, b'{"a":"' + bad + b'"}', b'"' + bad + b'"', b"[" + bad + b"]"])


def entry(type_: bytes | None, data: bytes | None, metadata: bytes | None) -> Fields:
    """An entry of the wire format; ``None`` leaves a field out."""
    fields = {b"type": type_, b"data": data, b"metadata": metadata}
    return {k: v for k, v in fields.items() if v is not None}


#: Prefixes of the dead-letter stream's own field names and of its escape.
DLQ_PREFIXES = (b"dlq:", b"dlq:reason", b"dlq:field:", b"dlq:field:dlq:")


def extra_key(rng: random.Random) -> bytes:
    """A field name outside the wire format, sometimes one that looks like a
    dead letter's own (``dlq:...``): it must survive dead-lettering all the same."""
    while True:
        key = rng.randbytes(rng.randint(0, 8)) if rng.random() < 0.5 else text(rng).encode()
        if rng.random() < 0.2:
            key = rng.choice(DLQ_PREFIXES) + key
        if key not in (b"type", b"data", b"metadata"):
            return key


def entry_size(fields: Fields) -> int:
    return sum(len(k) + len(v) for k, v in fields.items())


def padded(fields: Fields, key: bytes, size: int) -> Fields:
    """``fields`` with one more field grown so that the entry weighs ``size`` bytes."""
    rest = entry_size(fields) + len(key)
    assert size >= rest, (size, rest)
    return {**fields, key: b"p" * (size - rest)}


Case = tuple[Fields, Expect]
Generator = Callable[[random.Random, int], Case]


# Good entries: handled exactly once, by the handler of their type.
def good_plain(rng: random.Random, limit: int) -> Case:
    route = rng.choice(ROUTES)
    return entry(route.encode(), good_data(rng, route), good_metadata(rng)), Expect(route)


def good_null_and_missing(rng: random.Random, limit: int) -> Case:
    route = rng.choice(("plain", "bulk"))  # a model needs its fields
    data = rng.choice([None, b"null"])
    return entry(route.encode(), data, rng.choice([None, b"null"])), Expect(route)


def good_extra_fields(rng: random.Random, limit: int) -> Case:
    route = rng.choice(ROUTES)
    fields = entry(route.encode(), good_data(rng, route), good_metadata(rng))
    for _ in range(rng.randint(1, 4)):
        fields[extra_key(rng)] = rng.randbytes(rng.randint(0, 40))  # any bytes, not UTF-8 too
    return fields, Expect(route)


def good_at_the_limit(rng: random.Random, limit: int) -> Case:
    """Exactly ``limit`` bytes, the excess in a JSON string: not too large."""
    route = rng.choice(("plain", "bulk"))
    head = entry(route.encode(), b'""', b"{}")
    fill = limit - entry_size(head)
    return {**head, b"data": b'"' + b"x" * fill + b'"'}, Expect(route)


def good_large(rng: random.Random, limit: int) -> Case:
    route = rng.choice(("plain", "bulk"))
    size = rng.randint(limit // 4, limit // 2)
    return {**entry(route.encode(), None, None), b"data": encode("y" * size)}, Expect(route)


# Bad entries: each a dead letter, of this error type and decode category.
def missing_type(rng: random.Random, limit: int) -> Case:
    fields: Fields = {}
    while not fields or fields == {b"init": b"true"}:  # goStream's placeholder is no message
        fields = {extra_key(rng): rng.randbytes(rng.randint(0, 20)) for _ in range(3)}
        for name in (b"data", b"metadata"):
            if rng.random() < 0.5:
                fields[name] = good_data(rng, "plain")
    return fields, Expect(error_type="DecodeError", category="missing_type")


def type_not_utf8(rng: random.Random, limit: int) -> Case:
    bad = rng.choice(NOT_UTF8) + rng.choice([b"", b"plain", b"order"])
    return entry(bad, good_data(rng, "plain"), None), Expect(
        error_type="DecodeError", category="invalid_utf8"
    )


def data_not_json(rng: random.Random, limit: int) -> Case:
    route = rng.choice(ROUTES)  # not JSON is a DecodeError even with a model
    data = not_json(rng, typed=route == "order")
    return entry(route.encode(), data, good_metadata(rng)), Expect(
        error_type="DecodeError", category="invalid_json"
    )


def data_not_utf8(rng: random.Random, limit: int) -> Case:
    route = rng.choice(ROUTES)
    return entry(route.encode(), not_utf8(rng), good_metadata(rng)), Expect(
        error_type="DecodeError", category="invalid_utf8"
    )


def metadata_not_json(rng: random.Random, limit: int) -> Case:
    route = rng.choice(ROUTES)
    return entry(route.encode(), good_data(rng, route), not_json(rng, typed=True)), Expect(
        error_type="DecodeError", category="invalid_json"
    )


def metadata_wrong_schema(rng: random.Random, limit: int) -> Case:
    route = rng.choice(ROUTES)
    metadata = rng.choice(METADATA_WRONG_SCHEMA)
    return entry(route.encode(), good_data(rng, route), metadata), Expect(
        error_type="DecodeError", category="wrong_schema"
    )


def metadata_not_utf8(rng: random.Random, limit: int) -> Case:
    route = rng.choice(ROUTES)
    return entry(route.encode(), good_data(rng, route), not_utf8(rng)), Expect(
        error_type="DecodeError", category="invalid_utf8"
    )


def model_wrong_types(rng: random.Random, limit: int) -> Case:
    data = rng.choice(
        [
            {"sku": rng.randint(0, 9), "qty": 1},
            {"sku": text(rng), "qty": text(rng)},
            {"sku": text(rng), "qty": 1.5},
            {"sku": text(rng), "qty": True},
            {"sku": [text(rng)], "qty": 1},
            {"sku": text(rng), "qty": 1e3},
            [text(rng), 1],
            text(rng),
            rng.randint(0, 99),
        ]
    )
    return entry(b"order", encode(data), good_metadata(rng)), Expect(
        error_type="ValidationError", category="wrong_schema"
    )


def model_null_and_missing(rng: random.Random, limit: int) -> Case:
    data = rng.choice(
        [None, b"null", b"{}", b'{"sku":null,"qty":1}', b'{"qty":1}', b'{"sku":"a","qty":null}']
    )
    return entry(b"order", data, good_metadata(rng)), Expect(
        error_type="ValidationError", category="wrong_schema"
    )


def unknown_type(rng: random.Random, limit: int) -> Case:
    name = ""
    while name in ("", *ROUTES):
        name = text(rng, 1, 40)
    return entry(name.encode(), good_data(rng, "plain"), good_metadata(rng)), Expect(
        error_type="NoHandlerError"
    )


def empty_type(rng: random.Random, limit: int) -> Case:
    return entry(b"", good_data(rng, "plain"), None), Expect(error_type="NoHandlerError")


def too_large(rng: random.Random, limit: int) -> Case:
    """1 to 64 bytes over the limit, the excess in data (valid JSON: it must not
    matter), in metadata, or in a field of its own; also for the model's type."""
    route = rng.choice(ROUTES)
    size = limit + rng.randint(1, 64)
    where = rng.randrange(3)
    head = entry(route.encode(), None if where == 0 else b"{}", None if where == 1 else b"{}")
    if where == 2:
        fields = padded(head, extra_key(rng), size)
    else:
        fill = size - entry_size(head) - len(b"data" if where == 0 else b"metadata") - 2
        value = b'"' + b"z" * fill + b'"' if where == 0 else b'{"k":"' + b"z" * (fill - 6) + b'"}'
        fields = {**head, (b"data" if where == 0 else b"metadata"): value}
    assert entry_size(fields) == size
    return fields, Expect(error_type="PayloadTooLargeError")


#: Category -> (generator, entries of it in the 10,000-entry corpus).
CATEGORIES: dict[str, tuple[Generator, int]] = {
    "good_plain": (good_plain, 4100),
    "good_null_and_missing": (good_null_and_missing, 300),
    "good_extra_fields": (good_extra_fields, 500),
    "good_at_the_limit": (good_at_the_limit, 2),
    "good_large": (good_large, 3),
    "missing_type": (missing_type, 500),
    "type_not_utf8": (type_not_utf8, 300),
    "data_not_json": (data_not_json, 700),
    "data_not_utf8": (data_not_utf8, 450),
    "metadata_not_json": (metadata_not_json, 400),
    "metadata_wrong_schema": (metadata_wrong_schema, 400),
    "metadata_not_utf8": (metadata_not_utf8, 250),
    "model_wrong_types": (model_wrong_types, 900),
    "model_null_and_missing": (model_null_and_missing, 500),
    "unknown_type": (unknown_type, 480),
    "empty_type": (empty_type, 112),
    "too_large": (too_large, 3),
}
BAD_CATEGORIES = [name for name in CATEGORIES if not name.startswith("good_")]


def corpus(seed: int, total: int, limit: int) -> list[tuple[str, Fields, Expect]]:
    """``total`` entries of every category in the proportions above, shuffled."""
    rng = random.Random(seed)
    counts = {name: n for name, (_, n) in CATEGORIES.items()}
    counts["good_plain"] += total - sum(counts.values())
    cases = [
        (name, *CATEGORIES[name][0](rng, limit)) for name, n in counts.items() for _ in range(n)
    ]
    rng.shuffle(cases)
    return cases


def test_corpus_covers_every_category_as_promised() -> None:
    cases = corpus(seed=7, total=10_000, limit=4096)
    assert len(cases) == 10_000
    assert {name for name, _, _ in cases} == set(CATEGORIES)
    for name, fields, expect in cases:
        assert expect.good == name.startswith("good_"), name
        assert fields
        assert fields != {b"init": b"true"}
        assert (entry_size(fields) > 4096) == (name == "too_large"), name
    assert len(BAD_CATEGORIES) == 12


# --------------------------------------------------------------------------- running a consumer


@dataclasses.dataclass
class Outcome:
    ids: list[str]
    handled: Counter[str]
    routes: dict[str, str]
    letters: list[DeadLetter]
    consumer: StreamConsumer
    seconds: float


async def xadd_all(client: redis.asyncio.Redis, stream: str, entries: list[Fields]) -> list[str]:
    """XADD raw, pipelined in chunks of at most 500 entries or about 16 MiB."""
    ids: list[str] = []
    start = 0
    while start < len(entries):
        pipe = client.pipeline(transaction=False)
        size = 0
        end = start
        while end < len(entries) and end - start < 500 and size < 16 * MiB:
            flat = [part for pair in entries[end].items() for part in pair]
            pipe.execute_command("XADD", stream, "*", *flat)
            size += entry_size(entries[end])
            end += 1
        ids += [i.decode() for i in await pipe.execute()]
        start = end
    return ids


async def consume(
    client: redis.asyncio.Redis,
    stream: str,
    entries: list[Fields],
    *,
    limit: int | None,
    timeout: float,  # noqa: ASYNC109
    already: int = 0,
) -> Outcome:
    """XADD the entries raw, then consume them (and ``already`` entries the
    stream had) with one handler of each kind until every entry is settled and
    nothing is pending; the consumer must be running all the while."""
    ids = await xadd_all(client, stream, entries)
    handled: Counter[str] = Counter()
    routes: dict[str, str] = {}
    consumer = StreamConsumer(
        client,
        stream,
        GROUP,
        name="fuzzer",
        start=StartFrom.EARLIEST,
        max_payload_bytes=limit,
        claim_idle=60.0,  # nothing here is retried: a retry would be a failure
    )

    def record(msg: Message[Any], route: str) -> None:
        handled[msg.id] += 1
        routes[msg.id] = route if route != "order" or isinstance(msg.data, Order) else "not-Order"

    @consumer.handler("plain")
    async def plain(msg: Message[Any]) -> None:
        record(msg, "plain")

    @consumer.handler("order", model=Order)
    async def order(msg: Message[Order]) -> None:
        record(msg, "order")

    @consumer.batch_handler("bulk", size=50, timeout=0.05)
    async def bulk(msgs: list[Message[Any]]) -> None:
        for msg in msgs:
            record(msg, "bulk")

    async def settled() -> bool:
        done = sum(handled.values()) + consumer.stats.dead_lettered
        return done >= len(entries) + already and await nothing_pending(client, stream, GROUP)()

    started = time.perf_counter()
    async with consumer:
        await wait_while_running(consumer, settled, timeout=timeout, interval=0.05)
        seconds = time.perf_counter() - started
    assert await consumer.done() is StopReason.STOPPED
    letters = await Topic(client, stream).dead_letters(count=len(entries) + 1)
    return Outcome(ids, handled, routes, letters, consumer, seconds)


def check_outcome(
    outcome: Outcome,
    entries: list[Fields],
    expected: Sequence[Expect | None],
    limit: int | None,
) -> tuple[int, int]:
    """Every entry handled exactly once or a dead letter, never both, never lost;
    predicted fates as predicted. Returns (handled, dead letters)."""
    handled, letters = outcome.handled, outcome.letters
    assert all(n == 1 for n in handled.values()), [i for i, n in handled.items() if n > 1]
    dead = {letter.original_id: letter for letter in letters}
    assert len(dead) == len(letters), "an entry was dead-lettered twice"
    assert not set(dead) & set(handled), "an entry was both handled and dead-lettered"
    lost = [i for i in outcome.ids if i not in handled and i not in dead]
    assert lost == []
    assert len(handled) + len(dead) == len(entries)
    for entry_id, fields, expect in zip(outcome.ids, entries, expected, strict=True):
        letter = dead.get(entry_id)
        if letter is not None:
            # A readable reason naming the entry; the entry kept byte for byte.
            assert letter.reason.isprintable(), letter.reason
            assert entry_id in letter.reason, letter.reason
            assert letter.fields == fields
            assert letter.group == GROUP
            assert letter.error_type in (
                "DecodeError",
                "ValidationError",
                "NoHandlerError",
                "PayloadTooLargeError",
            )
            if letter.error_type in ("DecodeError", "ValidationError"):
                assert DecodeError.category_of(letter.reason) is not None, letter.reason
        if expect is None:
            continue
        if expect.good:
            assert outcome.routes.get(entry_id) == expect.route, (entry_id, fields, letter)
            continue
        assert letter is not None, (entry_id, fields)
        assert letter.error_type == expect.error_type, (fields, letter.reason)
        if expect.category is not None:
            assert DecodeError.category_of(letter.reason) == expect.category, letter.reason
        if expect.error_type == "PayloadTooLargeError":
            assert f"{entry_size(fields)} bytes" in letter.reason
            assert f"max_payload_bytes={limit}" in letter.reason
    stats = outcome.consumer.stats
    assert (stats.handled, stats.dead_lettered, stats.failed) == (len(handled), len(dead), 0)
    return len(handled), len(dead)


@pytest.mark.slow
async def test_fuzz_corpus_of_10000_entries(
    redis_client: redis.asyncio.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="redcurrent.consumer")
    cases = corpus(seed=20261130, total=10_000, limit=DEFAULT_LIMIT)
    entries = [fields for _, fields, _ in cases]
    expected = [expect for _, _, expect in cases]

    # The consumer's default limit (8 MiB) applies: entries at it and over it are in there.
    outcome = await consume(redis_client, "fuzz", entries, limit=DEFAULT_LIMIT, timeout=120)

    good = sum(expect.good for expect in expected)
    assert check_outcome(outcome, entries, expected, DEFAULT_LIMIT) == (good, 10_000 - good)
    assert await pel_of(redis_client, "fuzz", GROUP) == {}
    # One clear log line per bad entry, at ERROR, naming it; none for good ones.
    lines: dict[str, list[logging.LogRecord]] = {}
    for record in caplog.records:
        if record.name == "redcurrent.consumer" and hasattr(record, "message_id"):
            lines.setdefault(record.message_id, []).append(record)
    bad_ids = {i for i, expect in zip(outcome.ids, expected, strict=True) if not expect.good}
    assert set(lines) == bad_ids
    for entry_id, records in lines.items():
        assert len(records) == 1, [r.getMessage() for r in records]
        [record] = records
        assert record.levelno == logging.ERROR
        assert entry_id in record.getMessage()
        assert "moving it to the dead letters" in record.getMessage()
    per_category = Counter(name for name, _, _ in cases)
    print(
        f"\n10,000 entries ({good} good, {10_000 - good} bad in {len(BAD_CATEGORIES)} "
        f"categories: {dict(per_category)}) settled in {outcome.seconds:.2f} s"
    )


# --------------------------------------------------------------------------- hypothesis

PROPERTY_LIMIT = 2048


@st.composite
def raw_entries(draw: st.DrawFn) -> tuple[Fields, Expect | None]:
    """An entry of a known category (fate predicted), or an arbitrary field set
    (fate not predicted: only the invariants are checked)."""
    kind = draw(st.sampled_from([*CATEGORIES, "arbitrary"]))
    if kind != "arbitrary":
        rng = draw(st.randoms(use_true_random=False))
        return CATEGORIES[kind][0](rng, PROPERTY_LIMIT)
    names = (
        st.sampled_from([b"type", b"data", b"metadata"])
        | st.binary(max_size=6)
        | st.builds(bytes.__add__, st.sampled_from(DLQ_PREFIXES), st.binary(max_size=4))
    )
    values = st.sampled_from(
        [b"plain", b"order", b"bulk", b"null", b"", b"{}", b'{"sku":"a","qty":1}', b'{"a":"1"}']
    ) | st.binary(max_size=3 * PROPERTY_LIMIT // 2)
    fields = draw(
        st.dictionaries(names, values, min_size=1, max_size=4).filter(
            lambda f: f != {b"init": b"true"}
        )
    )
    return fields, None


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(cases=st.lists(raw_entries(), min_size=1, max_size=25))
def test_property_every_entry_is_handled_once_or_a_dead_letter(
    redis_url: str, cases: list[tuple[Fields, Expect | None]]
) -> None:
    _collect_leftover_event_loops()
    anyio.run(_check_property, redis_url, cases)


async def _check_property(url: str, cases: list[tuple[Fields, Expect | None]]) -> None:
    client = redis.asyncio.Redis.from_url(url)
    stream = f"property-{uuid.uuid4().hex}"
    try:
        entries = [fields for fields, _ in cases]
        outcome = await consume(client, stream, entries, limit=PROPERTY_LIMIT, timeout=30)
        check_outcome(outcome, entries, [expect for _, expect in cases], PROPERTY_LIMIT)
    finally:
        await Topic(client, stream).terminate()
        await client.aclose()


def _collect_leftover_event_loops() -> None:
    """The previous async test's event loop may be left to the garbage collector
    (older pytest-asyncio); its ResourceWarning must not fail an example."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


async def test_original_dlq_fields_survive_dead_lettering(
    redis_client: redis.asyncio.Redis,
) -> None:
    fields = {b"type": b"nobody", b"data": b"{}", b"dlq:reason": b"the producer's own"}
    outcome = await consume(redis_client, "dlq", [fields], limit=None, timeout=10)
    [letter] = outcome.letters
    assert letter.fields == fields
    assert letter.error_type == "NoHandlerError"  # the dead letter's own, not the producer's
    assert "nobody" in letter.reason


# --------------------------------------------------------------------------- bad arguments

FAST: dict[str, Any] = {"claim_idle": 1.0, "block": 0.2, "shutdown_timeout": 1.0}
TopicCall = Callable[[Topic], Awaitable[Any]]


def calling(method: str, *args: Any) -> TopicCall:
    return lambda topic: getattr(topic, method)(*args)


def circular() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


#: (call on a Topic named "orders", error type, words the message must contain)
BAD_CALLS: list[Any] = [
    # publish
    pytest.param(lambda t: t.publish(""), ConfigurationError, "type", id="publish-type-empty"),
    pytest.param(lambda t: t.publish(None), ConfigurationError, "type", id="publish-type-none"),
    pytest.param(lambda t: t.publish(b"t"), ConfigurationError, "type", id="publish-type-bytes"),
    pytest.param(
        lambda t: t.publish("\ud800"), ConfigurationError, "UTF-8", id="publish-type-surr"
    ),
    pytest.param(lambda t: t.publish("t", object()), EncodeError, "JSON", id="publish-data-object"),
    pytest.param(lambda t: t.publish("t", circular()), EncodeError, "JSON", id="publish-data-loop"),
    pytest.param(lambda t: t.publish("t", {(1,): 1}), EncodeError, "JSON", id="publish-data-key"),
    pytest.param(lambda t: t.publish("t", "\ud800"), EncodeError, "JSON", id="publish-data-surr"),
    pytest.param(
        lambda t: t.publish("t", {}, [("k", "v")]), EncodeError, "mapping", id="publish-meta-list"
    ),
    pytest.param(
        lambda t: t.publish("t", {}, "k=v"), EncodeError, "mapping", id="publish-meta-str"
    ),
    pytest.param(lambda t: t.publish("t", {}, {"k": 1}), EncodeError, "str", id="publish-meta-int"),
    pytest.param(
        lambda t: t.publish("t", {}, {"k": "\ud800"}),
        EncodeError,
        "metadata",
        id="publish-meta-surr",
    ),
    pytest.param(
        lambda t: t.publish("t", maxlen=-1), ConfigurationError, "maxlen", id="maxlen-neg"
    ),
    pytest.param(
        lambda t: t.publish("t", maxlen="9"), ConfigurationError, "maxlen", id="maxlen-str"
    ),
    # publish_many
    pytest.param(lambda t: t.publish_many(None), ConfigurationError, "iterable", id="many-none"),
    pytest.param(lambda t: t.publish_many(5), ConfigurationError, "iterable", id="many-int"),
    pytest.param(
        lambda t: t.publish_many(["ab"]), ConfigurationError, "item 0", id="many-str-item"
    ),
    pytest.param(
        lambda t: t.publish_many([{"a": 1, "b": 2}]), ConfigurationError, "item 0", id="many-dict"
    ),
    pytest.param(lambda t: t.publish_many([3]), ConfigurationError, "item 0", id="many-int-item"),
    pytest.param(lambda t: t.publish_many([("t",)]), ConfigurationError, "item 0", id="many-1"),
    pytest.param(
        lambda t: t.publish_many([("t", 1, None, "k", 2)]),
        ConfigurationError,
        "5 values",
        id="many-5",
    ),
    pytest.param(
        lambda t: t.publish_many([("t", 1, None, 2)]),
        ConfigurationError,
        "item 0: idempotency_key",
        id="many-key-int",
    ),
    pytest.param(
        lambda t: t.publish("t", 1, idempotency_key=""),
        ConfigurationError,
        "idempotency_key",
        id="key-empty",
    ),
    pytest.param(
        lambda t: t.publish_many([("ok", 1), ("", 1)]), ConfigurationError, "item 1", id="many-type"
    ),
    pytest.param(
        lambda t: t.publish_many([("ok", 1), ("t", object())]),
        EncodeError,
        "item 1",
        id="many-data",
    ),
    pytest.param(
        lambda t: t.publish_many([("ok", 1), ("t", 1, {"k": 2})]),
        EncodeError,
        "item 1",
        id="many-meta",
    ),
    pytest.param(
        lambda t: t.publish_many([("t", 1)], maxlen=True),
        ConfigurationError,
        "maxlen",
        id="many-ml",
    ),
    # stop / resume: malformed ids (well-formed unknown ones: test_unknown_ids)
    *(
        pytest.param(
            calling(method, bad),
            ConfigurationError,
            "id",
            id=f"{method}-{label}",
        )
        for method in ("stop_message", "resume_message")
        for label, bad in [
            ("empty", ""),
            ("word", "abc"),
            ("dash", "1-"),
            ("star", "*"),
            ("dollar", "$"),
            ("minus", "-"),
            ("too-big", f"{2**64}-0"),
            ("int", 17),
            ("none", None),
            ("bytes", b"1-0"),
        ]
    ),
    # dead letters
    pytest.param(lambda t: t.dead_letters(-1), ConfigurationError, "count", id="dl-count-neg"),
    pytest.param(lambda t: t.dead_letters("5"), ConfigurationError, "count", id="dl-count-str"),
    pytest.param(lambda t: t.dead_letters(1.5), ConfigurationError, "count", id="dl-count-float"),
    pytest.param(lambda t: t.dead_letters(None), ConfigurationError, "count", id="dl-count-none"),
    pytest.param(lambda t: t.dead_letters(True), ConfigurationError, "count", id="dl-count-bool"),
    pytest.param(lambda t: t.dead_letters(start="x"), ConfigurationError, "'x'", id="dl-start"),
    pytest.param(lambda t: t.dead_letters(start="("), ConfigurationError, "id", id="dl-start-("),
    pytest.param(lambda t: t.dead_letters(start=5), ConfigurationError, "str", id="dl-start-int"),
    pytest.param(
        lambda t: t.replay_dead_letters("1-0"), ConfigurationError, "iterable", id="replay-str"
    ),
    pytest.param(
        lambda t: t.replay_dead_letters(5), ConfigurationError, "iterable", id="replay-int"
    ),
    pytest.param(
        lambda t: t.replay_dead_letters(["1-0", "x"]), ConfigurationError, "'x'", id="replay-bad-id"
    ),
    pytest.param(
        lambda t: t.replay_dead_letters([1]), ConfigurationError, "str", id="replay-int-id"
    ),
    pytest.param(
        lambda t: t.replay_dead_letters(count=-1), ConfigurationError, "count", id="replay-count"
    ),
    # cleanup
    pytest.param(
        lambda t: t.cleanup({"auto": True}), ConfigurationError, "CleanupPolicy", id="cl-d"
    ),
    pytest.param(lambda t: t.cleanup(300), ConfigurationError, "CleanupPolicy", id="cleanup-int"),
]


@pytest.mark.parametrize(("call", "error", "words"), BAD_CALLS)
async def test_topic_methods_answer_bad_arguments_with_a_named_error(
    redis_client: redis.asyncio.Redis, call: TopicCall, error: type[Exception], words: str
) -> None:
    topic = Topic(redis_client, "orders")
    with pytest.raises(RedcurrentError) as info:
        await call(topic)
    assert type(info.value) is error
    assert words in str(info.value)
    # Raised before anything was sent: nothing was written.
    assert await redis_client.keys("*") == []


class Kind(str, enum.Enum):
    EMAIL = "email"


async def test_str_subclasses_are_good_types_and_names(redis_client: redis.asyncio.Redis) -> None:
    # Not bad input: what passes isinstance(x, str) is a str, for types and names alike.
    topic = Topic(redis_client, Kind.EMAIL)
    assert type(topic.name) is str
    assert topic.name == topic.keys.stream == "email"  # its value, as redis-py sends it
    assert {key_slot(k.encode()) for k in topic.keys.owned()} == {key_slot(b"email")}
    assert StreamConsumer(redis_client, Kind.EMAIL, Kind.EMAIL, name=Kind.EMAIL).name == "email"
    await topic.publish(Kind.EMAIL, {})
    await topic.publish_many([(Kind.EMAIL, {})])
    assert [f[b"type"] for _, f in await redis_client.xrange("email")] == [b"email", b"email"]


@pytest.mark.parametrize(
    ("make", "words"),
    [
        pytest.param(lambda r: Topic(r, ""), "non-empty", id="name-empty"),
        pytest.param(lambda r: Topic(r, b"orders"), "must be a str", id="name-bytes"),
        pytest.param(lambda r: Topic(r, 7), "must be a str", id="name-int"),
        pytest.param(lambda r: Topic(r, None), "must be a str", id="name-none"),
        pytest.param(lambda r: Topic(r, "a\ud800"), "UTF-8", id="name-surrogate"),
        pytest.param(lambda r: Topic(None, "orders"), "redis.asyncio", id="client-none"),
        pytest.param(lambda r: Topic("redis://", "orders"), "redis.asyncio", id="client-url"),
        pytest.param(lambda r: Topic(redis.Redis(), "orders"), "synchronous", id="client-sync"),
        *(
            pytest.param(
                functools.partial(Topic, name="orders", max_payload_bytes=bad),
                "max_payload_bytes",
                id=f"limit-{bad!r}",
            )
            for bad in (0, -1, 1.5, "8", True)
        ),
    ],
)
def test_topic_construction_rejects_bad_arguments(
    redis_client: redis.asyncio.Redis, make: Callable[[Any], Topic], words: str
) -> None:
    with pytest.raises(ConfigurationError, match=words):
        make(redis_client)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        pytest.param({"stream": ""}, "stream name", id="stream-empty"),
        pytest.param({"stream": b"s"}, "stream name", id="stream-bytes"),
        pytest.param({"stream": "s\ud800"}, "stream name", id="stream-surrogate"),
        pytest.param({"group": ""}, "group name", id="group-empty"),
        pytest.param({"group": 3}, "group name", id="group-int"),
        pytest.param({"group": None}, "group name", id="group-none"),
        pytest.param({"name": ""}, "consumer name", id="name-empty"),
        pytest.param({"name": b"c"}, "consumer name", id="name-bytes"),
        pytest.param({"name": "c\udfff"}, "consumer name", id="name-surrogate"),
        pytest.param({"redis": None}, "redis.asyncio", id="client-none"),
        pytest.param({"redis": redis.Redis()}, "synchronous", id="client-sync"),
        pytest.param({"cleanup": {"auto": True}}, "CleanupPolicy", id="cleanup-dict"),
        pytest.param({"max_payload_bytes": 0}, "max_payload_bytes", id="limit-0"),
        pytest.param({"max_payload_bytes": -5}, "max_payload_bytes", id="limit-negative"),
        pytest.param({"max_payload_bytes": 1e6}, "max_payload_bytes", id="limit-float"),
        pytest.param({"max_payload_bytes": False}, "max_payload_bytes", id="limit-bool"),
    ],
)
def test_consumer_construction_rejects_bad_arguments(
    redis_client: redis.asyncio.Redis, kwargs: dict[str, Any], words: str
) -> None:
    arguments: dict[str, Any] = {"redis": redis_client, "stream": "s", "group": "g"}
    arguments.update(kwargs)
    with pytest.raises(ConfigurationError, match=words):
        StreamConsumer(**arguments)


async def test_unknown_ids_are_documented_no_ops_or_recorded(
    redis_client: redis.asyncio.Redis,
) -> None:
    topic = Topic(redis_client, "orders")
    [kept] = await topic.publish_many([("job", {})])
    # Resuming what is not stopped: no error, nothing changes.
    await topic.resume_message("1-1")
    await topic.resume_message(kept)
    assert (await topic.info()).stopped == []
    assert not await redis_client.exists(topic.keys.stopped)
    # Stopping an id that is not in the stream records it (it may be published later);
    # twice is once; the canonical form is stored whatever the spelling.
    await topic.stop_message("0099-01")
    await topic.stop_message(" 99-1 ")
    assert (await topic.info()).stopped == ["99-1"]
    # No dead letters yet: reading or replaying unknown ones gives nothing.
    assert await topic.dead_letters(start="99999999999999-0") == []
    assert await topic.dead_letters(start="(1-0") == []
    assert await topic.dead_letters(count=0) == []
    assert await topic.replay_dead_letters(["1-0", "2-5"]) == []
    assert await topic.replay_dead_letters([]) == []
    assert await topic.replay_dead_letters(count=0) == []
    assert await redis_client.xlen("orders") == 1


async def test_dead_letter_paging_with_an_exclusive_start(
    redis_client: redis.asyncio.Redis,
) -> None:
    entries = [{b"type": b"nobody", b"data": b'{"n":%d}' % n} for n in range(5)]
    await consume(redis_client, "orders", entries, limit=None, timeout=10)
    topic = Topic(redis_client, "orders")
    first = await topic.dead_letters(count=2)
    rest = await topic.dead_letters(count=10, start="(" + first[-1].id)
    # Each dead letter once (workers move them concurrently, in any order).
    assert sorted(letter.data["n"] for letter in first + rest) == list(range(5))


# --------------------------------------------------------------------------- awkward names

AWKWARD = [
    "a{b}c",
    "{orders}",
    "}{",
    "{}",
    "x{}y{z}",
    "with space",
    " ",
    "new\nline",
    "cr\r\nlf\ttab",
    "nul\x00byte",
    "名前{ストリーム}",
    "😀 émoji\u2028",
    "redcurrent:{x}:x:dead",
]


@pytest.mark.parametrize("name", AWKWARD)
async def test_awkward_names_work_for_every_feature(
    redis_client: redis.asyncio.Redis, name: str
) -> None:
    """The same awkward string as stream, group and consumer name: publish,
    consume, stop/resume, info, cleanup, terminate."""
    topic = Topic(redis_client, name)
    keys = topic.keys
    slot = key_slot(name.encode())
    assert {key_slot(k.encode()) for k in (*keys.owned(), keys.control_channel)} == {slot}
    ids = await topic.publish_many([("job", {"n": n}) for n in range(3)])
    await topic.stop_message(ids[1])
    seen: list[str] = []
    consumer = StreamConsumer(redis_client, name, name, name=name, start=StartFrom.EARLIEST, **FAST)

    @consumer.handler("job")
    async def handle(msg: Message[Any]) -> None:
        seen.append(msg.id)

    async with consumer:

        async def only_the_stopped_one_pending() -> bool:
            return list(await pel_of(redis_client, name, name)) == [ids[1]]

        await wait_while_running(consumer, only_the_stopped_one_pending)
        assert sorted(seen) == [ids[0], ids[2]]
        pel = await pel_of(redis_client, name, name)
        assert pel[ids[1]][0] == name  # held by this consumer, under its exact name
        await topic.resume_message(ids[1])
        await wait_while_running(consumer, nothing_pending(redis_client, name, name))
        info = await topic.info()
        assert [g.name for g in info.groups] == [name]
        assert info.stopped == []
        assert await topic.cleanup(CleanupPolicy(min_retention=0)) == 3
        await topic.terminate()
        with anyio.fail_after(5):
            assert await consumer.done() is StopReason.TERMINATED
    assert sorted(seen) == sorted(ids)
    assert await redis_client.exists(*keys.owned()) == 0


# --------------------------------------------------------------------------- payload size limit


def message_of_size(size: int, type_: str = "t") -> str:
    """A str payload whose message (type "t", metadata {}) weighs exactly ``size``."""
    overhead = len(b"typedatametadata") + len(type_.encode()) + len(b'""') + len(b"{}")
    return "x" * (size - overhead)


@pytest.mark.parametrize("via", ["publish", "publish_many"])
@pytest.mark.parametrize("limit", [1000, None])
async def test_publish_limit_just_under_at_and_over(
    redis_client: redis.asyncio.Redis, via: str, limit: int | None
) -> None:
    topic = Topic(redis_client, "orders", max_payload_bytes=limit)
    cap = limit or DEFAULT_LIMIT + 1  # None: no limit, even past the default

    async def send(size: int) -> None:
        if via == "publish":
            await topic.publish("t", message_of_size(size))
        else:
            await topic.publish_many([("t", "small"), ("t", message_of_size(size))])

    await send(cap - 1)
    await send(cap)
    if limit is None:
        await send(cap + 1)
        return
    length = await redis_client.xlen("orders")
    with pytest.raises(PayloadTooLargeError) as info:
        await send(limit + 1)
    exc = info.value
    assert (exc.size, exc.limit, exc.entry_id) == (limit + 1, limit, None)
    assert f"{limit + 1} bytes" in str(exc)
    assert f"max_payload_bytes={limit}" in str(exc)
    assert "type 't'" in str(exc)
    assert isinstance(exc, ConfigurationError)
    assert await redis_client.xlen("orders") == length  # nothing of the call was sent
    # What was written weighs what the limit counted.
    stored = await redis_client.xrange("orders")
    assert max(entry_size(fields) for _, fields in stored) == limit


async def test_publish_default_limit_is_8_mib(redis_client: redis.asyncio.Redis) -> None:
    topic = Topic(redis_client, "orders")
    assert topic.max_payload_bytes == DEFAULT_LIMIT
    with pytest.raises(PayloadTooLargeError, match="item 1: message of type 't'"):
        await topic.publish_many([("t", 1), ("t", message_of_size(DEFAULT_LIMIT + 1))])
    assert await redis_client.exists("orders") == 0
    await topic.publish("t", message_of_size(DEFAULT_LIMIT))
    assert await redis_client.xlen("orders") == 1


@pytest.mark.parametrize("limit", [1000, None])
async def test_consume_limit_just_under_at_and_over(
    redis_client: redis.asyncio.Redis, limit: int | None
) -> None:
    cap = limit or DEFAULT_LIMIT + 1
    # Published by a Topic with the same limit, the message at it goes through both.
    at = await Topic(redis_client, "orders", max_payload_bytes=limit).publish(
        "plain", message_of_size(cap, "plain")
    )
    under = padded({b"type": b"order", b"data": b'{"sku":"a","qty":1}'}, b"pad", cap - 1)
    # Over the limit and not even JSON, for the model's type: had it been decoded,
    # its reason would say so.
    over_bad_json = padded({b"type": b"order", b"data": b"{not json"}, b"pad", cap + 1)
    over_in_data = {b"type": b"plain", b"data": b'"' + b"y" * (cap + 1 - 15) + b'"'}
    assert entry_size(over_in_data) == cap + 1
    entries = [under, over_bad_json, over_in_data]
    outcome = await consume(redis_client, "orders", entries, limit=limit, timeout=20, already=1)
    assert outcome.consumer.config.max_payload_bytes == limit
    ids = outcome.ids
    if limit is None:
        # No limit: everything is decoded, so the bad JSON is dead for what it is.
        assert set(outcome.handled) == {at, ids[0], ids[2]}
        [letter] = outcome.letters
        assert letter.original_id == ids[1]
        assert DecodeError.category_of(letter.reason) == "invalid_json"
        return
    assert set(outcome.handled) == {at, ids[0]}
    assert outcome.routes[ids[0]] == "order"
    letters = {letter.original_id: letter for letter in outcome.letters}
    assert set(letters) == {ids[1], ids[2]}
    for entry_id, fields in zip(ids[1:], entries[1:], strict=True):
        letter = letters[entry_id]
        assert letter.error_type == "PayloadTooLargeError"
        assert letter.reason == (
            f"entry {entry_id}: {limit + 1} bytes, more than max_payload_bytes={limit} (by 1 bytes)"
        )
        assert DecodeError.category_of(letter.reason) is None  # not decoded
        assert letter.fields == fields
    assert await pel_of(redis_client, "orders", GROUP) == {}


def test_consumer_default_limit_is_8_mib(redis_client: redis.asyncio.Redis) -> None:
    assert StreamConsumer(redis_client, "s", "g").config.max_payload_bytes == DEFAULT_LIMIT
    unlimited = StreamConsumer(redis_client, "s", "g", max_payload_bytes=None)
    assert unlimited.config.max_payload_bytes is None
