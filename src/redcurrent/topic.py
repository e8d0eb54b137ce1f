"""Topic: the producer's and the operator's view of one stream."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from . import _dead, _info, cleanup, control
from ._errors import denials_explained
from ._redis import AnyRedis, as_str
from ._scripts import PUBLISH_MANY
from .cleanup import CleanupPolicy
from .codec import check_message_type, encode_data, encode_fields, encode_metadata
from .errors import ConfigurationError
from .keys import TopicKeys
from .message import DeadLetter, TopicInfo

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = ["PublishItem", "Topic"]

PublishItem = tuple[str, Any] | tuple[str, Any, Mapping[str, str] | None]

#: The most messages :meth:`Topic.publish_many` appends in one round trip.
PUBLISH_CHUNK = 1000
#: A chunk is also sent once its payloads (data and metadata) reach this many bytes.
PUBLISH_CHUNK_BYTES = 4 * 1024 * 1024


class Topic:
    """Publish to a stream and administer it (info, stop/resume, terminate, cleanup).

    A ``Topic`` holds no state but names: create one wherever it is handy.
    Any client works, also one created with ``decode_responses=True``
    (standalone or cluster): replies that carry entry fields (:meth:`info`,
    :meth:`dead_letters`) are read as bytes on the client's own connections,
    so entries that are not UTF-8, the usual dead letters, never break them.
    A key, command or channel the client's ACL user may not use raises
    :class:`~redcurrent.AccessDeniedError` (Redis's refusal is its ``__cause__``).
    """

    def __init__(self, redis: AnyRedis, name: str) -> None:
        if not name:
            raise ConfigurationError("a topic needs a non-empty stream name")
        self._redis = redis
        self.name = name
        self.keys = TopicKeys(name)
        self._publish_script: AsyncScript | None = None

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
        return ("XADD", self.name, "MAXLEN", "~", _check_maxlen(maxlen), "*", *fields)

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
        check_message_type(type)
        args = self._xadd_args(type, data, metadata, maxlen)
        with self._denials("XADD"):
            entry_id = await self._redis.execute_command(*args)
        return as_str(entry_id)

    async def publish_many(
        self, items: Iterable[PublishItem], *, maxlen: int | None = None
    ) -> list[str]:
        """Append many messages in chunks; returns their ids in order.

        Items are ``(type, data)`` or ``(type, data, metadata)``. Each chunk
        (up to :data:`PUBLISH_CHUNK` messages or about
        :data:`PUBLISH_CHUNK_BYTES` of payload) is one script call that appends
        its messages in order, so a chunk is written whole or, if the server
        fails it midway, up to the failing entry. Chunks are not one
        transaction: if a later chunk fails, the ids of the earlier ones are
        lost to the caller while their entries stay. An invalid item raises
        before its chunk is sent.
        """
        head = b"" if maxlen is None else str(_check_maxlen(maxlen)).encode()
        ids: list[str] = []
        args: list[Any] = [head]
        size = 0
        limit = 1 + 3 * PUBLISH_CHUNK
        for item in items:
            if len(item) == 2:
                type, data = item
                metadata = None
            elif len(item) == 3:
                type, data, metadata = item
            else:
                raise ConfigurationError(
                    f"publish_many items are (type, data) or (type, data, metadata), got {item!r}"
                )
            if type.__class__ is not str or not type:
                check_message_type(type)
            body = encode_data(data)
            meta = encode_metadata(metadata)
            args += (type, body, meta)
            size += len(body) + len(meta)
            if len(args) >= limit or size >= PUBLISH_CHUNK_BYTES:
                ids += await self._send(args)
                args = [head]
                size = 0
        if len(args) > 1:
            ids += await self._send(args)
        return ids

    async def _send(self, args: list[Any]) -> list[str]:
        script = self._publish_script
        if script is None:
            script = self._publish_script = self._redis.register_script(PUBLISH_MANY)
        with self._denials("publish_many"):
            reply: list[bytes | str] = await script(keys=[self.name], args=args)
        return [
            entry_id.decode() if entry_id.__class__ is bytes else str(entry_id)
            for entry_id in reply
        ]

    # -- administration -------------------------------------------------
    async def info(self) -> TopicInfo:
        """Length, ends, groups with pending and lag, stopped ids, dead letters."""
        with self._denials("info"):
            return await _info.topic_info(self)

    async def stop_message(self, message_id: str) -> None:
        """Stop one message for every consumer of every group, until resumed."""
        with self._denials("stop_message"):
            await control.stop_message(self, message_id)

    async def resume_message(self, message_id: str) -> None:
        """Let a stopped message be handled again, promptly."""
        with self._denials("resume_message"):
            await control.resume_message(self, message_id)

    async def terminate(self) -> None:
        """Delete the stream, its groups and every key of the topic; stop consumers."""
        with self._denials("terminate"):
            await control.terminate(self)

    async def cleanup(self, policy: CleanupPolicy | None = None) -> int:
        """Remove entries every group has acknowledged; returns how many went.

        The same run drops stopped ids whose entries are gone for good and,
        with ``policy.dead_letter_retention``, old dead letters (neither is
        counted in the result). See :func:`redcurrent.cleanup.cleanup`.
        """
        with self._denials("cleanup"):
            return await cleanup.cleanup(self, policy)

    async def dead_letters(self, count: int = 100, *, start: str = "-") -> list[DeadLetter]:
        """The oldest ``count`` dead letters from ``start`` on."""
        with self._denials("dead_letters"):
            return await _dead.read_dead_letters(self, count, start=start)

    async def replay_dead_letters(
        self, ids: Iterable[str] | None = None, *, count: int = 100
    ) -> list[str]:
        """Put dead letters back on the stream (new ids) and remove them from
        the dead-letter stream; returns the new ids. ``ids`` selects dead-letter
        ids, otherwise the oldest ``count`` are replayed."""
        with self._denials("replay_dead_letters"):
            return await _dead.replay_dead_letters(self, ids, count=count)

    def _denials(self, what: str) -> AbstractContextManager[None]:
        """A refused key, command or channel as :class:`AccessDeniedError`."""
        return denials_explained(f"{what} on stream {self.name!r}")


def _check_maxlen(maxlen: int) -> int:
    if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 0:
        raise ConfigurationError(f"maxlen must be an int >= 0 or None, got {maxlen!r}")
    return maxlen
