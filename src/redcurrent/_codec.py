"""The wire format shared with goStream, encoded and decoded with msgspec.

An entry has three fields: ``type`` (routing string), ``data`` (JSON text of
the payload) and ``metadata`` (JSON object of string to string). goStream
writes ``null`` for a missing map and may omit ``data`` or ``metadata``; both
mean an empty object. Decoders are built once per model and reused on the
hot path.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Final

import msgspec

from ._message import Message
from .errors import ConfigurationError, DecodeError, EncodeError, ValidationError

__all__ = [
    "EMPTY_OBJECT",
    "ENCODE_FAILURES",
    "FIELD_DATA",
    "FIELD_KEY",
    "FIELD_METADATA",
    "FIELD_TYPE",
    "PayloadDecoder",
    "decode_message",
    "check_message_type",
    "decode_type",
    "data_error",
    "encode_data",
    "encode_fields",
    "encode_metadata",
    "is_init_entry",
    "payload_decoder",
]

FIELD_TYPE: Final = b"type"
FIELD_DATA: Final = b"data"
FIELD_METADATA: Final = b"metadata"
#: The message key (``publish(key=...)``): per-key order, and the partition a
#: dead letter's replay returns to. Absent from unkeyed entries.
FIELD_KEY: Final = b"key"
EMPTY_OBJECT: Final = b"{}"
_NULL: Final = b"null"

_encoder = msgspec.json.Encoder()
_metadata_decoder = msgspec.json.Decoder(dict[str, str])

Fields = Mapping[bytes, bytes]


#: The JSON text of a payload (``data`` field). Raw msgspec: callers turn its
#: failures (the exceptions in :data:`ENCODE_FAILURES`) into :func:`data_error`.
encode_data: Final = _encoder.encode

#: What msgspec raises for a value it cannot write as JSON: an unsupported type
#: or dict key (TypeError), a lone surrogate in a str (UnicodeEncodeError, a
#: ValueError), nesting too deep or circular (RecursionError).
ENCODE_FAILURES: Final = (TypeError, ValueError, RecursionError, msgspec.EncodeError)


def data_error(data: Any, exc: BaseException) -> EncodeError:
    """The library's error for a payload msgspec could not encode."""
    return EncodeError(f"data of type {type_name(data)} is not JSON-serialisable: {exc}")


def encode_metadata(metadata: Mapping[str, str] | None) -> bytes:
    """The JSON text of the ``metadata`` field; raises :class:`EncodeError`
    (a TypeError) unless it is None or a mapping of str to str."""
    if metadata is None:
        return EMPTY_OBJECT
    if metadata.__class__ is not dict and not isinstance(metadata, Mapping):
        raise EncodeError(
            f"metadata must be a mapping of str to str or None, got {type_name(metadata)}"
        )
    if not metadata:
        return EMPTY_OBJECT
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise EncodeError(f"metadata must map str to str, got {key!r}: {type_name(value)}")
    try:
        return _encoder.encode(metadata)
    except ENCODE_FAILURES as exc:
        raise EncodeError(f"metadata cannot be encoded as JSON: {exc}") from exc


def encode_fields(
    type: str, data: Any, metadata: Mapping[str, str] | None
) -> tuple[str, str, str, bytes, str, bytes]:
    """The flat field list of an XADD for one message; raises :class:`EncodeError`."""
    try:
        body = _encoder.encode(data)
    except ENCODE_FAILURES as exc:
        raise data_error(data, exc) from exc
    return ("type", type, "data", body, "metadata", encode_metadata(metadata))


def check_message_type(message_type: str) -> None:
    """The ``type`` field routes a message: it must be a non-empty string, for
    publishers and handlers alike."""
    if not isinstance(message_type, str) or not message_type:
        raise ConfigurationError(f"message type must be a non-empty str, got {message_type!r}")


def type_name(value: object) -> str:
    return type(value).__name__


def _not_utf8(raw: bytes) -> UnicodeDecodeError | None:
    try:
        raw.decode()
    except UnicodeDecodeError as exc:
        return exc
    return None


def _classify(
    entry_id: str, field: str, raw: bytes, exc: Exception, model: type[Any] | None = None
) -> DecodeError:
    """One msgspec failure as a :class:`DecodeError` of the right category.

    By exception type, never by msgspec's message: which failure msgspec reports
    for bad UTF-8 inside JSON has changed between releases (``UnicodeDecodeError``,
    then ``msgspec.DecodeError``), so the bytes are checked here on the error path.
    """
    bad_utf8 = exc if isinstance(exc, UnicodeDecodeError) else _not_utf8(raw)
    if bad_utf8 is not None:
        return DecodeError(
            entry_id, f"field {field!r} is not UTF-8: {bad_utf8}", "invalid_utf8", field
        )
    if isinstance(exc, msgspec.ValidationError):
        if model is not None:
            return ValidationError(
                entry_id, f"field {field!r} does not match {model!r}: {exc}", field=field
            )
        # The one schema without a model: metadata's string-to-string object.
        return DecodeError(
            entry_id,
            f"field {field!r} is not a JSON object of strings: {exc}",
            "wrong_schema",
            field,
        )
    return DecodeError(entry_id, f"field {field!r} is not valid JSON: {exc}", "invalid_json", field)


class PayloadDecoder:
    """Decodes the ``data`` field, into plain JSON values or a model type."""

    __slots__ = ("_decoder", "model")

    def __init__(self, model: type[Any] | None) -> None:
        self.model = model
        self._decoder: msgspec.json.Decoder[Any] = (
            msgspec.json.Decoder(model) if model is not None else msgspec.json.Decoder()
        )

    def decode(self, entry_id: str, raw: bytes | None) -> Any:
        if raw is None or raw == _NULL:
            raw = EMPTY_OBJECT
        try:
            return self._decoder.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # ValidationError included
            raise _classify(entry_id, "data", raw, exc, self.model) from None


@functools.lru_cache(maxsize=256)
def payload_decoder(model: type[Any] | None) -> PayloadDecoder:
    """One shared decoder per model type."""
    return PayloadDecoder(model)


def is_init_entry(fields: Fields) -> bool:
    """goStream's group-creation placeholder (``init`` = ``true``), not a message."""
    return len(fields) == 1 and fields.get(b"init") == b"true"


def decode_type(entry_id: str, fields: Fields) -> str:
    """The routing type of an entry; raises :class:`DecodeError` when unusable."""
    raw = fields.get(FIELD_TYPE)
    if raw is None:
        names = ", ".join(sorted(repr(k.decode(errors="replace")) for k in fields)) or "none"
        raise DecodeError(
            entry_id, f"missing field 'type' (fields: {names})", "missing_type", "type"
        )
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise DecodeError(
            entry_id, f"field 'type' is not UTF-8: {raw[:60]!r}", "invalid_utf8", "type"
        ) from None


def decode_metadata(entry_id: str, raw: bytes | None) -> dict[str, str]:
    if raw is None or raw == _NULL:
        return {}
    try:
        return _metadata_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # ValidationError included
        raise _classify(entry_id, "metadata", raw, exc) from None


def decode_message(
    entry_id: str,
    fields: Fields,
    stream: str,
    decoder: PayloadDecoder,
    delivery_count: int = 1,
    message_type: str | None = None,
    partition: int | None = None,
) -> Message[Any]:
    """Turn a raw entry into a :class:`Message`, or raise :class:`DecodeError`."""
    if message_type is None:
        message_type = decode_type(entry_id, fields)
    metadata = decode_metadata(entry_id, fields.get(FIELD_METADATA))
    data = decoder.decode(entry_id, fields.get(FIELD_DATA))
    raw_key = fields.get(FIELD_KEY)
    return Message(
        id=entry_id if partition is None else f"{partition}:{entry_id}",
        key=None if raw_key is None else raw_key.decode(errors="replace"),
        partition=partition,
        type=message_type,
        data=data,
        metadata=metadata,
        stream=stream,
        delivery_count=delivery_count,
    )
