"""Topic: the producer's and the operator's view of one stream."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from . import _cleanup, _cluster_ask, _control, _dead, _info, _schedule
from ._codec import ENCODE_FAILURES, check_message_type, data_error, encode_data, encode_metadata
from ._config import CleanupPolicy
from ._faults import denials_explained
from ._idempotency import DEFAULT_IDEMPOTENCY_WINDOW, IdempotentSender, check_key, check_window
from ._ids import normalize_id
from ._instrument import PUBLISH_OBSERVERS, PublishObservation
from ._keys import TopicKeys, check_name
from ._limits import DEFAULT_MAX_PAYLOAD_BYTES, FIELD_NAME_BYTES, check_limit
from ._message import DeadLetter, TopicInfo
from ._partitioned_topic import Partitioned, check_keys
from ._partitions import LAYOUT_CACHE_SECONDS, check_partitions, load_layout
from ._redis import AnyRedis, PackedStream, as_str, check_client
from ._scripts import PUBLISH_MANY, PUBLISH_MANY_KEYED
from .errors import ConfigurationError, EncodeError, PayloadTooLargeError

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = ["PublishItem", "Topic"]

PublishItem = (
    tuple[str, Any]
    | tuple[str, Any, Mapping[str, str] | None]
    | tuple[str, Any, Mapping[str, str] | None, str | None]
)

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

    ``name`` is any non-empty str: braces, spaces, newlines and any Unicode
    are fine (every key of the topic stays in the stream's cluster slot).
    ``max_payload_bytes`` (8 MiB; ``None``: no limit) caps what one message
    may weigh, counted as the bytes of its field names and values as stored
    (``type``, ``data``, ``metadata``): a heavier one raises
    :class:`~redcurrent.PayloadTooLargeError` before anything is sent.
    Consumers weigh what they read the same way
    (``StreamConsumer(max_payload_bytes=...)``).

    ``idempotency_window`` (seconds, 24 h) is how long a publish with an
    ``idempotency_key`` is remembered (see :meth:`publish`).

    ``partitions`` spreads the topic over that many streams (a Redis Cluster
    puts them on different shards; see "Partitioned topics" in the README).
    The count is stored with the topic when it is first used and is fixed:
    ``None`` (the default) takes the stored count, else 1; another count than
    the stored one raises :class:`~redcurrent.PartitionCountError` on first
    use. 1 is the plain single stream.

    Every method checks its arguments before touching Redis and answers a
    bad one with a :class:`~redcurrent.ConfigurationError` naming it (its
    subclasses :class:`~redcurrent.EncodeError` for data or metadata that
    cannot be encoded, :class:`~redcurrent.PayloadTooLargeError`).
    """

    def __init__(
        self,
        redis: AnyRedis,
        name: str,
        *,
        max_payload_bytes: int | None = DEFAULT_MAX_PAYLOAD_BYTES,
        idempotency_window: float = DEFAULT_IDEMPOTENCY_WINDOW,
        partitions: int | None = None,
    ) -> None:
        name = check_name(name, "a topic's stream name")
        self._partitions = check_partitions(partitions)
        #: (valid until, the partitions or None for a plain topic); None: unread.
        self._layout: tuple[float, Partitioned | None] | None = None
        self._redis = check_client(redis, "Topic")
        self.name: str = name
        self.keys: TopicKeys = TopicKeys(name)
        self.max_payload_bytes: int | None = check_limit(max_payload_bytes)
        self._publish_script: AsyncScript | None = None
        self._keyed_script: AsyncScript | None = None
        window_ms = check_window(idempotency_window)
        self.idempotency_window: float = idempotency_window
        self._idempotent = IdempotentSender(self._redis, self.keys, window_ms)

    def _partition(self, stream: str) -> Topic:
        """One partition of this topic, as the plain topic it is."""
        part = Topic(
            self._redis,
            stream,
            max_payload_bytes=self.max_payload_bytes,
            idempotency_window=self.idempotency_window,
        )
        part._layout = (float("inf"), None)
        return part

    def _known_plain(self) -> bool:
        """A plain topic, as read within the last few seconds: the hot path of
        publishing needs no await to know it."""
        memo = self._layout
        return memo is not None and memo[1] is None and memo[0] > time.monotonic()

    async def _partitioned(self) -> Partitioned | None:
        """The partitions, or None for a plain topic (read from Redis at most
        every few seconds; see ``_partitions``)."""
        memo = self._layout
        if memo is not None and memo[0] > time.monotonic():
            return memo[1]
        with self._denials("reading the topic's layout"):
            layout = await load_layout(self._redis, self.name, self._partitions)
        current = memo[1] if memo is not None else None
        if layout is None:
            parted = None
        elif current is not None and current.layout.streams == layout.streams:
            parted = current  # keeps its round-robin position
        else:
            parted = Partitioned(self, layout)
        self._layout = (time.monotonic() + LAYOUT_CACHE_SECONDS, parted)
        return parted

    async def partition_streams(self) -> list[str]:
        """The stream of every partition, in order (``[name]`` for a plain
        topic); creates the layout when the topic was opened with
        ``partitions`` > 1 and none is stored yet."""
        parted = await self._partitioned()
        return [self.name] if parted is None else list(parted.layout.streams)

    @property
    def redis(self) -> AnyRedis:
        return self._redis

    def __repr__(self) -> str:
        return f"Topic({self.name!r})"

    def _entry(
        self, message_type: str, data: Any, metadata: Mapping[str, str] | None, index: int = -1
    ) -> tuple[bytes, bytes, bytes]:
        """The ``type``, ``data`` and ``metadata`` bytes of one message, checked
        (type, encoding, size) before anything is sent; errors name the
        ``index`` of a publish_many item."""
        if message_type.__class__ is not str or not message_type:
            try:
                check_message_type(message_type)  # a str subclass (a StrEnum) passes
            except ConfigurationError as exc:
                raise ConfigurationError(f"{_where(index)}{exc}") from None
        try:
            raw_type = message_type.encode()
        except UnicodeEncodeError as exc:
            raise ConfigurationError(
                f"{_where(index)}message type {message_type!r} cannot be encoded as UTF-8: "
                f"{exc.reason}"
            ) from None
        try:
            body = encode_data(data)
        except ENCODE_FAILURES as exc:
            raise EncodeError(f"{_where(index)}{data_error(data, exc)}") from exc
        try:
            meta = encode_metadata(metadata)
        except EncodeError as exc:
            raise EncodeError(f"{_where(index)}{exc}") from exc.__cause__
        limit = self.max_payload_bytes
        if limit is not None:
            size = FIELD_NAME_BYTES + len(raw_type) + len(body) + len(meta)
            if size > limit:
                what = f"{_where(index)}message of type {message_type!r}"
                raise PayloadTooLargeError(size, limit, what=what)
        return raw_type, body, meta

    def _xadd_args(
        self,
        message_type: str,
        data: Any,
        metadata: Mapping[str, str] | None,
        maxlen: int | None,
        key: str | None = None,
    ) -> tuple[Any, ...]:
        raw_type, body, meta = self._entry(message_type, data, metadata)
        fields: tuple[Any, ...] = ("type", raw_type, "data", body, "metadata", meta)
        if key is not None:
            fields += ("key", key)
        if maxlen is None:
            return ("XADD", self.name, "*", *fields)
        return ("XADD", self.name, "MAXLEN", "~", _check_maxlen(maxlen), "*", *fields)

    async def publish(
        self,
        message_type: str,
        data: Any = None,
        metadata: Mapping[str, str] | None = None,
        *,
        key: str | None = None,
        maxlen: int | None = None,
        idempotency_key: str | None = None,
        delay: float | None = None,
        at: datetime | float | None = None,
    ) -> str:
        """Append one message; returns its entry id.

        ``key`` (a non-empty str) is the message key: a consumer handles the
        messages of one key one at a time, in the order published (on a plain
        topic, competing consumers each keep that only for what they read),
        and on a partitioned topic it picks the partition (CRC-32 of the key modulo
        the count; keyless messages go round-robin). There the id is
        ``"<partition>:<entry id>"``. A key given with ``delay``, ``at`` or
        ``idempotency_key`` only picks the partition: such entries do not
        store it (no per-key order for them).

        With ``delay`` (seconds, counted on the Redis server's clock) or ``at``
        (an aware datetime or epoch seconds) the message is scheduled instead:
        a running consumer of any group moves it into the stream when due, and
        this returns its schedule id, for :meth:`cancel_scheduled` (the entry
        gets its stream id when it is moved). Not with ``maxlen`` or
        ``idempotency_key``. See "Delayed and scheduled messages" in the README.

        With ``idempotency_key`` (a non-empty str), a message published with
        the same key within ``idempotency_window`` is not appended again: the
        call returns the first one's id (one script checks, appends and
        remembers, atomically; concurrent publishes of one key append once).
        Such a publish is safe to repeat, so it retries transient faults
        (connection lost or timed out, ``LOADING``, ``READONLY``, failover)
        by itself, a few times within about 2 s. Without a key nothing is
        retried: a caller that retries after a lost reply may append the
        message twice (docs/guarantees.md, "What may be duplicated").

        ``maxlen`` caps the stream approximately (``XADD MAXLEN ~``). That cap
        does not care whether entries were processed: it can drop messages no
        group has handled yet. Prefer :meth:`cleanup`, which removes only what
        every group acknowledged.

        Raises before sending anything: :class:`ConfigurationError` for an
        empty or non-str ``message_type`` or a bad ``maxlen``, :class:`EncodeError`
        (also a TypeError) for ``data`` that is not JSON-serialisable or
        ``metadata`` that is not a mapping of str to str, and
        :class:`PayloadTooLargeError` above ``max_payload_bytes``.
        """
        if PUBLISH_OBSERVERS:
            scheduled = delay is not None or at is not None
            observations = _observe(self.name, message_type, 1, scheduled)
            try:
                metadata = _with_headers(metadata, observations)
                entry_id = await self._routed_publish(
                    message_type, data, metadata, maxlen, idempotency_key, delay, at, key
                )
            except BaseException as exc:
                _finish(observations, None, exc)
                raise
            _finish(observations, [entry_id], None)
            return entry_id
        return await self._routed_publish(
            message_type, data, metadata, maxlen, idempotency_key, delay, at, key
        )

    async def _routed_publish(
        self,
        message_type: str,
        data: Any,
        metadata: Mapping[str, str] | None,
        maxlen: int | None,
        idempotency_key: str | None,
        delay: float | None,
        at: datetime | float | None,
        key: str | None,
    ) -> str:
        if key is not None:
            key = check_name(key, "key")
        parted = None if self._known_plain() else await self._partitioned()
        if parted is not None:
            return await parted.publish(
                message_type, data, metadata, key, maxlen, idempotency_key, delay, at
            )
        return await self._publish(
            message_type, data, metadata, maxlen, idempotency_key, delay, at, key
        )

    async def _publish(
        self,
        message_type: str,
        data: Any,
        metadata: Mapping[str, str] | None,
        maxlen: int | None,
        idempotency_key: str | None,
        delay: float | None,
        at: datetime | float | None,
        key: str | None = None,
    ) -> str:
        if delay is not None or at is not None:
            when = _schedule.due_spec(delay, at)
            _immediate_only(maxlen=maxlen, idempotency_key=idempotency_key)
            with self._denials("publish (scheduled)"):
                entry = self._entry(message_type, data, metadata)
                return (await _schedule.schedule_entries(self._redis, self.keys, when, [entry]))[0]
        if idempotency_key is not None:
            entry = self._entry(message_type, data, metadata)
            key = check_key(idempotency_key)
            head = b"" if maxlen is None else str(_check_maxlen(maxlen)).encode()
            with self._denials("publish"):
                return (await self._idempotent.send(head, entry, [key]))[0]
        args = self._xadd_args(message_type, data, metadata, maxlen, key)
        with self._denials("XADD"):
            entry_id = await _cluster_ask.execute_command(self._redis, self.name, *args)
        return as_str(entry_id)

    async def publish_many(
        self,
        items: Iterable[PublishItem],
        *,
        keys: Sequence[str | None] | None = None,
        maxlen: int | None = None,
        delay: float | None = None,
        at: datetime | float | None = None,
    ) -> list[str]:
        """Append many messages in chunks; returns their ids in order.

        ``keys`` gives each item its message key (or None), as ``key`` does
        for :meth:`publish`: one per item. On a partitioned topic the items
        are grouped by partition and the groups sent concurrently; the
        chunk guarantees below then hold per partition.

        Items are ``(type, data)``, ``(type, data, metadata)`` or ``(type,
        data, metadata, idempotency_key)`` (the key may be None): a keyed item
        behaves as :meth:`publish` with that key, also against an earlier
        item of the same call. A chunk whose items all have keys retries
        transient faults as :meth:`publish` does. Each chunk
        (up to :data:`PUBLISH_CHUNK` messages or about
        :data:`PUBLISH_CHUNK_BYTES` of payload) is one script call that appends
        its messages in order, so a chunk is written whole or, if the server
        fails it midway, up to the failing entry. Chunks are not one
        transaction: if a later chunk fails, the ids of the earlier ones are
        lost to the caller while their entries stay (and, on a single server,
        where each chunk is sent while the server still runs the one before,
        so may the entries of the chunk sent right after it). An invalid item (any
        error of :meth:`publish`, naming the item's index, or an item that is
        not such a tuple) raises before its chunk is sent: when all items fit
        in one chunk, nothing is sent.

        ``delay`` or ``at`` schedules every item for the same time, as
        :meth:`publish` does: the ids are schedule ids, in order, and the
        messages enter the stream in this order. Items then carry no
        idempotency key.
        """
        if keys is not None or not self._known_plain():
            checked = None
            if keys is not None:  # checked before anything is sent or read
                items = items if isinstance(items, list | tuple) else list(_iterate(items))
                checked = check_keys(keys, items)
            parted = await self._partitioned()
            if parted is not None:
                # Routed by partition: the whole list at once. A plain topic
                # streams a lazy iterable chunk by chunk instead.
                listed = items if isinstance(items, list | tuple) else list(_iterate(items))
                if PUBLISH_OBSERVERS:
                    return await self._observed_publish_many(
                        listed, maxlen, delay, at, checked, parted
                    )
                return await parted.publish_many(listed, checked, maxlen, delay, at)
            keys = checked
        if PUBLISH_OBSERVERS:
            return await self._observed_publish_many(items, maxlen, delay, at, keys)
        return await self._publish_many(items, maxlen, delay, at, keys)

    async def _observed_publish_many(
        self,
        items: Iterable[PublishItem],
        maxlen: int | None,
        delay: float | None,
        at: datetime | float | None,
        keys: Sequence[str | None] | None,
        parted: Partitioned | None = None,
    ) -> list[str]:
        unpacked = [_unpack(item, index) for index, item in enumerate(_iterate(items))]
        types = {item[0] for item in unpacked}
        only = next(iter(types)) if len(types) == 1 else None
        scheduled = delay is not None or at is not None
        observations = _observe(self.name, only, len(unpacked), scheduled)
        try:
            tagged: list[PublishItem] = [
                (t, d, _with_headers(m, observations), k) for t, d, m, k in unpacked
            ]
            if parted is not None:
                ids = await parted.publish_many(tagged, keys, maxlen, delay, at)
            else:
                ids = await self._publish_many(tagged, maxlen, delay, at, keys)
        except BaseException as exc:
            _finish(observations, None, exc)
            raise
        _finish(observations, ids, None)
        return ids

    async def _publish_many(
        self,
        items: Iterable[PublishItem],
        maxlen: int | None,
        delay: float | None,
        at: datetime | float | None,
        message_keys: Sequence[str | None] | None = None,
    ) -> list[str]:
        if delay is not None or at is not None:
            when = _schedule.due_spec(delay, at)
            _immediate_only(maxlen=maxlen)
            entries = self._scheduled_entries(items)
            with self._denials("publish_many (scheduled)"):
                return await _schedule.schedule_entries(self._redis, self.keys, when, entries)
        head = b"" if maxlen is None else str(_check_maxlen(maxlen)).encode()
        if message_keys is not None and any(k is not None for k in message_keys):
            return await self._publish_many_keyed(items, head, message_keys)
        iterator = _iterate(items)
        ids: list[str] = []
        args: list[Any] = [head]
        keys: list[str | None] = []
        keyed = False
        size = 0
        limit = 1 + 3 * PUBLISH_CHUNK
        entry = self._entry
        sender = _ChunkSender(self)
        try:
            for index, item in enumerate(iterator):
                message_type, data, metadata, key = _unpack(item, index)
                raw_type, body, meta = entry(message_type, data, metadata, index)
                if key is not None:
                    key = check_key(key, _where(index))
                    keyed = True
                args += (raw_type, body, meta)
                keys.append(key)
                size += len(body) + len(meta)
                if len(args) >= limit or size >= PUBLISH_CHUNK_BYTES:
                    ids += await sender.send(args, keys, keyed)
                    args = [head]
                    keys = []
                    keyed = False
                    size = 0
            if len(args) > 1:
                ids += await sender.send(args, keys, keyed)
            ids += await sender.finish()
        except BaseException:
            # Chunks already sent are written (their ids are lost to the caller,
            # as documented); wait for them rather than leave them unread.
            await sender.abandon()
            raise
        return ids

    async def _publish_many_keyed(
        self, items: Iterable[PublishItem], head: bytes, message_keys: Sequence[str | None]
    ) -> list[str]:
        """``publish_many`` storing message keys: items with an idempotency key
        go as :meth:`publish` would (their message key only routes them)."""
        ids: list[str] = []
        args: list[Any] = [head]
        size = 0
        limit = 1 + 4 * PUBLISH_CHUNK
        for index, item in enumerate(_iterate(items)):
            message_type, data, metadata, idem = _unpack(item, index)
            if idem is not None:
                ids += await self._send_keyed(args)
                args, size = [head], 0
                maxlen = None if not head else int(head)
                ids.append(
                    await self._publish(message_type, data, metadata, maxlen, idem, None, None)
                )
                continue
            raw_type, body, meta = self._entry(message_type, data, metadata, index)
            args += (raw_type, body, meta, message_keys[index] or b"")
            size += len(body) + len(meta)
            if len(args) >= limit or size >= PUBLISH_CHUNK_BYTES:
                ids += await self._send_keyed(args)
                args, size = [head], 0
        ids += await self._send_keyed(args)
        return ids

    async def _send_keyed(self, args: list[Any]) -> list[str]:
        if len(args) <= 1:
            return []
        script = self._keyed_script
        if script is None:
            script = self._keyed_script = self._redis.register_script(PUBLISH_MANY_KEYED)
        with self._denials("publish_many"):
            reply: list[bytes | str] = await _cluster_ask.run_script(
                self._redis, script, [self.name], args
            )
        return [as_str(entry_id) for entry_id in reply]

    def _scheduled_entries(self, items: Iterable[Any]) -> Iterator[tuple[bytes, bytes, bytes]]:
        """``publish_many`` items checked and encoded one by one, for scheduling
        (which takes no idempotency keys)."""
        for index, item in enumerate(_iterate(items)):
            message_type, data, metadata, key = _unpack(item, index)
            if key is not None:
                raise ConfigurationError(
                    f"publish_many item {index}: an idempotency key cannot be combined with "
                    "delay= or at="
                )
            yield self._entry(message_type, data, metadata, index)

    async def _send_chunk(self, args: list[Any], keys: list[str | None], keyed: bool) -> list[str]:
        if not keyed:
            return await self._send(args)
        with self._denials("publish_many"):
            return await self._idempotent.send(args[0], args[1:], keys)

    async def _send(self, args: list[Any]) -> list[str]:
        script = self._publish_script
        if script is None:
            script = self._publish_script = self._redis.register_script(PUBLISH_MANY)
        with self._denials("publish_many"):
            reply: list[bytes | str] = await _cluster_ask.run_script(
                self._redis, script, [self.name], args
            )
        return [
            entry_id.decode() if entry_id.__class__ is bytes else str(entry_id)
            for entry_id in reply
        ]

    async def cancel_scheduled(self, schedule_id: str) -> bool:
        """Cancel a message scheduled with ``delay``/``at``: True if it was still
        waiting (it will not be delivered), False if it was moved into the
        stream already, cancelled before, or never existed."""
        parted = await self._partitioned()
        if parted is not None:
            return await parted.cancel_scheduled(schedule_id)
        with self._denials("cancel_scheduled"):
            return await _schedule.cancel(self._redis, self.keys, schedule_id)

    # -- administration -------------------------------------------------
    async def info(self) -> TopicInfo:
        """Length, ends, groups with pending and lag, stopped ids, dead letters."""
        parted = await self._partitioned()
        with self._denials("info"):
            if parted is not None:
                return await parted.info()
            return await _info.topic_info(self._redis, self.keys)

    async def stop_message(self, message_id: str) -> None:
        """Stop one message for every consumer of every group, until resumed.

        ``message_id`` is an entry id such as ``"1700000000000-0"`` (leading
        zeros and surrounding blanks are normalised away); anything else
        raises :class:`ConfigurationError` naming it. An id that is not (yet)
        in the stream is recorded all the same, on purpose: it is honoured if
        such an entry arrives, and cleanup drops it once the stream has
        passed it. Stopping a stopped id again changes nothing.
        """
        parted = await self._partitioned()
        if parted is not None:
            await parted.stop_message(message_id)
            return
        with self._denials("stop_message"):
            await _control.stop_message(self._redis, self.keys, message_id)

    async def resume_message(self, message_id: str) -> None:
        """Let a stopped message be handled again, promptly.

        ``message_id`` is checked as by :meth:`stop_message`. Resuming an id
        that is not stopped (never was, resumed already, or not in the
        stream) is a no-op, not an error, so a resume can be retried safely;
        :meth:`info` lists the stopped ids.
        """
        parted = await self._partitioned()
        if parted is not None:
            await parted.resume_message(message_id)
            return
        with self._denials("resume_message"):
            await _control.resume_message(self._redis, self.keys, message_id)

    async def terminate(self) -> None:
        """Delete the stream, its groups and every key of the topic; stop consumers.

        A partitioned topic is terminated partition by partition, its layout
        last: a terminate interrupted halfway is finished by running it again."""
        parted = await self._partitioned()
        self._layout = None
        with self._denials("terminate"):
            if parted is not None:
                await parted.terminate()
                return
            await _control.terminate(self._redis, self.keys)

    async def cleanup(
        self,
        policy: CleanupPolicy | None = None,
        *,
        on_progress: Callable[[int], None] | None = None,
    ) -> int:
        """Remove entries every group has acknowledged; returns how many went.

        The same run drops stopped ids whose entries are gone for good and,
        with ``policy.dead_letter_retention``, old dead letters (neither is
        counted in the result). See :func:`redcurrent._cleanup.cleanup`.
        ``on_progress`` is called after every step (at most
        ``policy.batch_size`` entries) with the entries it removed, for a
        progress display; it must not block.
        """
        parted = await self._partitioned()
        if parted is not None:
            return await parted.cleanup(policy, on_progress)
        with self._denials("cleanup"):
            return await _cleanup.cleanup(self._redis, self.keys, policy, on_progress=on_progress)

    async def dead_letters(self, count: int = 100, *, start: str = "-") -> list[DeadLetter]:
        """The oldest ``count`` (an int >= 0) dead letters from ``start`` on.

        ``start`` is ``"-"`` (the oldest), a dead-letter id (inclusive) or
        ``"(" + id`` (exclusive: the page after the last id seen). A
        malformed one raises :class:`ConfigurationError`.
        """
        _check_count(count, "dead_letters count")
        parted = await self._partitioned()
        if parted is not None:
            return [] if count == 0 else await parted.dead_letters(count, start)
        start = _check_start(start)
        if count == 0:
            return []
        with self._denials("dead_letters"):
            return await _dead.read_dead_letters(self._redis, self.keys, count, start=start)

    async def replay_dead_letters(
        self, ids: Iterable[str] | None = None, *, count: int = 100
    ) -> list[str]:
        """Put dead letters back on the stream (new ids) and remove them from
        the dead-letter stream; returns the new ids. ``ids`` selects dead-letter
        ids (an iterable of ids, not one id string), otherwise the oldest
        ``count`` are replayed. Ids that are not dead letters (any more) are
        skipped, so that a replay can be retried; a malformed id raises
        :class:`ConfigurationError` before anything is replayed."""
        _check_count(count, "replay_dead_letters count")
        if ids is not None:
            if isinstance(ids, str | bytes) or not _iterable(ids):
                raise ConfigurationError(
                    "replay_dead_letters ids must be an iterable of dead-letter ids "
                    f"(e.g. a list), got {_short(ids)}"
                )
            ids = list(ids)
        elif count == 0:
            return []
        parted = await self._partitioned()
        if parted is not None:
            return await parted.replay_dead_letters(ids, count)
        if ids is not None:
            ids = [normalize_id(entry_id) for entry_id in ids]
        with self._denials("replay_dead_letters"):
            return await _dead.replay_dead_letters(self._redis, self.keys, ids, count=count)

    async def delete_dead_letters(self, ids: Iterable[str]) -> int:
        """Delete dead letters for good (``XDEL`` on the dead-letter stream);
        returns how many existed and went. ``ids`` is an iterable of
        dead-letter ids as :meth:`dead_letters` gives them; ids that are no
        dead letters (any more) are skipped, so a deletion can be retried. A
        malformed id raises :class:`ConfigurationError` before anything is
        deleted."""
        if isinstance(ids, str | bytes) or not _iterable(ids):
            raise ConfigurationError(
                "delete_dead_letters ids must be an iterable of dead-letter ids "
                f"(e.g. a list), got {_short(ids)}"
            )
        parted = await self._partitioned()
        if parted is not None:
            return await parted.delete_dead_letters(list(ids))
        wanted = [normalize_id(entry_id) for entry_id in ids]
        with self._denials("delete_dead_letters"):
            return await _dead.delete_dead_letters(self._redis, self.keys, wanted)

    def _denials(self, what: str) -> AbstractContextManager[None]:
        """A refused key, command or channel as :class:`AccessDeniedError`."""
        return denials_explained(f"{what} on stream {self.name!r}")


class _ChunkSender:
    """``publish_many``'s chunks in order: the first as one awaited script
    call (which also loads the script), the next ones on one connection, each
    sent while the server still runs the one before (see
    ``_redis.PackedStream``); keyed (idempotent) chunks as before, after
    everything sent ahead of them came back. A plain client only: a cluster
    client sends every chunk as the first."""

    __slots__ = ("_first", "_flight", "_stream", "_topic")

    def __init__(self, topic: Topic) -> None:
        self._topic = topic
        self._first = True
        self._stream: PackedStream | None = None
        #: the arguments of the chunks sent on the stream, not yet answered.
        self._flight: deque[list[Any]] = deque()

    async def send(self, args: list[Any], keys: list[str | None], keyed: bool) -> list[str]:
        topic = self._topic
        if keyed or self._first or isinstance(topic.redis, RedisCluster):
            ids = await self.finish()
            ids += await topic._send_chunk(args, keys, keyed)
            self._first = self._first and keyed
            return ids
        stream = self._stream
        if stream is None:
            stream = self._stream = await PackedStream.open(topic.redis, "EVALSHA")
            if stream is None:
                return await topic._send_chunk(args, keys, keyed)
        script = topic._publish_script
        assert script is not None  # loaded by the first chunk
        self._flight.append(args)
        with topic._denials("publish_many"):
            replies = await stream.send(("EVALSHA", script.sha, 1, topic.name, *args))
        return await self._ids(replies)

    async def finish(self) -> list[str]:
        """Every reply still to come, as ids."""
        stream = self._stream
        if stream is None:
            return []
        self._stream = None
        try:
            with self._topic._denials("publish_many"):
                replies = await stream.drain()
        finally:
            await stream.close()
        return await self._ids(replies)

    async def abandon(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5.0):
                await stream.drain()
            await stream.close()

    async def _ids(self, replies: list[Any]) -> list[str]:
        stream = self._stream
        if stream is not None and any(isinstance(r, NoScriptError) for r in replies):
            # Every chunk still on its way met the flushed cache too: take all
            # their replies before the first resend loads the script, so that
            # none of them runs after it, out of order.
            with self._topic._denials("publish_many"):
                replies = replies + await stream.drain()
        ids: list[str] = []
        for reply in replies:
            args = self._flight.popleft()
            if isinstance(reply, NoScriptError):
                # The server lost its scripts (a restart) while chunks were on
                # their way: none ran since. Send this one as a first one.
                ids += await self._topic._send(args)
                continue
            if isinstance(reply, Exception):
                with self._topic._denials("publish_many"):
                    raise reply
            ids += [as_str(entry_id) for entry_id in reply]
        return ids


def _where(index: int) -> str:
    """The prefix of an error about the ``index``-th item of publish_many."""
    return f"publish_many item {index}: " if index >= 0 else ""


def _immediate_only(*, maxlen: int | None = None, idempotency_key: str | None = None) -> None:
    """What only a message appended now can take."""
    if maxlen is not None:
        raise ConfigurationError("maxlen applies to messages appended now, not with delay= or at=")
    if idempotency_key is not None:
        raise ConfigurationError("idempotency_key cannot be combined with delay= or at=")


def _check_maxlen(maxlen: int) -> int:
    if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 0:
        raise ConfigurationError(f"maxlen must be an int >= 0 or None, got {maxlen!r}")
    return maxlen


def _check_count(count: int, what: str) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ConfigurationError(f"{what} must be an int >= 0, got {count!r}")


def _check_start(start: str) -> str:
    """``"-"``, an entry id, or ``"("`` and an entry id (exclusive)."""
    if start == "-":
        return start
    if isinstance(start, str) and start.startswith("("):
        return "(" + normalize_id(start[1:])
    return normalize_id(start)


def _iterable(value: object) -> bool:
    try:
        iter(value)  # type: ignore[call-overload]
    except TypeError:
        return False
    return True


def _iterate(items: Iterable[Any]) -> Iterator[Any]:
    try:
        return iter(items)
    except TypeError:
        raise ConfigurationError(
            "publish_many takes an iterable of (type, data) or (type, data, metadata) "
            f"tuples, got {items.__class__.__name__}"
        ) from None


def _unpack(item: Any, index: int) -> tuple[Any, Any, Any, Any]:
    """A ``publish_many`` item as ``(type, data, metadata, idempotency_key)``."""
    if item.__class__ is not tuple and not isinstance(item, tuple | list):
        raise ConfigurationError(
            f"publish_many item {index}: expected a (type, data), (type, data, "
            "metadata) or (type, data, metadata, idempotency_key) tuple, got "
            f"{item.__class__.__name__} {_short(item)}"
        )
    if len(item) == 2:
        return item[0], item[1], None, None
    if len(item) == 3:
        return item[0], item[1], item[2], None
    if len(item) == 4:
        return item[0], item[1], item[2], item[3]
    raise ConfigurationError(
        f"publish_many item {index}: items are (type, data), (type, data, "
        f"metadata) or (type, data, metadata, idempotency_key), got {len(item)} "
        f"values: {_short(item)}"
    )


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _observe(
    stream: str, message_type: str | None, count: int, scheduled: bool
) -> list[PublishObservation]:
    found = (observe(stream, message_type, count, scheduled) for observe in PUBLISH_OBSERVERS)
    return [o for o in found if o is not None]


def _with_headers(
    metadata: Mapping[str, str] | None, observations: list[PublishObservation]
) -> Mapping[str, str] | None:
    merged: dict[str, str] = {}
    for observation in observations:
        merged.update(observation.headers)
    if not merged or not isinstance(metadata, (Mapping, type(None))):
        return metadata  # nothing to add; or not a mapping, which the usual check rejects
    return merged if metadata is None else {**merged, **metadata}


def _finish(
    observations: list[PublishObservation], ids: list[str] | None, error: BaseException | None
) -> None:
    for observation in observations:
        observation.finish(ids, error)
