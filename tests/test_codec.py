"""The wire format: encode → XADD → XRANGE → decode, and entries as goStream writes them."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from redcurrent import DecodeError, Message, ValidationError
from redcurrent._codec import (
    EMPTY_OBJECT,
    PayloadDecoder,
    decode_message,
    decode_type,
    encode_fields,
    is_init_entry,
    payload_decoder,
)
from redcurrent.errors import DecodeCategory

STREAM = "codec-test"
PLAIN = payload_decoder(None)


class Item(msgspec.Struct):
    sku: str
    qty: int


class Order(msgspec.Struct):
    id: int
    customer: str
    items: list[Item]
    note: str | None = None


async def add_and_read(client: redis.asyncio.Redis, *fields: Any) -> tuple[str, dict[bytes, bytes]]:
    """XADD a flat field list as given, read the entry back with XRANGE (bytes)."""
    entry_id = await client.execute_command("XADD", STREAM, "*", *fields)
    reply = await client.xrange(STREAM, min=entry_id, max=entry_id)
    assert len(reply) == 1
    got_id, got_fields = reply[0]
    return got_id.decode(), got_fields


async def round_trip(
    client: redis.asyncio.Redis,
    type: str,
    data: Any,
    metadata: dict[str, str] | None = None,
    decoder: PayloadDecoder = PLAIN,
) -> Message[Any]:
    entry_id, fields = await add_and_read(client, *encode_fields(type, data, metadata))
    msg = decode_message(entry_id, fields, STREAM, decoder)
    assert msg.id == entry_id
    assert msg.stream == STREAM
    assert msg.delivery_count == 1
    return msg


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("type", "data", "metadata"),
    [
        ("email", {"to": "a@b.c"}, {"priority": "high"}),
        (
            "通知 ✉",
            {"名前": "Zoë ☃ 😀", "text": '<b>&amp;</b> \u2028 \x00 tab\t "quoted" \\'},
            {"langue": "français", "表": "值", "emoji": "🚀"},
        ),
        (
            "nested",
            {
                "a": [1, 2.5, -3, True, False, None, "s", [], {}],
                "b": {"c": {"d": {"e": [{"f": [1, [2, [3, [4]]]]}]}}},
                "big": 2**62,
                "neg": -(2**62),
                "float": 1e-300,
            },
            None,
        ),
        ("big", {"blob": "x" * (1024 * 1024), "tail": ["ü" * 1000, 42]}, {}),
    ],
    ids=["plain", "non-ascii", "nested", "one-megabyte"],
)
async def test_round_trip(
    redis_client: redis.asyncio.Redis, type: str, data: Any, metadata: dict[str, str] | None
) -> None:
    msg = await round_trip(redis_client, type, data, metadata)
    assert msg.type == type
    assert msg.data == data
    assert msg.metadata == (metadata or {})


@pytest.mark.parametrize("data", [None, [], [1, "x"], "text", 0, 1.25, True, {}])
async def test_round_trip_non_object_payloads(redis_client: redis.asyncio.Redis, data: Any) -> None:
    msg = await round_trip(redis_client, "t", data)
    # ``null`` data means an empty map (goStream's "no map" convention).
    assert msg.data == ({} if data is None else data)


async def test_round_trip_typed_model(redis_client: redis.asyncio.Redis) -> None:
    order = Order(id=7, customer="Zoë", items=[Item("a-1", 2), Item("b-2", 1)])
    decoder = payload_decoder(Order)
    msg = await round_trip(redis_client, "order", order, {"k": "v"}, decoder)
    assert isinstance(msg.data, Order)
    assert msg.data == order
    # The same entry decodes as plain JSON too.
    plain = await round_trip(redis_client, "order", order)
    assert plain.data == {
        "id": 7,
        "customer": "Zoë",
        "items": [{"sku": "a-1", "qty": 2}, {"sku": "b-2", "qty": 1}],
        "note": None,
    }


def test_payload_decoder_is_shared_per_model() -> None:
    assert payload_decoder(Order) is payload_decoder(Order)
    assert payload_decoder(None) is payload_decoder(None)
    assert payload_decoder(Order).model is Order
    assert payload_decoder(None).model is None


async def test_validation_error_names_entry_and_path(redis_client: redis.asyncio.Redis) -> None:
    bad = {"id": 1, "customer": "c", "items": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": "2"}]}
    entry_id, fields = await add_and_read(redis_client, *encode_fields("order", bad, None))
    with pytest.raises(ValidationError) as info:
        decode_message(entry_id, fields, STREAM, payload_decoder(Order))
    assert (info.value.entry_id, info.value.category, info.value.field) == (
        entry_id,
        "wrong_schema",
        "data",
    )
    # The text says where in the payload, for the log line and the dead letter.
    assert "$.items[1].qty" in str(info.value)


def test_explicit_message_type_skips_type_field() -> None:
    fields = {b"data": b"{}", b"metadata": b"{}"}
    msg = decode_message("1-1", fields, STREAM, PLAIN, delivery_count=3, message_type="given")
    assert msg.type == "given"
    assert msg.delivery_count == 3


# --------------------------------------------------------------------------- encode


def test_encode_fields_layout() -> None:
    fields = encode_fields("t", {"a": 1}, None)
    assert fields == ("type", "t", "data", b'{"a":1}', "metadata", EMPTY_OBJECT)
    assert encode_fields("t", None, {})[3:] == (b"null", "metadata", b"{}")
    assert encode_fields("t", 1, {"k": "v"})[5] == b'{"k":"v"}'


@pytest.mark.parametrize("metadata", [{"k": 1}, {"k": None}, {"k": b"v"}, {1: "v"}])
def test_encode_fields_rejects_non_str_metadata(metadata: Any) -> None:
    with pytest.raises(TypeError, match="metadata"):
        encode_fields("t", {}, metadata)


def test_encode_fields_rejects_unencodable_data() -> None:
    with pytest.raises(TypeError):
        encode_fields("t", {"x": object()}, None)


# --------------------------------------------------------------------------- goStream entries

# What Go's encoding/json writes: compact, keys sorted, <>& escaped, numbers as is.
GO_DATA = (
    b'{"amount":12.5,"count":3,"html":"\\u003cb\\u003eHi\\u003c/b\\u003e \\u0026 bye",'
    b'"list":[1,2,3],"nested":{"ok":true,"none":null},"unicode":"\\u00e9\xe2\x82\xac"}'
)
GO_EXPECTED = {
    "amount": 12.5,
    "count": 3,
    "html": "<b>Hi</b> & bye",
    "list": [1, 2, 3],
    "nested": {"ok": True, "none": None},
    "unicode": "é€",
}


async def test_go_producer_entry(redis_client: redis.asyncio.Redis) -> None:
    meta = b'{"source":"go","trace":"\\u003cid\\u003e"}'
    entry_id, fields = await add_and_read(
        redis_client, "metadata", meta, "data", GO_DATA, "type", "payment"
    )
    msg = decode_message(entry_id, fields, STREAM, PLAIN)
    assert msg.type == "payment"
    assert msg.data == GO_EXPECTED
    assert msg.metadata == {"source": "go", "trace": "<id>"}


async def test_go_retry_metadata(redis_client: redis.asyncio.Redis) -> None:
    meta = {
        "retry_count": "2",
        "last_error": 'handler failed: "boom" \u003c\u003e',
        "last_retry_time": "2025-05-27T10:11:12+08:00",
        "original_id": "1716800000000-0",
        "failure_time": "2025-05-27T10:15:00Z",
    }
    raw_meta = json.dumps(meta, separators=(",", ":")).encode()
    entry_id, fields = await add_and_read(
        redis_client, "data", b'{"n":1}', "type", "job", "metadata", raw_meta
    )
    msg = decode_message(entry_id, fields, STREAM, PLAIN)
    assert msg.metadata == meta
    assert msg.data == {"n": 1}


async def test_go_numbers_fit_a_model(redis_client: redis.asyncio.Redis) -> None:
    class Payment(msgspec.Struct):
        amount: float
        count: int
        html: str

    entry_id, fields = await add_and_read(redis_client, "type", "payment", "data", GO_DATA)
    msg = decode_message(entry_id, fields, STREAM, payload_decoder(Payment))
    assert msg.data == Payment(amount=12.5, count=3, html="<b>Hi</b> & bye")


@pytest.mark.parametrize(
    ("fields", "data", "metadata"),
    [
        (("type", "t", "data", "null", "metadata", "null"), {}, {}),
        (("type", "t", "data", "null"), {}, {}),
        (("type", "t", "metadata", "null"), {}, {}),
        (("type", "t"), {}, {}),
        (("metadata", '{"a":"b"}', "type", "t"), {}, {"a": "b"}),
        (("data", '{"a":1}', "type", "t"), {"a": 1}, {}),
        (("type", "t", "data", "{}", "metadata", "{}", "extra", "ignored"), {}, {}),
    ],
    ids=[
        "null-both",
        "null-data",
        "null-meta",
        "absent-both",
        "absent-data",
        "absent-meta",
        "extra",
    ],
)
async def test_go_null_and_absent_fields(
    redis_client: redis.asyncio.Redis, fields: tuple[str, ...], data: Any, metadata: Any
) -> None:
    entry_id, raw = await add_and_read(redis_client, *fields)
    msg = decode_message(entry_id, raw, STREAM, PLAIN)
    assert msg.type == "t"
    assert msg.data == data
    assert msg.metadata == metadata


async def test_go_init_placeholder(redis_client: redis.asyncio.Redis) -> None:
    entry_id, fields = await add_and_read(redis_client, "init", "true")
    assert is_init_entry(fields)
    # It is not a message: decoding it says the type is missing.
    with pytest.raises(DecodeError) as info:
        decode_message(entry_id, fields, STREAM, PLAIN)
    assert (info.value.entry_id, info.value.category) == (entry_id, "missing_type")


@pytest.mark.parametrize(
    "fields",
    [
        {b"init": b"false"},
        {b"init": b"true", b"type": b"t"},
        {b"type": b"init"},
        {b"init": b"TRUE"},
        {},
    ],
)
def test_not_init_entries(fields: dict[bytes, bytes]) -> None:
    assert not is_init_entry(fields)


async def test_missing_type_names_the_fields_present(redis_client: redis.asyncio.Redis) -> None:
    entry_id, fields = await add_and_read(redis_client, "data", "{}", "metadata", "{}")
    with pytest.raises(DecodeError) as info:
        decode_type(entry_id, fields)
    assert (info.value.entry_id, info.value.category, info.value.field) == (
        entry_id,
        "missing_type",
        "type",
    )
    assert "'data', 'metadata'" in str(info.value)  # a hint at what was sent instead


def bad(
    fields: tuple[str | bytes, ...],
    category: DecodeCategory,
    field: str,
    model: type[Any] | None = None,
    error: type[DecodeError] = DecodeError,
    *,
    id: str,
) -> Any:
    return pytest.param(fields, category, field, model, error, id=id)


@pytest.mark.parametrize(
    ("fields", "category", "field", "model", "error"),
    [
        bad(("data", "{}", "metadata", "{}"), "missing_type", "type", id="missing-type"),
        # Bad UTF-8: outside JSON strings, inside them (which msgspec reported as
        # UnicodeDecodeError in 0.18 and as msgspec.DecodeError in 0.23), with a model.
        bad(("type", b"\xff\xfebad"), "invalid_utf8", "type", id="utf8-type"),
        bad(("type", "t", "data", b'{"a":"\xc3\x28"}'), "invalid_utf8", "data", id="utf8-data"),
        bad(("type", "t", "data", b"\xff"), "invalid_utf8", "data", id="utf8-data-bare"),
        bad(("type", "t", "metadata", b'{"k":"\xff"}'), "invalid_utf8", "metadata", id="utf8-meta"),
        bad(
            ("type", "t", "data", b'{"sku":"\xff","qty":1}'),
            "invalid_utf8",
            "data",
            Item,
            id="utf8-data-model",
        ),
        bad(("type", "t", "data", b"{"), "invalid_json", "data", id="json-truncated"),
        bad(("type", "t", "data", b"{'a': 1}"), "invalid_json", "data", id="json-quotes"),
        bad(("type", "t", "data", b""), "invalid_json", "data", id="json-empty"),
        bad(("type", "t", "data", b'{"a":1} x'), "invalid_json", "data", id="json-trailing"),
        bad(("type", "t", "metadata", b"{"), "invalid_json", "metadata", id="json-meta"),
        bad(("type", "t", "metadata", b""), "invalid_json", "metadata", id="json-meta-empty"),
        bad(("type", "t", "metadata", b"nul"), "invalid_json", "metadata", id="json-meta-nul"),
        # Not JSON is a DecodeError even with a model, never a ValidationError.
        bad(("type", "t", "data", b"{not json"), "invalid_json", "data", Order, id="json-model"),
        bad(
            ("type", "t", "data", b'{"id":1}'),
            "wrong_schema",
            "data",
            Order,
            ValidationError,
            id="schema-missing-field",
        ),
        *(
            bad(("type", "t", "metadata", raw), "wrong_schema", "metadata", id=f"schema-meta-{n}")
            for n, raw in enumerate(
                [
                    b'{"retry_count":2}',
                    b'{"a":null}',
                    b'{"a":["x"]}',
                    b'{"a":{"b":"c"}}',
                    b'["a"]',
                    b'"s"',
                    b"1",
                ]
            )
        ),
    ],
)
async def test_bad_entry_is_a_decode_error_of_its_category(
    redis_client: redis.asyncio.Redis,
    fields: tuple[str | bytes, ...],
    category: DecodeCategory,
    field: str,
    model: type[Any] | None,
    error: type[DecodeError],
) -> None:
    entry_id, raw = await add_and_read(redis_client, *fields)
    sent = {
        k: v if isinstance(v, bytes) else v.encode()
        for k, v in zip(fields[::2], fields[1::2], strict=True)
    }
    assert raw == {k.encode(): v for k, v in sent.items()}  # stored byte for byte
    with pytest.raises(DecodeError) as info:
        decode_message(entry_id, raw, STREAM, payload_decoder(model))
    exc = info.value
    assert type(exc) is error
    assert (exc.entry_id, exc.category, exc.field) == (entry_id, category, field)
    # A dead letter's reason is this text: the category can be read back from it.
    assert DecodeError.category_of(str(exc)) == category
    assert entry_id in str(exc)


def test_category_of_reads_only_decode_errors() -> None:
    assert DecodeError.category_of("entry 1-0: [invalid_utf8] field 'data' is not UTF-8") == (
        "invalid_utf8"
    )
    assert DecodeError.category_of(str(ValidationError("1-0", "no"))) == "wrong_schema"
    assert DecodeError.category_of(str(DecodeError("1-0", "no"))) == "malformed"
    for text in [
        "RuntimeError: entry 1-0: [invalid_utf8] raised by a handler",
        "entry 1-0: no handler for type 'x'",
        "entry 1-0: [not_a_category] x",
        "delivered 6 times, more than max_deliveries=5",
        "",
    ]:
        assert DecodeError.category_of(text) is None, text


# --------------------------------------------------------------------------- properties

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
metadata_maps = st.dictionaries(st.text(max_size=8), st.text(max_size=12), max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    type=st.text(min_size=1, max_size=10),
    data=json_values,
    metadata=st.none() | metadata_maps,
)
def test_property_encode_decode_round_trip(
    type: str, data: Any, metadata: dict[str, str] | None
) -> None:
    flat = encode_fields(type, data, metadata)
    # As redis-py sends them: str fields UTF-8 encoded, bytes fields as is.
    fields = {
        flat[i].encode(): (v.encode() if isinstance(v, str) else v)
        for i, v in ((i, flat[i + 1]) for i in range(0, len(flat), 2))
    }
    msg = decode_message("1-0", fields, STREAM, PLAIN)
    assert msg.type == type
    assert msg.data == ({} if data is None else data)
    assert msg.metadata == (metadata or {})


def is_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=40) | st.text(max_size=20).map(str.encode))
def test_property_arbitrary_bytes_are_messages_or_classified_decode_errors(raw: bytes) -> None:
    for field, fields in (
        ("type", {b"type": raw}),
        ("data", {b"type": b"t", b"data": raw}),
        ("metadata", {b"type": b"t", b"metadata": raw}),
    ):
        error: DecodeError | None = None
        try:  # any other exception escapes and fails the test
            decode_message("9-9", fields, STREAM, PLAIN)
        except DecodeError as exc:
            error = exc
        if error is None:
            assert is_utf8(raw)
            continue
        assert (error.entry_id, error.field) == ("9-9", field)
        # Not UTF-8 is its own category whatever msgspec says, and only then.
        assert (error.category == "invalid_utf8") == (not is_utf8(raw)), error
        assert error.category in {"invalid_utf8", "invalid_json", "wrong_schema"}, error
