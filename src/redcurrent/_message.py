"""The values users handle: messages, start positions, stop reasons, topic info.

No ``from __future__ import annotations`` here: ``redcurrent/__init__.py``
re-homes these classes to ``redcurrent``, and :func:`typing.get_type_hints`
(which ``help()``, ``inspect.signature`` and msgspec use) would then look
string annotations such as ``T`` or ``Any`` up in the wrong module. Plain
annotations are evaluated here, once, where every name is defined.
"""

import enum
import warnings
from typing import Any, Generic, TypeVar

import msgspec

__all__ = [
    "ConsumerStats",
    "DeadLetter",
    "GroupInfo",
    "Message",
    "PartitionInfo",
    "StartFrom",
    "StopReason",
    "TopicInfo",
]

T = TypeVar("T")


class Message(msgspec.Struct, Generic[T], frozen=True, kw_only=True):
    """One stream entry as a handler sees it.

    ``data`` is the decoded JSON payload, or an instance of the handler's
    ``model`` when one was given. ``delivery_count`` is 1 on the first
    delivery and rises each time the entry is delivered again (after a
    failure, a crash or a claim), so a handler can tell a retry.
    """

    id: str
    type: str
    data: T
    metadata: dict[str, str]
    stream: str
    delivery_count: int = 1
    key: str | None = None
    """The message key it was published with (``publish(key=...)``), if any:
    messages of one key are handled one at a time, in the order published."""
    partition: int | None = None
    """The partition of a partitioned topic it was read from (then ``id`` is
    ``"<partition>:<entry id>"``); None for an unpartitioned topic."""


class StartFrom(str, enum.Enum):
    """Where a new consumer group starts reading.

    Only used when the group is created; an existing group keeps its
    position. An explicit entry id may be given instead: delivery starts
    *after* it, as goStream does.
    """

    LATEST = "$"
    """Only entries added after the group was created (the default)."""
    EARLIEST = "0"
    """Every entry still in the stream."""


class StopReason(str, enum.Enum):
    """Why a consumer stopped."""

    STOPPED = "stopped"
    """Asked to stop (``stop()``, leaving ``async with``, cancellation)."""
    TERMINATED = "terminated"
    """The topic was terminated with :meth:`Topic.terminate`."""
    DELETED = "deleted"
    """The stream or the consumer group was deleted by someone."""
    FAILED = "failed"
    """An error the consumer cannot recover from; see ``consumer.error``."""


class ConsumerHealth(msgspec.Struct, frozen=True, kw_only=True):
    """What a liveness or readiness probe asks a consumer (:meth:`StreamConsumer.health`).

    ``healthy`` is what a probe should answer with: running, and not in an
    outage longer than the tolerance :meth:`~StreamConsumer.health` was given.
    A consumer rides out short outages by itself (failovers, restarts), so a
    probe that restarts it at the first failed call only adds to the churn.
    """

    healthy: bool
    """Running, and not in an outage longer than the tolerance."""
    running: bool
    """Started and not stopped."""
    stop_reason: StopReason | None
    """Why it stopped; None while running (or before it started)."""
    outage_seconds: float | None
    """How long Redis has been unreachable (calls retried with backoff);
    None when it is reachable."""
    last_contact_seconds: float | None
    """Seconds since a Redis call last succeeded (an idle consumer reads about
    every ``block`` seconds); None before the first."""


class ConsumerStats(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a consumer's counters since it started."""

    received: int = 0
    """Entries delivered to this consumer (read, recovered, claimed or retried)."""
    handled: int = 0
    """Messages whose handler finished without error (acknowledged)."""
    failed: int = 0
    """Deliveries whose handler failed: raised an exception, or was named in a
    :class:`BatchError` (each message of a failed batch counts). A handler
    that raises :class:`Retry` has not failed and is not counted here; its
    message counts in ``retried`` when this consumer runs it again."""
    claimed: int = 0
    """Entries taken over from idle consumers with XAUTOCLAIM."""
    retried: int = 0
    """Messages whose handler failed or raised :class:`Retry` that this
    consumer kept and delivered again itself, after their delay (the
    :class:`RetryPolicy`'s, or the one ``Retry`` asked for)."""
    dead_lettered: int = 0
    """Entries moved to the dead-letter stream."""
    running: int = 0
    """Handler calls running now (a batch is one call); at most ``concurrency``."""
    held: int = 0
    """Entries this consumer holds now: running, waiting in memory for a worker
    or a batch, and stopped ones kept aside; bounded by ``prefetch``."""

    @property
    def in_flight(self) -> int:
        """Deprecated alias of :attr:`held` (it counted waiting entries too)."""
        warnings.warn(
            "ConsumerStats.in_flight is deprecated: use held (entries in memory) "
            "or running (handler calls now)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.held


class GroupInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One consumer group of a topic."""

    name: str
    consumers: int
    pending: int
    lag: int | None
    """Entries not yet delivered to the group; None when the server cannot tell."""
    last_delivered_id: str


class PartitionInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One partition of a partitioned topic, as :meth:`Topic.info` reads it."""

    partition: int
    stream: str
    node: str | None
    """``host:port`` of the cluster node serving it (None on a single server)."""
    length: int
    owners: dict[str, str]
    """Group -> the consumer reading this partition for it."""
    groups: list[GroupInfo]
    stopped: int
    dead_letters: int


class TopicInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The state of a topic, as :meth:`Topic.info` reads it."""

    length: int
    first_id: str | None
    last_id: str | None
    groups: list[GroupInfo]
    stopped: list[str]
    dead_letters: int
    scheduled: int = 0
    """Messages scheduled with ``delay``/``at`` still waiting to enter the stream."""
    partitions: list[PartitionInfo] = []
    """One row per partition of a partitioned topic (empty for a plain one);
    the fields above then sum or merge them, with ids as ``"<p>:<id>"``."""


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """An entry moved to the topic's dead-letter stream, with the reason.

    ``fields`` are the original entry's fields, byte for byte, so that a
    replay writes back exactly what the producer wrote.
    """

    id: str
    """The id of the dead letter in the dead-letter stream."""
    original_id: str
    type: str | None
    data: Any
    metadata: dict[str, str]
    group: str
    consumer: str
    reason: str
    error_type: str
    delivery_count: int
    failed_at: float
    """Unix time in seconds."""
    fields: dict[bytes, bytes]
    partition: int | None = None
    """The partition it came from, on a partitioned topic (then ``id`` and
    ``original_id`` are ``"<p>:<id>"``)."""
