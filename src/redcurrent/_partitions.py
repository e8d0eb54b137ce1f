"""The layout of a partitioned topic: how many streams, which keys, where a message goes.

A stream lives in one cluster slot, so a topic that must outgrow one shard is
spread over ``N`` streams ("partitions"). ``N`` is fixed when the topic is
created and stored in the topic's meta hash (in the slot of the topic's name),
never discovered: a producer and a consumer that disagreed on it would route
one key to two partitions and lose per-key order without noticing. The
partition streams' names are chosen once, so that their slots spread evenly
over the 16384 (and therefore over the shards), and stored beside ``N`` so
that clients in other languages need not repeat the search.

Each partition stream is a complete topic of its own (its dead letters,
stopped ids, locks and owner hash carry its hash tag), so every atomic step of
the single-stream code stays inside one slot. ``N = 1`` is no layout at all:
the topic's own stream, exactly as an unpartitioned topic (and goStream) has it.
"""

from __future__ import annotations

import itertools
import json
import time
import weakref
import zlib
from typing import TYPE_CHECKING, Any

import msgspec
from redis.crc import key_slot

from ._keys import TopicKeys
from ._redis import AnyRedis
from .errors import ConfigurationError, PartitionCountError

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = [
    "MAX_PARTITIONS",
    "Layout",
    "join_id",
    "load_layout",
    "partition_for",
    "split_id",
    "spread_streams",
]

#: More partitions than this is a mistake rather than a design.
MAX_PARTITIONS = 4096
#: The version of the meta hash's format, stored in it.
FORMAT = "1"
_SLOTS = 16384
#: How long a process trusts what it read of a topic's layout (seconds). A
#: layout never changes while the topic exists; this only bounds how long a
#: producer keeps publishing to a layout a terminate removed and someone
#: recreated differently.
LAYOUT_CACHE_SECONDS = 5.0


class Layout(msgspec.Struct, frozen=True):
    """The stored layout of a partitioned topic (``count`` > 1)."""

    name: str
    streams: tuple[str, ...]
    state: str = "active"

    @property
    def count(self) -> int:
        return len(self.streams)


def partition_for(key: str, count: int) -> int:
    """The partition of a message key: CRC-32 (IEEE, as zlib and Go's
    hash/crc32 compute it) of its UTF-8 bytes, modulo ``count``. Never
    Python's ``hash()``, which is salted per process."""
    return zlib.crc32(key.encode()) % count


def _candidate(name: str, partition: int, attempt: int) -> str:
    if "{" in name or "}" in name:
        # The name's own hash tag would pin every partition to one slot: put
        # a tag of our own first, which Redis hashes instead.
        return f"{{{partition}.{attempt}}}{name}#{partition}"
    return f"{name}#{partition}.{attempt}"


def spread_streams(name: str, count: int) -> tuple[str, ...]:
    """Stream names for ``count`` partitions, one near the middle of each of
    ``count`` equal shares of the 16384 slots (within a sixteenth of a share
    of it), partition 0 in the share holding the name's own slot, so that
    topics do not all start on one shard. Naive ``{name:p}`` tags put up to
    twice the fair share on one shard; a target at a share's edge could cross
    into the next shard's slots, so that a cluster whose shards own equal
    ranges (as ``redis-cli --cluster create`` makes them) would still serve
    one partition too many on one master: the middles never do."""
    step = _SLOTS / count
    width = max(1, int(step / 16))
    first = int(key_slot(name.encode()) // step)
    streams = []
    for partition in range(count):
        target = round((first + partition + 0.5) * step - width / 2) % _SLOTS
        for attempt in itertools.count():
            candidate = _candidate(name, partition, attempt)
            if (key_slot(candidate.encode()) - target) % _SLOTS < width:
                streams.append(candidate)
                break
    return tuple(streams)


def split_id(message_id: str, count: int) -> tuple[int, str]:
    """``"<p>:<ms>-<seq>"`` into partition and entry id (checked)."""
    head, sep, entry_id = message_id.partition(":")
    if not sep or not head.isdigit() or not entry_id:
        raise ConfigurationError(
            f"message id {message_id!r} of a topic with {count} partitions must look like "
            "'<partition>:<ms>-<seq>'"
        )
    partition = int(head)
    if partition >= count:
        raise ConfigurationError(
            f"message id {message_id!r} names partition {partition}; the topic has {count}"
        )
    return partition, entry_id


def join_id(partition: int, entry_id: str) -> str:
    return f"{partition}:{entry_id}"


def check_partitions(partitions: object) -> int | None:
    if partitions is None:
        return None
    if (
        not isinstance(partitions, int)
        or isinstance(partitions, bool)
        or not 1 <= partitions <= MAX_PARTITIONS
    ):
        raise ConfigurationError(
            f"partitions must be None or an int from 1 to {MAX_PARTITIONS}, got {partitions!r}"
        )
    return partitions


# Read the stored layout, or store ours when there is none. KEYS: meta hash,
# the topic's own stream. ARGV: wanted count ('' = only read), streams JSON,
# format. Returns {count, streams JSON, state}; count '1' with no streams for
# an unpartitioned topic (no meta; a plain stream may exist).
LAYOUT_SCRIPT = """
local stored = redis.call('HMGET', KEYS[1], 'partitions', 'streams', 'state')
if stored[1] then
    return {stored[1], stored[2], stored[3] or 'active'}
end
local wanted = tonumber(ARGV[1])
if wanted == nil or wanted == 1 then
    return {'1', '', 'active'}
end
if redis.call('EXISTS', KEYS[2]) == 1 then
    return {'1', '', 'plain'}
end
redis.call('HSET', KEYS[1], 'partitions', ARGV[1], 'streams', ARGV[2], 'hash', 'crc32',
           'state', 'active', 'version', ARGV[3])
return {ARGV[1], ARGV[2], 'active'}
"""

_scripts: weakref.WeakKeyDictionary[object, AsyncScript] = weakref.WeakKeyDictionary()
_cache: weakref.WeakKeyDictionary[object, dict[str, tuple[float, Layout | None]]] = (
    weakref.WeakKeyDictionary()
)


def forget(redis: AnyRedis, name: str) -> None:
    """Drop what this process remembers of a topic's layout (after terminate)."""
    cached = _cache.get(redis)
    if cached is not None:
        cached.pop(name, None)


async def load_layout(redis: AnyRedis, name: str, partitions: int | None) -> Layout | None:
    """The topic's layout (None: unpartitioned), created when ``partitions`` > 1
    and none is stored. Raises :class:`PartitionCountError` when the stored
    count is not ``partitions``."""
    now = time.monotonic()
    cached = _cache.setdefault(redis, {})
    hit = cached.get(name)
    if hit is not None and hit[0] > now:
        layout = hit[1]
    else:
        layout = await _read_or_create(redis, name, partitions)
        cached[name] = (now + LAYOUT_CACHE_SECONDS, layout)
    stored = 1 if layout is None else layout.count
    if partitions is not None and stored != partitions:
        if layout is None and partitions > 1 and hit is not None:
            cached.pop(name, None)  # cached "plain" may predate the meta: read again
            return await load_layout(redis, name, partitions)
        raise PartitionCountError(name, stored, partitions)
    return layout


async def _read_or_create(redis: AnyRedis, name: str, partitions: int | None) -> Layout | None:
    keys = TopicKeys(name)
    if partitions is None or partitions == 1:
        # Only reading: one plain HMGET (what most topics, unpartitioned, cost).
        stored = await redis.hmget(keys.meta, ["partitions", "streams", "state"])
        if stored[0] is None:
            return None
        return _layout(name, keys, [stored[0], stored[1], stored[2] or b"active"])
    script = _scripts.get(redis)
    if script is None:
        script = _scripts[redis] = redis.register_script(LAYOUT_SCRIPT)
    streams = spread_streams(name, partitions) if partitions and partitions > 1 else ()
    reply = await script(
        keys=[keys.meta, keys.stream],
        args=["" if partitions is None else str(partitions), json.dumps(list(streams)), FORMAT],
    )
    return _layout(name, keys, reply, partitions)


def _layout(
    name: str, keys: TopicKeys, reply: list[Any], requested: int | None = None
) -> Layout | None:
    count_raw, streams_raw, state_raw = (
        x.decode() if isinstance(x, bytes) else str(x) for x in reply
    )
    count = int(count_raw)
    if count <= 1:
        if state_raw == "plain":
            raise PartitionCountError(name, 1, requested or 1, plain=True)
        return None
    stored = tuple(json.loads(streams_raw))
    if len(stored) != count:
        raise ConfigurationError(f"topic {name!r}: meta hash {keys.meta!r} is inconsistent")
    return Layout(name, stored, state_raw)
