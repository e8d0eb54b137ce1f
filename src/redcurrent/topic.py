"""Topic: the producer's and the operator's view of one stream."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._redis import AnyRedis, as_str
from .codec import encode_fields
from .errors import ConfigurationError
from .keys import TopicKeys
from .message import DeadLetter, TopicInfo

if TYPE_CHECKING:
    from .cleanup import CleanupPolicy

__all__ = ["PublishItem", "Topic"]

PublishItem = tuple[str, Any] | tuple[str, Any, Mapping[str, str] | None]

#: How many XADDs go into one pipeline round trip in :meth:`Topic.publish_many`.
PUBLISH_CHUNK = 500


class Topic:
    """Publish to a stream and administer it (info, stop/resume, terminate, cleanup).

    A ``Topic`` holds no state but names: create one wherever it is handy.
    """

    def __init__(self, redis: AnyRedis, name: str) -> None:
        if not name:
            raise ConfigurationError("a topic needs a non-empty stream name")
        self._redis = redis
        self.name = name
        self.keys = TopicKeys(name)

    @property
    def redis(self) -> AnyRedis:
        return self._redis

    def __repr__(self) -> str:
        return f"Topic({self.name!r})"

    def _xadd_args(
        self, type: str, data: Any, metadata: Mapping[str, str] | None, maxlen: int | None
    ) -> tuple[Any, ...]:
        fields = encode_fields(type, data, metadata)
        if maxlen is None:
            return ("XADD", self.name, "*", *fields)
        return ("XADD", self.name, "MAXLEN", "~", maxlen, "*", *fields)

    async def publish(
        self,
        type: str,
        data: Any = None,
        metadata: Mapping[str, str] | None = None,
        *,
        maxlen: int | None = None,
    ) -> str:
        """Append one message; returns its entry id.

        ``maxlen`` caps the stream approximately (``XADD MAXLEN ~``). That cap
        does not care whether entries were processed: it can drop messages no
        group has handled yet. Prefer :meth:`cleanup`, which removes only what
        every group acknowledged.
        """
        _check_type(type)
        entry_id = await self._redis.execute_command(*self._xadd_args(type, data, metadata, maxlen))
        return as_str(entry_id)

    async def publish_many(
        self, items: Iterable[PublishItem], *, maxlen: int | None = None
    ) -> list[str]:
        """Append many messages, pipelined in chunks; returns their ids in order.

        Items are ``(type, data)`` or ``(type, data, metadata)``. Each chunk is
        one round trip but not a transaction: if a later chunk fails, the ids
        of the earlier ones are lost to the caller while their entries stay.
        """
        ids: list[str] = []
        chunk: list[tuple[Any, ...]] = []
        for item in items:
            if len(item) == 2:
                type, data = item
                metadata = None
            else:
                type, data, metadata = item
            _check_type(type)
            chunk.append(self._xadd_args(type, data, metadata, maxlen))
            if len(chunk) >= PUBLISH_CHUNK:
                ids.extend(await self._send(chunk))
                chunk = []
        if chunk:
            ids.extend(await self._send(chunk))
        return ids

    async def _send(self, commands: Sequence[tuple[Any, ...]]) -> list[str]:
        pipe = self._redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return [as_str(entry_id) for entry_id in await pipe.execute()]

    # -- administration -------------------------------------------------
    async def info(self) -> TopicInfo:
        """Length, ends, groups with pending and lag, stopped ids, dead letters."""
        from ._info import topic_info

        return await topic_info(self)

    async def stop_message(self, message_id: str) -> None:
        """Stop one message for every consumer of every group, until resumed."""
        from .control import stop_message

        await stop_message(self, message_id)

    async def resume_message(self, message_id: str) -> None:
        """Let a stopped message be handled again, promptly."""
        from .control import resume_message

        await resume_message(self, message_id)

    async def terminate(self) -> None:
        """Delete the stream, its groups and every key of the topic; stop consumers."""
        from .control import terminate

        await terminate(self)

    async def cleanup(self, policy: CleanupPolicy | None = None) -> int:
        """Remove entries every group has acknowledged; returns how many went."""
        from .cleanup import cleanup

        return await cleanup(self, policy)

    async def dead_letters(self, count: int = 100, *, start: str = "-") -> list[DeadLetter]:
        """The oldest ``count`` dead letters from ``start`` on."""
        from ._dead import read_dead_letters

        return await read_dead_letters(self, count, start=start)

    async def replay_dead_letters(
        self, ids: Iterable[str] | None = None, *, count: int = 100
    ) -> list[str]:
        """Put dead letters back on the stream (new ids) and remove them from
        the dead-letter stream; returns the new ids. ``ids`` selects dead-letter
        ids, otherwise the oldest ``count`` are replayed."""
        from ._dead import replay_dead_letters

        return await replay_dead_letters(self, ids, count=count)


def _check_type(type: str) -> None:
    if not isinstance(type, str) or not type:
        raise ConfigurationError(f"message type must be a non-empty str, got {type!r}")
