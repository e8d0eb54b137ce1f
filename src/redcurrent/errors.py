"""The exceptions redcurrent raises.

Every error the library raises derives from :class:`RedcurrentError`, so an
application can catch the library's failures in one place without catching
its own bugs::

    RedcurrentError
    ├── ConfigurationError      invalid arguments, detected before touching Redis
    ├── ConsumerStateError      a lifecycle call at the wrong time (e.g. start twice)
    ├── DecodeError             a stream entry that is not a valid message
    │   └── ValidationError     its payload does not fit the handler's ``model``
    ├── NoHandlerError          no handler for the entry's type
    ├── BatchError              raised by a batch handler to name the failed ids
    └── TopicGoneError          the stream or the consumer group no longer exists

Errors that come from Redis itself (connection loss, ``LOADING`` ...) are not
wrapped: the consumer retries those, and :mod:`redcurrent._errors` is the one
place that decides which server errors mean what.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "BatchError",
    "ConfigurationError",
    "ConsumerStateError",
    "DecodeError",
    "NoHandlerError",
    "RedcurrentError",
    "TopicGoneError",
    "ValidationError",
]


class RedcurrentError(Exception):
    """Root of every error raised by redcurrent."""


class ConfigurationError(RedcurrentError, ValueError):
    """An argument or a combination of arguments that cannot work."""


class ConsumerStateError(RedcurrentError, RuntimeError):
    """A lifecycle method was called in a state that does not allow it."""


class DecodeError(RedcurrentError):
    """A stream entry could not be turned into a :class:`~redcurrent.Message`.

    It carries the entry id so that the log line and the dead letter say
    exactly which entry is bad and why.
    """

    def __init__(self, entry_id: str, reason: str) -> None:
        self.entry_id = entry_id
        self.reason = reason
        super().__init__(f"entry {entry_id}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.entry_id, self.reason))


class ValidationError(DecodeError):
    """The payload decoded as JSON but does not match the handler's model."""


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
        self.failed_ids = frozenset(failed_ids)
        super().__init__(message or f"{len(self.failed_ids)} message(s) of the batch failed")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.failed_ids, str(self)))


class TopicGoneError(RedcurrentError):
    """The stream or its consumer group vanished while it was in use."""

    def __init__(self, stream: str, detail: str, *, terminated: bool = False) -> None:
        self.stream = stream
        self.detail = detail
        self.terminated = terminated
        super().__init__(f"stream {stream!r}: {detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.stream, self.detail), {"terminated": self.terminated})
