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
from redcurrent.codec import (
    EMPTY_OBJECT,
    PayloadDecoder,
    decode_message,
    decode_type,
    encode_fields,
    is_init_entry,
    payload_decoder,
)

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


async def test_round_trip_plain(redis_client: redis.asyncio.Redis) -> None:
    msg = await round_trip(redis_client, "email", {"to": "a@b.c"}, {"priority": "high"})
    assert msg.type == "email"
    assert msg.data == {"to": "a@b.c"}
    assert msg.metadata == {"priority": "high"}


async def test_round_trip_non_ascii(redis_client: redis.asyncio.Redis) -> None:
    data = {"名前": "Zoë ☃ 😀", "text": '<b>&amp;</b> \u2028 \x00 tab\t "quoted" \\'}
    metadata = {"langue": "français", "表": "值", "emoji": "🚀"}
    msg = await round_trip(redis_client, "通知 ✉", data, metadata)
    assert msg.type == "通知 ✉"
    assert msg.data == data
    assert msg.metadata == metadata


async def test_round_trip_nested(redis_client: redis.asyncio.Redis) -> None:
    data = {
        "a": [1, 2.5, -3, True, False, None, "s", [], {}],
        "b": {"c": {"d": {"e": [{"f": [1, [2, [3, [4]]]]}]}}},
        "big": 2**62,
        "neg": -(2**62),
        "float": 1e-300,
    }
    msg = await round_trip(redis_client, "nested", data)
    assert msg.data == data
    assert msg.metadata == {}


@pytest.mark.parametrize("data", [None, [], [1, "x"], "text", 0, 1.25, True, {}])
async def test_round_trip_non_object_payloads(redis_client: redis.asyncio.Redis, data: Any) -> None:
    msg = await round_trip(redis_client, "t", data)
    # ``null`` data means an empty map (goStream's "no map" convention).
    assert msg.data == ({} if data is None else data)


async def test_round_trip_one_megabyte(redis_client: redis.asyncio.Redis) -> None:
    data = {"blob": "x" * (1024 * 1024), "tail": ["ü" * 1000, 42]}
    msg = await round_trip(redis_client, "big", data)
    assert msg.data == data


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
    assert info.value.entry_id == entry_id
    text = str(info.value)
    assert entry_id in text
    assert "$.items[1].qty" in text
    assert "data" in text
    assert isinstance(info.value, DecodeError)


async def test_validation_error_missing_field(redis_client: redis.asyncio.Redis) -> None:
    entry_id, fields = await add_and_read(redis_client, *encode_fields("order", {"id": 1}, None))
    with pytest.raises(ValidationError, match=r"customer") as info:
        decode_message(entry_id, fields, STREAM, payload_decoder(Order))
    assert info.value.entry_id == entry_id


def test_typed_invalid_json_is_a_decode_error_not_validation() -> None:
    with pytest.raises(DecodeError) as info:
        payload_decoder(Order).decode("5-0", b"{not json")
    assert type(info.value) is DecodeError
    assert "5-0" in str(info.value)


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
    with pytest.raises(DecodeError, match="type") as info:
        decode_message(entry_id, fields, STREAM, PLAIN)
    assert info.value.entry_id == entry_id


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


async def test_missing_type(redis_client: redis.asyncio.Redis) -> None:
    entry_id, fields = await add_and_read(redis_client, "data", "{}", "metadata", "{}")
    with pytest.raises(DecodeError) as info:
        decode_type(entry_id, fields)
    assert info.value.entry_id == entry_id
    assert "missing field 'type'" in str(info.value)
    assert "'data'" in str(info.value)
    assert entry_id in str(info.value)


@pytest.mark.parametrize("field", ["type", "data", "metadata"])
async def test_non_utf8_field_is_a_decode_error(
    redis_client: redis.asyncio.Redis, field: str
) -> None:
    values = {"type": b"t", "data": b'{"a":"b"}', "metadata": b'{"k":"v"}'}
    values[field] = {
        "type": b"\xff\xfebad",
        "data": b'{"a":"\xc3\x28"}',
        "metadata": b'{"k":"\xff"}',
    }[field]
    flat = [x for pair in values.items() for x in pair]
    entry_id, fields = await add_and_read(redis_client, *flat)
    assert fields[field.encode()] == values[field]  # stored byte for byte
    with pytest.raises(DecodeError) as info:
        decode_message(entry_id, fields, STREAM, PLAIN)
    assert not isinstance(info.value, UnicodeDecodeError)
    assert info.value.entry_id == entry_id
    assert f"field '{field}'" in str(info.value)
    assert entry_id in str(info.value)


async def test_non_utf8_data_with_model(redis_client: redis.asyncio.Redis) -> None:
    entry_id, fields = await add_and_read(
        redis_client, "type", "t", "data", b'{"sku":"\xff","qty":1}'
    )
    with pytest.raises(DecodeError, match="field 'data'") as info:
        decode_message(entry_id, fields, STREAM, payload_decoder(Item))
    assert info.value.entry_id == entry_id


@pytest.mark.parametrize(
    "metadata",
    [
        b'{"retry_count":2}',
        b'{"a":null}',
        b'{"a":["x"]}',
        b'{"a":{"b":"c"}}',
        b'["a"]',
        b'"s"',
        b"1",
    ],
)
async def test_metadata_must_map_str_to_str(
    redis_client: redis.asyncio.Redis, metadata: bytes
) -> None:
    entry_id, fields = await add_and_read(redis_client, "type", "t", "metadata", metadata)
    with pytest.raises(DecodeError, match="field 'metadata'") as info:
        decode_message(entry_id, fields, STREAM, PLAIN)
    assert info.value.entry_id == entry_id


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("data", b"{"),
        ("data", b"{'a': 1}"),
        ("data", b""),
        ("data", b'{"a":1} trailing'),
        ("metadata", b"{"),
        ("metadata", b""),
        ("metadata", b"nul"),
    ],
)
async def test_invalid_json(redis_client: redis.asyncio.Redis, field: str, raw: bytes) -> None:
    entry_id, fields = await add_and_read(redis_client, "type", "t", field, raw)
    with pytest.raises(DecodeError, match=f"field '{field}'") as info:
        decode_message(entry_id, fields, STREAM, PLAIN)
    assert type(info.value) is DecodeError
    assert info.value.entry_id == entry_id


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


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=40))
def test_property_arbitrary_bytes_never_escape_as_other_errors(raw: bytes) -> None:
    for fields in (
        {b"type": raw},
        {b"type": b"t", b"data": raw},
        {b"type": b"t", b"metadata": raw},
    ):
        try:
            decode_message("9-9", fields, STREAM, PLAIN)
        except DecodeError as exc:
            entry_id = exc.entry_id
        else:
            entry_id = "9-9"
        assert entry_id == "9-9"
