"""What :class:`Topic` does for a partitioned topic: route, then fan out.

Every partition stream is a complete topic of its own, so each operation here
is the single-stream operation on one partition (a keyed publish, a stop of
``"<p>:<id>"``) or on all of them, merged (info, dead letters, cleanup,
terminate). Ids crossing this boundary gain or lose their ``"<p>:"`` prefix.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import msgspec

from . import _control
from ._config import CleanupPolicy
from ._info import id_key
from ._keys import check_name
from ._partitions import Layout, forget, join_id, partition_for, split_id
from ._redis import AnyRedis, as_str
from .errors import ConfigurationError

if TYPE_CHECKING:
    from ._message import DeadLetter, TopicInfo
    from ._topic import PublishItem, Topic

__all__ = ["Partitioned"]


class Partitioned:
    """The partitions of one topic, each a plain :class:`Topic`."""

    __slots__ = ("_next", "layout", "parts", "topic")

    def __init__(self, topic: Topic, layout: Layout) -> None:
        self.topic = topic
        self.layout = layout
        self.parts: list[Topic] = [topic._partition(stream) for stream in layout.streams]
        # Keyless messages go round-robin from a random start, so that many
        # short-lived producers do not all fill partition 0 first.
        self._next = random.randrange(layout.count)

    @property
    def count(self) -> int:
        return self.layout.count

    def route(self, key: str | None) -> int:
        if key is None:
            self._next = partition = (self._next + 1) % self.layout.count
            return partition
        return partition_for(key, self.layout.count)

    def _part(self, message_id: str) -> tuple[Topic, str]:
        partition, entry_id = split_id(message_id, self.layout.count)
        return self.parts[partition], entry_id

    # -- publishing -----------------------------------------------------
    async def publish(
        self,
        message_type: str,
        data: Any,
        metadata: Mapping[str, str] | None,
        key: str | None,
        maxlen: int | None,
        idempotency_key: str | None,
        delay: float | None,
        at: datetime | float | None,
    ) -> str:
        # An idempotent publish repeated must land where the first one did.
        partition = self.route(key if key is not None else idempotency_key)
        part = self.parts[partition]
        entry_id = await part._publish(
            message_type, data, metadata, maxlen, idempotency_key, delay, at, key
        )
        return join_id(partition, entry_id)

    async def publish_many(
        self,
        items: Sequence[PublishItem],
        keys: Sequence[str | None] | None,
        maxlen: int | None,
        delay: float | None,
        at: datetime | float | None,
    ) -> list[str]:
        """Items grouped by partition, the groups sent concurrently (each
        partition is one stream, possibly on another node); ids in input order."""
        groups: dict[int, list[int]] = {}
        for index, item in enumerate(items):
            key = keys[index] if keys is not None else None
            if key is None and isinstance(item, tuple | list) and len(item) > 3:
                key = item[3]  # its idempotency key: a repeat lands where it did
            groups.setdefault(self.route(key), []).append(index)
        ids: list[str] = [""] * len(items)

        async def send(partition: int, indexes: list[int]) -> None:
            part_keys = [keys[i] for i in indexes] if keys is not None else None
            sent = await self.parts[partition]._publish_many(
                [items[i] for i in indexes], maxlen, delay, at, part_keys
            )
            for index, entry_id in zip(indexes, sent, strict=True):
                ids[index] = join_id(partition, entry_id)

        if len(groups) == 1:
            ((partition, indexes),) = groups.items()
            await send(partition, indexes)
            return ids
        async with _fan_out() as tg:
            for partition, indexes in groups.items():
                tg.start_soon(send, partition, indexes)
        return ids

    # -- administration -------------------------------------------------
    async def info(self) -> TopicInfo:
        from ._message import GroupInfo, PartitionInfo, TopicInfo

        infos: list[TopicInfo | None] = [None] * self.count
        owners: list[dict[str, str]] = [{}] * self.count
        redis = self.topic.redis

        async def one(partition: int) -> None:
            part = self.parts[partition]
            infos[partition] = await part.info()
            raw = await redis.hgetall(part.keys.owners)
            owners[partition] = {
                as_str(k)[2:]: _holder(as_str(v))
                for k, v in raw.items()
                if as_str(k).startswith("h:")
            }

        async with _fan_out() as tg:
            for partition in range(self.count):
                tg.start_soon(one, partition)
        rows: list[PartitionInfo] = []
        groups: dict[str, dict[str, Any]] = {}
        stopped: list[str] = []
        length = dead = scheduled = 0
        firsts: list[str] = []
        lasts: list[str] = []
        for partition, info in enumerate(infos):
            assert info is not None
            length += info.length
            dead += info.dead_letters
            scheduled += info.scheduled
            stopped += [join_id(partition, s) for s in info.stopped]
            if info.first_id is not None:
                firsts.append(join_id(partition, info.first_id))
            if info.last_id is not None:
                lasts.append(join_id(partition, info.last_id))
            for group in info.groups:
                merged = groups.setdefault(
                    group.name, {"consumers": set(), "pending": 0, "lag": 0, "last": []}
                )
                merged["consumers"].add(owners[partition].get(group.name, ""))
                merged["pending"] += group.pending
                if merged["lag"] is not None:
                    merged["lag"] = None if group.lag is None else merged["lag"] + group.lag
                merged["last"].append(join_id(partition, group.last_delivered_id))
            rows.append(
                PartitionInfo(
                    partition=partition,
                    stream=self.layout.streams[partition],
                    node=_node(redis, self.layout.streams[partition]),
                    length=info.length,
                    owners=owners[partition],
                    groups=info.groups,
                    stopped=len(info.stopped),
                    dead_letters=info.dead_letters,
                )
            )
        return TopicInfo(
            length=length,
            first_id=min(firsts, key=_time_key) if firsts else None,
            last_id=max(lasts, key=_time_key) if lasts else None,
            groups=[
                GroupInfo(
                    name=name,
                    consumers=len(merged["consumers"] - {""}),
                    pending=merged["pending"],
                    lag=merged["lag"],
                    last_delivered_id=max(merged["last"], key=_time_key),
                )
                for name, merged in sorted(groups.items())
            ],
            stopped=sorted(stopped, key=_time_key),
            dead_letters=dead,
            scheduled=scheduled,
            partitions=rows,
        )

    async def stop_message(self, message_id: str) -> None:
        part, entry_id = self._part(message_id)
        await part.stop_message(entry_id)

    async def resume_message(self, message_id: str) -> None:
        part, entry_id = self._part(message_id)
        await part.resume_message(entry_id)

    async def cancel_scheduled(self, schedule_id: str) -> bool:
        part, inner = self._part(schedule_id)
        return await part.cancel_scheduled(inner)

    async def terminate(self) -> None:
        """Idempotent fan-out: mark the topic terminating (a rerun after a
        crash halfway finds the layout still stored and finishes), terminate
        every partition (each announces it to its consumers), then delete the
        topic's own keys, the layout last of all."""
        topic = self.topic
        redis = topic.redis
        await redis.hset(topic.keys.meta, "state", "terminating")
        async with _fan_out() as tg:
            for part in self.parts:
                tg.start_soon(part.terminate)
        await _control.terminate(redis, topic.keys)
        forget(redis, topic.name)

    async def cleanup(
        self, policy: CleanupPolicy | None, on_progress: Callable[[int], None] | None
    ) -> int:
        removed = 0
        for part in self.parts:
            removed += await part.cleanup(policy, on_progress=on_progress)
        return removed

    # -- dead letters ---------------------------------------------------
    async def dead_letters(self, count: int, start: str) -> list[DeadLetter]:
        """The oldest ``count`` over all partitions, merged by time. ``start``
        is ``"-"`` or a dead-letter id with or without its ``"<p>:"`` (its
        time part bounds every partition: the page after a merged page)."""
        exclusive = start.startswith("(")
        bare = start[1:] if exclusive else start
        if bare != "-" and ":" in bare:
            bare = split_id(bare, self.count)[1]
        inner_start = ("(" if exclusive else "") + bare
        pages: list[list[DeadLetter]] = [[] for _ in range(self.count)]

        async def one(partition: int) -> None:
            pages[partition] = await self.parts[partition].dead_letters(count, start=inner_start)

        async with _fan_out() as tg:
            for partition in range(self.count):
                tg.start_soon(one, partition)
        merged = [
            msgspec.structs.replace(
                letter,
                id=join_id(partition, letter.id),
                original_id=join_id(partition, letter.original_id),
                partition=partition,
            )
            for partition, page in enumerate(pages)
            for letter in page
        ]
        merged.sort(key=lambda letter: (_time_key(letter.id), letter.partition or 0))
        return merged[:count]

    def _by_partition(self, ids: Iterable[str]) -> dict[int, list[str]]:
        grouped: dict[int, list[str]] = {}
        for message_id in ids:
            partition, entry_id = split_id(message_id, self.count)
            grouped.setdefault(partition, []).append(entry_id)
        return grouped

    async def replay_dead_letters(self, ids: list[str] | None, count: int) -> list[str]:
        if ids is None:
            ids = [letter.id for letter in await self.dead_letters(count, "-")]
        replayed: list[str] = []
        for partition, entry_ids in self._by_partition(ids).items():
            new = await self.parts[partition].replay_dead_letters(entry_ids)
            replayed += [join_id(partition, entry_id) for entry_id in new]
        return replayed

    async def delete_dead_letters(self, ids: list[str]) -> int:
        deleted = 0
        for partition, entry_ids in self._by_partition(ids).items():
            deleted += await self.parts[partition].delete_dead_letters(entry_ids)
        return deleted


@contextlib.asynccontextmanager
async def _fan_out() -> AsyncIterator[anyio.abc.TaskGroup]:
    """A task group over partitions that fails with the first error of its
    tasks, not the ExceptionGroup anyio wraps it in: callers catch
    ``RedisError`` (and retry) exactly as for a plain topic."""
    try:
        async with anyio.create_task_group() as tg:
            yield tg
    except Exception as exc:
        first: BaseException = exc
        while isinstance(inner := getattr(first, "exceptions", None), tuple) and inner:
            first = inner[0]
        if first is exc:
            raise
        raise first from exc


def _holder(value: str) -> str:
    """An owner hash value (``name#incarnation`` or ``released:name``) as a
    consumer name; "" for a released partition."""
    if value.startswith("released:"):
        return ""
    return value.rpartition("#")[0] or value


def _time_key(message_id: str) -> tuple[int, int, int]:
    partition, _, entry_id = message_id.partition(":")
    return (*id_key(entry_id), int(partition))


def _node(redis: AnyRedis, stream: str) -> str | None:
    """``host:port`` of the node serving ``stream`` on a cluster client."""
    get_node = getattr(redis, "get_node_from_key", None)
    if get_node is None:
        return None
    try:
        node = get_node(stream)
    except Exception:  # a slot not yet known: no node to show
        return None
    return None if node is None else f"{node.host}:{node.port}"


def check_keys(keys: object, items: Sequence[Any]) -> list[str | None] | None:
    if keys is None:
        return None
    if isinstance(keys, str | bytes) or not isinstance(keys, Iterable):
        raise ConfigurationError("publish_many keys must be a list of str or None, one per item")
    checked = list(keys)
    if len(checked) != len(items):
        raise ConfigurationError(
            f"publish_many got {len(checked)} keys for {len(items)} items: give one per item"
        )
    return [
        None if key is None else check_name(key, f"publish_many keys[{index}]")
        for index, key in enumerate(checked)
    ]
