"""The Redis keys redcurrent owns for a topic.

Every key shares the Redis Cluster slot of the stream key, so that scripts
and transactions touching the stream and its companions (dead letters,
stopped ids, locks) also run on a cluster. Redis hashes only the part between
the first ``{`` and the next ``}`` when that part is non-empty, so the slot
of a stream named ``a{b}c`` is the slot of ``b``. We derive the hash tag the
same way; when the effective hashed part cannot be written inside braces
(it contains ``}``), we use a short string that hashes to the same slot.
"""

from __future__ import annotations

import functools
import itertools
import string

from redis.crc import key_slot

from .errors import ConfigurationError

__all__ = ["TopicKeys", "check_name", "hash_tag"]

_PREFIX = "redcurrent"


def _hashed_part(name: str) -> str:
    """The part of ``name`` Redis Cluster feeds to CRC16 (its rule, verbatim)."""
    start = name.find("{")
    if start != -1:
        end = name.find("}", start + 1)
        if end > start + 1:
            return name[start + 1 : end]
    return name


def check_name(name: object, what: str) -> str:
    """A stream, group or consumer name: any non-empty str that UTF-8 can encode.

    Redis names are binary-safe, so braces, spaces, newlines and any Unicode
    work (the hash tag below keeps every key in the stream's slot); an empty
    name, a non-str (bytes included) or a lone surrogate is refused here
    instead of failing inside redis-py or, worse, naming a different key. A
    str subclass (a ``str`` enum) comes back as the plain str of its value,
    which is what redis-py sends: f-strings would spell some of them
    ``Kind.NAME`` and derive keys from another name than the stream's.
    """
    if not isinstance(name, str):
        raise ConfigurationError(f"{what} must be a str, got {type(name).__name__} {name!r}")
    if not name:
        raise ConfigurationError(f"{what} must be a non-empty str")
    try:
        name.encode()
    except UnicodeEncodeError as exc:
        raise ConfigurationError(
            f"{what} {name!r} cannot be encoded as UTF-8: {exc.reason}"
        ) from None
    return name if name.__class__ is str else str.__str__(name)


@functools.lru_cache(maxsize=1)
def _slot_aliases() -> dict[int, str]:
    """A brace-free string for every one of the 16384 slots (built once, lazily)."""
    table: dict[int, str] = {}
    alphabet = string.ascii_letters + string.digits
    for length in itertools.count(1):
        for chars in itertools.product(alphabet, repeat=length):
            candidate = "".join(chars)
            table.setdefault(key_slot(candidate.encode()), candidate)
        if len(table) == 16384:
            return table
    raise AssertionError("unreachable")  # pragma: no cover


def hash_tag(stream: str) -> str:
    """A ``{tag}`` that puts a key in the same cluster slot as ``stream``."""
    part = _hashed_part(stream)
    if "}" not in part and "{" not in part:
        return "{" + part + "}"
    return "{" + _slot_aliases()[key_slot(stream.encode())] + "}"


class TopicKeys:
    """Names of every key and channel of one topic.

    The full stream name follows the tag so that two streams whose names hash
    alike (``orders`` and ``x{orders}``) never share a key.
    """

    __slots__ = (
        "_base",
        "cleanup_lock",
        "control_channel",
        "dead_letters",
        "idempotency_epoch",
        "members",
        "meta",
        "owners",
        "scheduled",
        "scheduled_data",
        "stopped",
        "stream",
        "tag",
        "workers",
    )

    stream: str
    """The stream's own name."""
    tag: str
    """The hash tag every key of the topic carries (the stream's cluster slot)."""
    dead_letters: str
    """The dead-letter stream."""
    stopped: str
    """The set of stopped message ids."""
    cleanup_lock: str
    """The lock that lets one cleaner run at a time."""
    control_channel: str
    """The pub/sub channel of stop, resume, terminate and scheduled notices."""
    idempotency_epoch: str
    """The marker idempotent publishes remember their keys under; terminate
    deletes it, which makes every remembered key of the topic stale."""
    scheduled: str
    """The sorted set of scheduled messages: schedule id -> due time (ms)."""
    scheduled_data: str
    """The hash of scheduled messages' fields: schedule id -> msgpack array."""
    meta: str
    """The hash of a partitioned topic's layout (see ``_partitions``)."""
    members: str
    """The sorted set of a partitioned topic's live consumers, every group's,
    scored by expiry (see ``_membership``)."""
    owners: str
    """The hash of which consumer of each group reads this stream when it is
    one partition of a partitioned topic: group -> holder."""
    workers: str
    """The hash of worker consumer names in use (see ``_names``): group and
    name -> holder and expiry."""

    def __init__(self, stream: str) -> None:
        self.stream = stream = check_name(stream, "a stream name")
        self.tag = hash_tag(stream)
        base = self._base = f"{_PREFIX}:{self.tag}:{stream}"
        self.dead_letters = f"{base}:dead"
        self.stopped = f"{base}:stopped"
        self.cleanup_lock = f"{base}:cleanup-lock"
        self.control_channel = f"{base}:control"
        self.scheduled = f"{base}:scheduled"
        self.idempotency_epoch = f"{base}:idempotency-epoch"
        self.scheduled_data = f"{base}:scheduled-data"
        self.workers = f"{base}:workers"
        self.meta = f"{base}:meta"
        self.members = f"{base}:members"
        self.owners = f"{base}:owners"

    def owned(self) -> tuple[str, ...]:
        """Every key (not channel) the library may create for this topic, stream first."""
        return (
            self.stream,
            self.dead_letters,
            self.stopped,
            self.cleanup_lock,
            self.scheduled,
            self.scheduled_data,
            self.idempotency_epoch,
            self.workers,
            self.owners,
            self.members,
            self.meta,
        )

    def idempotency(self, key: str) -> str:
        """The string that remembers the entry id published with idempotency ``key``.

        Ends with the key's UTF-8 length so that no (stream, key) pair names
        the key of another pair or of another stream sharing the hash tag,
        whatever colons the names hold (``a{b}`` with key ``x:idem:y`` and
        ``a{b}:idem:x`` with key ``y`` differ). These are not in
        :meth:`owned`: they expire by themselves (see ``idempotency_epoch``).
        """
        return f"{self._base}:idem:{key}:{len(key.encode())}"

    def __repr__(self) -> str:
        return f"TopicKeys({self.stream!r})"
