"""Configuration: what a consumer, its batches and its cleanup are told, in one place.

Every option is a field of a frozen, keyword-only msgspec Struct with its
default and meaning beside it, validated when the Struct is built. A consumer
exposes its own as :attr:`StreamConsumer.config`; changing an option means
building a new consumer, so nothing can be changed half-way through a run.
The same Structs decode from JSON or TOML (``msgspec.convert``), which is what
a worker reading a configuration file needs; unknown fields are refused there
rather than ignored.
"""

from __future__ import annotations

import math
import random

import msgspec

from ._ids import normalize_id
from ._keys import check_name
from ._limits import DEFAULT_MAX_PAYLOAD_BYTES, check_limit
from ._message import StartFrom
from .errors import ConfigurationError

__all__ = [
    "DEFAULT_RETRY",
    "BatchConfig",
    "CleanupPolicy",
    "ConsumerConfig",
    "RetryPolicy",
    "check_policy",
    "check_retry",
]

_START_WORDS = {"latest": StartFrom.LATEST.value, "earliest": StartFrom.EARLIEST.value}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class BatchConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Defaults for batch handlers that do not set their own.

    ``size``: the most messages one call of a batch handler gets.
    ``timeout``: how long, in seconds, the oldest message of an unfilled batch
    may wait before the batch is handed over anyway.
    """

    size: int = 10
    timeout: float = 0.5

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigurationError(f"BatchConfig.size must be >= 1, got {self.size}")
        if not self.timeout > 0:
            raise ConfigurationError(f"BatchConfig.timeout must be > 0, got {self.timeout}")


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """When a failed message runs again: capped exponential backoff with jitter.

    ``RetryPolicy(delay=1.0, factor=2.0, max_delay=300.0, jitter=0.1)``,
    keyword-only, durations in seconds. After delivery ``n`` failed, delivery
    ``n + 1`` starts ``min(delay * factor ** (n - 1), max_delay)`` seconds
    later, give or take ``jitter`` (a fraction of that delay). The consumer
    that saw the failure keeps the message (same id, same group, leased) and
    runs it again itself; if it dies meanwhile, another consumer of the group
    takes the message over after ``claim_idle`` and the schedule goes on from
    the delivery count the group's pending list holds.

    The default retries after about 1, 2, 4 and 8 seconds: soon enough that a
    blip (a timeout, a restarting dependency) costs seconds rather than
    ``claim_idle``, spread enough that a dependency that is down is not
    hammered, and with the default ``max_deliveries=5`` a message that always
    fails reaches the dead letters about 15 seconds after it first failed.
    """

    delay: float = 1.0
    """Seconds before the second delivery (the first retry)."""
    factor: float = 2.0
    """Each further retry waits this many times longer than the one before (>= 1)."""
    max_delay: float = 300.0
    """The longest wait between two deliveries, in seconds."""
    jitter: float = 0.1
    """Each wait is spread at random by up to this fraction (0 to 1) either
    way, so that messages that failed together do not all come back at once."""

    def __post_init__(self) -> None:
        for name in ("delay", "max_delay"):
            value = getattr(self, name)
            if not _is_number(value) or not value >= 0 or math.isinf(value):
                raise ConfigurationError(
                    f"RetryPolicy.{name} must be finite seconds >= 0, got {value!r}"
                )
        if not _is_number(self.factor) or not 1 <= self.factor < math.inf:
            raise ConfigurationError(
                f"RetryPolicy.factor must be a finite number >= 1, got {self.factor!r}"
            )
        if not _is_number(self.jitter) or not 0 <= self.jitter < 1:
            raise ConfigurationError(
                f"RetryPolicy.jitter must be a fraction in [0, 1), got {self.jitter!r}"
            )

    def delay_for(self, delivery: int) -> float:
        """Seconds to wait after delivery ``delivery`` (1 for the first) failed,
        jitter included."""
        try:
            base = self.delay * self.factor ** max(0, delivery - 1)
        except OverflowError:
            base = self.max_delay
        base = min(base, self.max_delay)
        if self.jitter:
            base *= 1 + random.uniform(-self.jitter, self.jitter)
        return base


#: What a consumer and its handlers use unless told otherwise.
DEFAULT_RETRY = RetryPolicy()


def check_retry(policy: object) -> RetryPolicy | None:
    """``policy`` if it is a :class:`RetryPolicy` or None, else a
    :class:`ConfigurationError`."""
    if policy is None or isinstance(policy, RetryPolicy):
        return policy
    raise ConfigurationError(
        f"retry takes a RetryPolicy or None, got {type(policy).__name__} {policy!r}"
    )


class CleanupPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How and when processed entries are removed from a stream.

    ``CleanupPolicy(auto=False, interval=300.0, max_length=10000,
    min_retention=3600.0, batch_size=100, dead_letter_retention=None)``,
    keyword-only. Cleanup removes only entries
    every group has acknowledged (see :meth:`Topic.cleanup`), drops stopped ids
    whose entries are gone for good, and, with ``dead_letter_retention``,
    old dead letters. Removal is final: a group created afterwards, even at
    id ``0``, does not see removed entries, so keep ``min_retention`` long
    enough for late groups that must replay history.
    """

    auto: bool = False
    """Let consumers run cleanup by themselves (one at a time per topic).
    Off by default because removing entries is a decision of the operator."""
    interval: float = 300.0
    """Seconds between two checks of an automatic cleaner. Each check costs
    one XLEN, so this is about how stale the stream may get, not about load."""
    max_length: int = 10000
    """Automatic cleanup runs only while the stream has more entries than
    this. It is a trigger, not a cap: entries some group still needs stay
    even if the stream is longer."""
    min_retention: float = 3600.0
    """Seconds an entry is kept at least, judged by the time in its id, so
    operators can still inspect or replay recent history after processing."""
    batch_size: int = 100
    """The most entries one step removes. Each step is one short Lua script,
    so this bounds how long Redis is busy with cleanup at a time."""
    dead_letter_retention: float | None = None
    """Seconds a dead letter is kept, judged by the time in its id (the moment
    it became a dead letter); older ones are removed by every cleanup run,
    manual or automatic. ``None`` (the default) keeps dead letters for ever:
    reading, replaying or deleting them is then up to the operator. With
    ``auto=True`` and a retention, consumers trim dead letters every
    ``interval`` even while the stream is not longer than ``max_length``."""

    def __post_init__(self) -> None:
        if not _is_number(self.interval) or not self.interval > 0:
            raise ConfigurationError(f"cleanup interval must be > 0 seconds, got {self.interval!r}")
        if not _is_int(self.batch_size) or self.batch_size <= 0:
            raise ConfigurationError(
                f"cleanup batch_size must be an int > 0, got {self.batch_size!r}"
            )
        if not _is_int(self.max_length) or self.max_length < 0:
            raise ConfigurationError(
                f"cleanup max_length must be an int >= 0, got {self.max_length!r}"
            )
        if (
            not _is_number(self.min_retention)
            or not self.min_retention >= 0
            or math.isinf(self.min_retention)
        ):
            raise ConfigurationError(
                f"cleanup min_retention must be finite seconds >= 0, got {self.min_retention!r}"
            )
        retention = self.dead_letter_retention
        if retention is not None and (
            not _is_number(retention) or not retention >= 0 or math.isinf(retention)
        ):
            raise ConfigurationError(
                "cleanup dead_letter_retention must be None or finite seconds >= 0, "
                f"got {retention!r}"
            )


def check_policy(policy: object) -> CleanupPolicy | None:
    """``policy`` if it is a :class:`CleanupPolicy` or None, else a
    :class:`ConfigurationError` (not an AttributeError in the middle of a run)."""
    if policy is None or isinstance(policy, CleanupPolicy):
        return policy
    raise ConfigurationError(
        f"cleanup takes a CleanupPolicy or None, got {type(policy).__name__} {policy!r}"
    )


class ConsumerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The options of one :class:`StreamConsumer` (durations in float seconds).

    Built by ``StreamConsumer(redis, stream, group, name, **options)`` or given
    whole to :meth:`StreamConsumer.from_config`.
    """

    stream: str
    """The stream (topic) to consume."""
    group: str
    """The consumer group; created when missing (see ``start``)."""
    name: str
    """This consumer's name in the group; unique per process by default."""
    start: str = StartFrom.LATEST
    """Where a *new* group starts (an existing one keeps its position):
    ``StartFrom.LATEST``, ``StartFrom.EARLIEST`` (also spelt ``"latest"`` and
    ``"earliest"`` in a configuration file) or an entry id (delivery starts
    after it, as goStream does)."""
    claim_idle: float = 30.0
    """Entries left idle this long by any consumer are taken over (and a failed
    message is retried after it when ``retry`` is None). Held entries are
    leased (refreshed every ``claim_idle / 3``), so slow handlers are not
    robbed."""
    concurrency: int = 16
    """The most handlers running at once."""
    max_deliveries: int = 5
    """Deliveries before a failing message becomes a dead letter (a handler
    may set its own)."""
    retry: RetryPolicy | None = DEFAULT_RETRY
    """When a failed message runs again (a handler may set its own): by
    default after about 1, 2, 4, 8 seconds (see :class:`RetryPolicy`). The
    consumer keeps up to ``prefetch // 2`` messages waiting for their retry;
    beyond that, and with ``None``, a failed message stays pending and is
    retried after ``claim_idle`` by whichever consumer claims it."""
    prefetch: int | None = None
    """The most entries held in memory (running plus waiting); bounds memory and
    how much one consumer takes from its peers. ``None``: ``max(4 * concurrency,
    256)``, with batch handlers at least ``max(4 * largest batch, 1024)``."""
    batch: BatchConfig = msgspec.field(default_factory=lambda: BatchConfig())
    """Defaults for batch handlers that do not set their own."""
    cleanup: CleanupPolicy | None = None
    """With ``CleanupPolicy(auto=True, ...)`` this consumer takes part in
    trimming processed entries."""
    shutdown_timeout: float = 10.0
    """How long a graceful stop waits for the messages in hand before cancelling
    them (they stay pending)."""
    block: float = 5.0
    """How long one XREADGROUP waits for new entries; an idle consumer sends
    about one command per ``block``. Shortened to fit within the client's socket
    timeout, and to at most half of ``claim_idle``."""
    consumer_idle_timeout: float = 3600.0
    """Other consumers of the group idle this long and holding nothing are
    deleted from the group."""
    start_timeout: float = 30.0
    """How long start-up keeps trying to reach Redis and set up the group
    before raising :class:`StartTimeoutError`. Wrong credentials or a missing
    ACL permission raise :class:`AccessDeniedError` at once."""
    recreate_group: bool = False
    """When the group vanishes under a running consumer, re-create it where
    this consumer last read and go on, instead of stopping with
    :attr:`StopReason.DELETED`. For servers that may restart without
    persistence; a terminated topic still stops."""
    max_payload_bytes: int | None = DEFAULT_MAX_PAYLOAD_BYTES
    """An entry heavier than this (the bytes of its field names and values;
    8 MiB by default, ``None``: no limit) is moved to the dead letters
    undecoded, with a reason naming its size and the limit."""
    member_ttl: float = 10.0
    """On a partitioned topic: how long this consumer stays a member of the
    group's partition map without renewing (it renews every third of it).
    A crashed member's partitions move after about this long; a member that
    could not renew for two thirds of it stops reading them by itself first.
    Unused on a plain topic."""

    def __post_init__(self) -> None:
        # Any non-empty str that UTF-8 can encode: braces, spaces, newlines, Unicode.
        check_name(self.stream, "a stream name")
        check_name(self.group, "a group name")
        check_name(self.name, "a consumer name")
        check_policy(self.cleanup)
        check_limit(self.max_payload_bytes)
        check_retry(self.retry)
        if not isinstance(self.start, StartFrom) and self.start not in _START_WORDS:
            try:
                normalize_id(self.start)
            except ConfigurationError:
                raise ConfigurationError(
                    "start must be StartFrom.LATEST, StartFrom.EARLIEST or an entry id, "
                    f"got {self.start!r}"
                ) from None
        if not _is_int(self.concurrency) or self.concurrency < 1:
            raise ConfigurationError(f"concurrency must be an int >= 1, got {self.concurrency!r}")
        if not _is_int(self.max_deliveries) or self.max_deliveries < 1:
            raise ConfigurationError(
                f"max_deliveries must be an int >= 1, got {self.max_deliveries!r}"
            )
        for name in ("claim_idle", "block", "start_timeout", "consumer_idle_timeout", "member_ttl"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                raise ConfigurationError(f"{name} must be > 0 seconds, got {value!r}")
        if not _is_number(self.shutdown_timeout) or not self.shutdown_timeout >= 0:
            raise ConfigurationError(
                f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout!r}"
            )
        if self.prefetch is not None and (
            not _is_int(self.prefetch) or self.prefetch < self.concurrency
        ):
            raise ConfigurationError(
                f"prefetch ({self.prefetch!r}) must be an int >= concurrency ({self.concurrency})"
            )

    @property
    def start_id(self) -> str:
        """``start`` as XGROUP CREATE takes it."""
        if isinstance(self.start, StartFrom):
            return self.start.value
        word = _START_WORDS.get(self.start)
        return word if word is not None else normalize_id(self.start)
