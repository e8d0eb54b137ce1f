"""The exceptions redcurrent raises.

Every error the library raises derives from :class:`RedcurrentError`, so an
application can catch the library's failures in one place without catching
its own bugs::

    RedcurrentError
    ├── ConfigurationError      invalid arguments, detected before touching Redis
    │   ├── AccessDeniedError   Redis refused the credentials or an ACL permission
    │   ├── EncodeError         data or metadata that cannot be written as a message
    │   └── PayloadTooLargeError  a message larger than ``max_payload_bytes``
    ├── StartTimeoutError       Redis could not be reached within ``start_timeout``
    ├── ConsumerStateError      a lifecycle call at the wrong time (e.g. start twice)
    ├── DecodeError             a stream entry that is not a valid message (``category`` says why)
    │   └── ValidationError     its payload does not fit the handler's ``model``
    ├── NoHandlerError          no handler for the entry's type
    ├── BatchError              raised by a batch handler to name the failed ids
    ├── Retry                   raised by a handler to ask for a later delivery
    └── TopicGoneError          the stream or the consumer group no longer exists

Errors that come from Redis itself (connection loss, ``LOADING`` ...) are not
wrapped: the consumer retries those, and :mod:`redcurrent._faults` is the one
place that decides which server errors mean what.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final, Literal, cast, get_args

__all__ = [
    "DECODE_CATEGORIES",
    "AccessDeniedError",
    "BatchError",
    "ConfigurationError",
    "ConsumerStateError",
    "DecodeCategory",
    "DecodeError",
    "EncodeError",
    "NoHandlerError",
    "PartitionCountError",
    "PayloadTooLargeError",
    "RedcurrentError",
    "Retry",
    "StartTimeoutError",
    "TopicGoneError",
    "ValidationError",
]


class RedcurrentError(Exception):
    """Root of every error raised by redcurrent."""


class ConfigurationError(RedcurrentError, ValueError):
    """An argument or a combination of arguments that cannot work."""


class AccessDeniedError(ConfigurationError):
    """Redis refused the connection's credentials (``WRONGPASS``, ``NOAUTH``) or
    its ACL user lacks a command, key or channel the library needs (``NOPERM``).

    Retrying cannot fix either, so a consumer fails at once instead of waiting
    for a server that will never say yes. The Redis error is the ``__cause__``.
    """


class PartitionCountError(ConfigurationError):
    """A topic was opened with another partition count than the one stored
    for it (or as partitioned while a plain stream of that name exists).

    The count is fixed when a topic is created: a producer and a consumer
    that disagreed would route one key to two partitions. ``stored`` is the
    count in Redis (1 for an unpartitioned topic), ``requested`` the one given.
    """

    def __init__(self, topic: str, stored: int, requested: int, *, plain: bool = False) -> None:
        self.topic = topic
        self.stored = stored
        self.requested = requested
        self.plain = plain
        why = (
            "a plain (unpartitioned) stream of that name exists; terminate it first"
            if plain
            else f"it is stored with {stored}"
        )
        super().__init__(f"topic {topic!r} cannot be opened with partitions={requested}: {why}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (_partition_count_error, (self.topic, self.stored, self.requested, self.plain))


def _partition_count_error(
    topic: str, stored: int, requested: int, plain: bool
) -> PartitionCountError:
    return PartitionCountError(topic, stored, requested, plain=plain)


class EncodeError(ConfigurationError, TypeError):
    """A message's ``data`` is not JSON-serialisable, or its ``metadata`` is not
    a mapping of str to str. Raised by publishing before anything is sent; a
    ``TypeError`` too, as the bare encoder's error was. The encoder's error,
    if any, is the ``__cause__``."""


class PayloadTooLargeError(ConfigurationError):
    """A message larger than the ``max_payload_bytes`` limit.

    ``size`` is what the entry weighs (the bytes of its field names and
    values, as stored in the stream), ``limit`` the limit and ``entry_id`` the
    entry (``None`` when publishing, which raises before anything is sent). A
    consumer does not raise it: it moves the entry to the dead letters, undecoded,
    with this error's text as the reason.
    """

    def __init__(self, size: int, limit: int, entry_id: str | None = None, what: str = "") -> None:
        self.size = size
        self.limit = limit
        self.entry_id = entry_id
        self.what = what
        subject = f"entry {entry_id}" if entry_id is not None else (what or "message")
        super().__init__(
            f"{subject}: {size} bytes, more than max_payload_bytes={limit} "
            f"(by {size - limit} bytes)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.size, self.limit, self.entry_id, self.what))


class StartTimeoutError(RedcurrentError, TimeoutError):
    """A consumer could not reach Redis (or create its group) within its
    ``start_timeout``: the server is down, not up yet, or the address is wrong."""


class ConsumerStateError(RedcurrentError, RuntimeError):
    """A lifecycle method was called in a state that does not allow it."""


#: Why an entry is not a valid message (:attr:`DecodeError.category`):
#:
#: - ``missing_type``: no ``type`` field;
#: - ``invalid_utf8``: the ``type``, ``data`` or ``metadata`` bytes are not UTF-8;
#: - ``invalid_json``: ``data`` or ``metadata`` is not JSON text;
#: - ``wrong_schema``: valid JSON of the wrong shape (``data`` not fitting the
#:   handler's model, ``metadata`` not an object of strings);
#: - ``malformed``: anything else (the default of a ``DecodeError`` built without one).
DecodeCategory = Literal[
    "missing_type", "invalid_utf8", "invalid_json", "wrong_schema", "malformed"
]
DECODE_CATEGORIES: Final[frozenset[str]] = frozenset(get_args(DecodeCategory))

# "entry <id>: [<category>] <reason>", the text of every DecodeError.
_CATEGORY_TAG: Final = re.compile(r"entry \S+: \[([a-z_0-9]+)\] ")


class DecodeError(RedcurrentError):
    """A stream entry could not be turned into a :class:`~redcurrent.Message`.

    It carries the entry id so that the log line and the dead letter say
    exactly which entry is bad and why: ``category`` (a :data:`DecodeCategory`,
    stable across msgspec versions), ``field`` (``"type"``, ``"data"``,
    ``"metadata"`` or ``None``) and ``reason`` (human-readable detail). Its text
    is ``entry <id>: [<category>] <reason>``; a dead letter's ``reason`` is that
    text, and :meth:`category_of` reads the category back from it.
    """

    default_category: DecodeCategory = "malformed"

    def __init__(
        self,
        entry_id: str,
        reason: str,
        category: DecodeCategory | None = None,
        field: str | None = None,
    ) -> None:
        self.entry_id = entry_id
        self.reason = reason
        self.category: DecodeCategory = category or self.default_category
        self.field = field
        super().__init__(f"entry {entry_id}: [{self.category}] {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.entry_id, self.reason, self.category, self.field))

    @staticmethod
    def category_of(text: str) -> DecodeCategory | None:
        """The category of a decode error from its text, e.g. a dead letter's
        ``reason``; ``None`` if the text is not a decode error's (a handler's
        failure, no handler, too many deliveries)."""
        found = _CATEGORY_TAG.match(text)
        if found is None or found.group(1) not in DECODE_CATEGORIES:
            return None
        return cast(DecodeCategory, found.group(1))


class ValidationError(DecodeError):
    """The payload decoded as JSON but does not match the handler's model."""

    default_category: DecodeCategory = "wrong_schema"


class NoHandlerError(RedcurrentError):
    """No handler (and no ``"*"`` catch-all) is registered for a message type."""

    def __init__(self, entry_id: str, message_type: str) -> None:
        self.entry_id = entry_id
        self.message_type = message_type
        super().__init__(f"entry {entry_id}: no handler for type {message_type!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.entry_id, self.message_type))


class BatchError(RedcurrentError):
    """Raised by a batch handler when only some messages of a batch failed.

    The ids named in ``failed_ids`` stay pending and are retried; every other
    message of the batch is acknowledged.
    """

    def __init__(self, failed_ids: Iterable[str], message: str = "") -> None:
        self.failed_ids: frozenset[str] = frozenset(failed_ids)
        super().__init__(message or f"{len(self.failed_ids)} message(s) of the batch failed")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.failed_ids, str(self)))


class Retry(RedcurrentError):
    """Raised by a handler to have its message delivered again later: not a
    failure to log or count as one (``stats.failed``), but a delivery all the
    same.

    The message runs again after ``delay`` seconds, or after the handler's
    :class:`RetryPolicy` delay when ``delay`` is None. It counts towards
    ``max_deliveries`` like a failure, so a message that keeps asking ends in
    the dead letters with this as its last error. Raised by a batch handler,
    it retries every message of the batch.
    """

    def __init__(self, delay: float | None = None) -> None:
        if delay is not None and (
            isinstance(delay, bool)
            or not isinstance(delay, int | float)
            or not 0 <= delay < float("inf")
        ):
            raise ConfigurationError(
                f"Retry delay must be None or finite seconds >= 0, got {delay!r}"
            )
        self.delay = delay
        super().__init__("retry requested" if delay is None else f"retry requested in {delay:g}s")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.delay,))


class TopicGoneError(RedcurrentError):
    """The stream or its consumer group vanished while it was in use.

    Whether it was a :meth:`Topic.terminate` or a deletion by someone else is
    told by the consumer's ``stop_reason`` (``TERMINATED`` or ``DELETED``),
    which waits for the terminate notice this error cannot know about.
    """

    def __init__(self, stream: str, detail: str) -> None:
        self.stream = stream
        self.detail = detail
        super().__init__(f"stream {stream!r}: {detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.stream, self.detail))
