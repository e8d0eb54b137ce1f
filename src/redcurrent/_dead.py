"""The dead-letter stream of a topic: writing, reading and replaying.

A dead letter keeps the original entry's fields byte for byte and adds
``dlq:``-prefixed fields saying where it came from and why it failed, so
that ``XRANGE`` shows everything and a replay restores the exact entry. An
original field that itself starts with ``dlq:`` would pass for one of ours and
be lost: it is stored as ``dlq:field:<its name>`` and read back unescaped.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import msgspec
from redis.client import NEVER_DECODE

from ._codec import FIELD_DATA, FIELD_METADATA, FIELD_TYPE
from ._keys import TopicKeys
from ._message import DeadLetter
from ._redis import AnyRedis, as_str
from ._scripts import DEAD_LETTER, DEAD_LETTER_ESCAPE_PREFIX, DEAD_LETTER_FIELD_PREFIX, REPLAY

__all__ = [
    "DeadLetterWriter",
    "delete_dead_letters",
    "read_dead_letters",
    "replay_dead_letters",
]

_P = DEAD_LETTER_FIELD_PREFIX.encode()
_ESCAPE = DEAD_LETTER_ESCAPE_PREFIX.encode()
_ESCAPED = _ESCAPE + _P

Call = Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]]
_json = msgspec.json.Decoder()


class DeadLetterWriter:
    """Moves entries of one group to the dead-letter stream atomically."""

    __slots__ = ("_call", "_consumer", "_group", "_keys", "_script")

    def __init__(
        self,
        redis: AnyRedis,
        keys: TopicKeys,
        group: str,
        consumer: str,
        *,
        call: Call | None = None,
    ) -> None:
        """``call``: a consumer's retrying wrapper, so that an outage at the
        moment of the move is waited out. Repeating a move is safe: the script
        acks and copies only an entry that is still pending."""
        self._script = redis.register_script(DEAD_LETTER)
        self._keys = keys
        self._group = group
        self._consumer = consumer
        self._call = call

    async def move(
        self,
        entry_id: str,
        fields: Mapping[bytes, bytes],
        *,
        reason: str,
        error_type: str,
        delivery_count: int,
    ) -> bool:
        """Ack and copy in one step; False if the entry was no longer pending."""
        args: list[Any] = [self._group, entry_id]
        for key, value in fields.items():
            args += (_ESCAPE + key if key.startswith(_P) else key, value)
        args += (
            "dlq:original_id", entry_id,
            "dlq:stream", self._keys.stream,
            "dlq:group", self._group,
            "dlq:consumer", self._consumer,
            "dlq:reason", reason,
            "dlq:error_type", error_type,
            "dlq:delivery_count", delivery_count,
            "dlq:failed_at", f"{time.time():.3f}",
        )  # fmt: skip
        attempt = functools.partial(
            self._script, keys=[self._keys.stream, self._keys.dead_letters], args=args
        )
        result = await (self._call("dead letter move", attempt) if self._call else attempt())
        return result is not None


def _original_name(name: bytes) -> bytes | None:
    """The original entry's name for a dead letter's field; None for our own.

    Mirrors the REPLAY script, so that what ``dead_letters()`` shows is what a
    replay writes back.
    """
    if name.startswith(_ESCAPED):
        return name[len(_ESCAPE) :]
    return None if name.startswith(_P) else name


def _parse(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    original: dict[bytes, bytes] = {}
    for key, value in fields.items():
        name = _original_name(key)
        if name is not None:
            original[name] = value

    def extra(name: str, default: str = "") -> str:
        raw = fields.get(_P + name.encode())
        return raw.decode(errors="replace") if raw is not None else default

    raw_type = original.get(FIELD_TYPE)
    try:
        data: Any = _json.decode(original.get(FIELD_DATA) or b"{}")
    except (msgspec.DecodeError, UnicodeDecodeError):
        data = original.get(FIELD_DATA)
    try:
        meta_raw = _json.decode(original.get(FIELD_METADATA) or b"{}")
        metadata = (
            {str(k): str(v) for k, v in meta_raw.items()} if isinstance(meta_raw, dict) else {}
        )
    except (msgspec.DecodeError, UnicodeDecodeError):
        metadata = {}
    return DeadLetter(
        id=entry_id.decode(),
        original_id=extra("original_id"),
        type=raw_type.decode(errors="replace") if raw_type is not None else None,
        data=data,
        metadata=metadata,
        group=extra("group"),
        consumer=extra("consumer"),
        reason=extra("reason"),
        error_type=extra("error_type"),
        delivery_count=int(extra("delivery_count", "0") or 0),
        failed_at=float(extra("failed_at", "0") or 0),
        fields=original,
    )


async def read_dead_letters(
    redis: AnyRedis, keys: TopicKeys, count: int, *, start: str = "-"
) -> list[DeadLetter]:
    """The oldest ``count`` dead letters from ``start`` on, read as bytes.

    Dead letters are often exactly the entries that are not UTF-8, so the
    reply is never decoded by redis-py, whatever the client's
    ``decode_responses`` (``NEVER_DECODE`` reads this one reply raw, on the
    client's own connections; no second pool is needed).
    """
    reply: Any = await redis.execute_command(
        "XRANGE", keys.dead_letters, start, "+", "COUNT", count, **{NEVER_DECODE: []}
    )
    return [_parse(_b(entry_id), _bytes_fields(fields)) for entry_id, fields in reply]


async def replay_dead_letters(
    redis: AnyRedis, keys: TopicKeys, ids: Iterable[str] | None, *, count: int = 100
) -> list[str]:
    if ids is None:
        ids = [letter.id for letter in await read_dead_letters(redis, keys, count)]
    wanted = list(ids)
    if not wanted:
        return []
    script = redis.register_script(REPLAY)
    reply = await script(keys=[keys.stream, keys.dead_letters], args=wanted)
    return [as_str(new_id) for new_id in reply if new_id is not None]


#: The most ids one ``XDEL`` of :func:`delete_dead_letters` names.
DELETE_CHUNK = 1000


async def delete_dead_letters(redis: AnyRedis, keys: TopicKeys, ids: list[str]) -> int:
    """``XDEL`` the given dead letters, a chunk of ids per command; returns how
    many existed. Dead letters are an append-only record of failures, so
    deleting one is an operator's decision (``redcurrent dead-letters purge``)."""
    deleted = 0
    for start in range(0, len(ids), DELETE_CHUNK):
        deleted += int(await redis.xdel(keys.dead_letters, *ids[start : start + DELETE_CHUNK]))
    return deleted


def _b(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _bytes_fields(fields: Mapping[Any, Any]) -> dict[bytes, bytes]:
    return {_b(k): _b(v) for k, v in fields.items()}
