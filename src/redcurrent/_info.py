"""``Topic.info()``: one pipelined round trip, plus one for lags the server omits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from redis import exceptions as rex
from redis.client import NEVER_DECODE

from ._faults import Fault, classify
from ._keys import TopicKeys
from ._message import GroupInfo, TopicInfo
from ._redis import AnyRedis, as_str
from ._scripts import COUNT_AFTER

__all__ = ["LAG_SCAN_LIMIT", "id_key", "topic_info"]

#: The most entries :func:`topic_info` counts to compute a lag the server did not give.
LAG_SCAN_LIMIT: Final = 1000


def id_key(entry_id: str) -> tuple[int, int]:
    """Sort key of an entry id: ids compare as numbers, never as strings."""
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return (2**64, 0)  # not an id: sort after every real one


def _field(mapping: Mapping[Any, Any], name: str) -> Any:
    """A field of a parsed XINFO reply, whose keys are str (RESP2) or bytes (RESP3)."""
    if name in mapping:
        return mapping[name]
    return mapping.get(name.encode())


def _entry_id(entry: Any) -> str | None:
    if not entry:
        return None
    return as_str(entry[0])


def _missing(reply: Any) -> bool:
    return isinstance(reply, rex.ResponseError) and classify(reply) is Fault.GONE


def _check(reply: Any) -> Any:
    if isinstance(reply, Exception):
        raise reply
    return reply


async def topic_info(redis: AnyRedis, keys: TopicKeys) -> TopicInfo:
    """Length, first and last entry ids, groups, stopped ids, dead-letter and
    scheduled counts.

    A stream that does not exist is reported empty, without groups, not as an
    error (its stopped ids and dead letters may still exist).

    ``lag`` (entries not yet delivered to a group) comes from the server when
    it gives one (Redis >= 7, and not after certain deletions). Otherwise it is
    computed where that is cheap: 0 when the group has read the last entry,
    the stream length when it has read nothing still in the stream, and else
    by counting up to :data:`LAG_SCAN_LIMIT` entries on the server. Past that
    limit it is ``None``: an exact count would mean reading the whole tail.
    """
    pipe = redis.pipeline(transaction=False)
    # The first and last entries come with their fields, which need not be
    # UTF-8: read that reply raw even on a client with decode_responses=True.
    pipe.execute_command("XINFO STREAM", keys.stream, **{NEVER_DECODE: []})
    pipe.xinfo_groups(keys.stream)
    pipe.smembers(keys.stopped)
    pipe.xlen(keys.dead_letters)
    pipe.zcard(keys.scheduled)
    replies = await pipe.execute(raise_on_error=False)
    stream_reply, groups_reply, stopped_reply, dead_reply, scheduled_reply = replies
    stopped = sorted((as_str(m) for m in _check(stopped_reply)), key=id_key)
    dead_letters = int(_check(dead_reply))
    scheduled = int(_check(scheduled_reply))
    if _missing(stream_reply):
        return TopicInfo(
            length=0,
            first_id=None,
            last_id=None,
            groups=[],
            stopped=stopped,
            dead_letters=dead_letters,
            scheduled=scheduled,
        )
    stream = _check(stream_reply)
    length = int(_field(stream, "length"))
    first_id = _entry_id(_field(stream, "first-entry"))
    last_id = _entry_id(_field(stream, "last-entry"))
    groups = [] if _missing(groups_reply) else list(_check(groups_reply))
    lags = await _lags(redis, keys, groups, length, first_id, last_id)
    return TopicInfo(
        length=length,
        first_id=first_id,
        last_id=last_id,
        groups=[
            GroupInfo(
                name=as_str(_field(group, "name")),
                consumers=int(_field(group, "consumers")),
                pending=int(_field(group, "pending")),
                lag=lag,
                last_delivered_id=as_str(_field(group, "last-delivered-id")),
            )
            for group, lag in zip(groups, lags, strict=True)
        ],
        stopped=stopped,
        dead_letters=dead_letters,
        scheduled=scheduled,
    )


async def _lags(
    redis: AnyRedis,
    keys: TopicKeys,
    groups: Sequence[Mapping[Any, Any]],
    length: int,
    first_id: str | None,
    last_id: str | None,
) -> list[int | None]:
    lags: list[int | None] = []
    to_count: list[tuple[int, str]] = []
    for index, group in enumerate(groups):
        given = _field(group, "lag")
        if given is not None:
            lags.append(int(given))
            continue
        delivered = id_key(as_str(_field(group, "last-delivered-id")))
        if last_id is None or delivered >= id_key(last_id):
            lags.append(0)
        elif first_id is not None and delivered < id_key(first_id):
            lags.append(length)
        else:
            lags.append(None)
            to_count.append((index, as_str(_field(group, "last-delivered-id"))))
    if to_count:
        pipe = redis.pipeline(transaction=False)
        for _, delivered_id in to_count:
            pipe.eval(COUNT_AFTER, 1, keys.stream, delivered_id, LAG_SCAN_LIMIT + 1)
        counts = await pipe.execute()
        for (index, _), count in zip(to_count, counts, strict=True):
            if int(count) <= LAG_SCAN_LIMIT:
                lags[index] = int(count)
    return lags
