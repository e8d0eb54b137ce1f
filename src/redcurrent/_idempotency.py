"""Idempotent publish: a key remembers the entry its first publish appended.

A producer that lost the reply to a publish (the connection dropped after
Redis wrote the entry) cannot tell whether to send again; with an
idempotency key it may, because the one script that checks the key, appends
and remembers (``PUBLISH_IDEMPOTENT``) answers a repeat with the first id.
That also lets :class:`IdempotentSender` retry transient faults by itself.

Memory: one string per remembered key (``TopicKeys.idempotency``), with a
``PX`` expiry of the window, holding ``"<epoch> <entry id>"``. Redis expires
them itself, so memory is bounded by the keys published within one window
and needs no sweeping; a single hash would need its own expiry bookkeeping
(per-field TTLs only exist from Redis 7.4). Per-key strings cannot be listed
for ``terminate`` to delete, so a topic-wide epoch marker
(``TopicKeys.idempotency_epoch``, in ``owned()``) stands in: terminate
deletes it, the next keyed publish starts a new epoch, and memory of the old
one is ignored until it expires.

Redis 8.6 brings the same on ``XADD`` (``IDMP``); no server here has it, so
it is not used: the script is the portable path (Redis 6.2 and later).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import anyio

from ._cluster_ask import run_script
from ._faults import Fault, classify
from ._keys import TopicKeys, check_name
from ._redis import AnyRedis
from ._scripts import PUBLISH_IDEMPOTENT
from .errors import ConfigurationError

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = [
    "DEFAULT_IDEMPOTENCY_WINDOW",
    "RETRY_DELAYS",
    "IdempotentSender",
    "check_key",
    "check_window",
]

logger = logging.getLogger("redcurrent.publish")

#: Seconds a publish with an idempotency key is remembered by default (24 h).
DEFAULT_IDEMPOTENCY_WINDOW: Final = 86400.0
#: Pauses before the retries of a keyed publish that met a transient fault
#: (connection lost or timed out, LOADING, READONLY, failover): four retries
#: within about 2 s, enough for a stale pooled connection or a quick restart,
#: short enough that a real outage reaches the caller promptly.
RETRY_DELAYS: Final = (0.05, 0.2, 0.5, 1.0)


def check_window(window: object) -> int:
    """``idempotency_window`` in seconds (> 0, finite) as the ``PX`` milliseconds."""
    if (
        isinstance(window, bool)
        or not isinstance(window, int | float)
        or not math.isfinite(window)
        or window <= 0
    ):
        raise ConfigurationError(
            f"idempotency_window must be a number of seconds > 0, got {window!r}"
        )
    return max(1, math.ceil(window * 1000))


def check_key(key: object, where: str = "") -> str:
    """An idempotency key: any non-empty str that UTF-8 can encode."""
    return check_name(key, f"{where}idempotency_key")


class IdempotentSender:
    """Runs ``PUBLISH_IDEMPOTENT`` for one topic, retrying transient faults
    when every message of the call has a key (a repeat then appends nothing)."""

    __slots__ = ("_keys", "_redis", "_script", "_window_ms")

    def __init__(self, redis: AnyRedis, keys: TopicKeys, window_ms: int) -> None:
        self._redis = redis
        self._keys = keys
        self._window_ms = window_ms
        self._script: AsyncScript | None = None

    async def send(
        self, maxlen: bytes, entries: Sequence[bytes], keys: Sequence[str | None]
    ) -> list[str]:
        """Append ``entries`` (flat type, data, metadata triples, one per
        ``keys`` item) unless their key is remembered; returns the ids."""
        script = self._script
        if script is None:
            script = self._script = self._redis.register_script(PUBLISH_IDEMPOTENT)
        memory = [self._keys.idempotency(key) for key in keys if key is not None]
        args: list[Any] = [maxlen, self._window_ms]
        for index, key in enumerate(keys):
            args += entries[3 * index : 3 * index + 3]
            args.append(b"0" if key is None else b"1")
        redis_keys = [self._keys.stream, self._keys.idempotency_epoch, *memory]
        retries = RETRY_DELAYS if len(memory) == len(keys) else ()
        for attempt in range(len(retries) + 1):
            try:
                reply: list[bytes | str] = await run_script(self._redis, script, redis_keys, args)
            except Exception as exc:
                if attempt == len(retries) or classify(exc) is not Fault.TRANSIENT:
                    raise
                logger.info(
                    "publish to %r with idempotency keys: %s: %s; retrying in %g s",
                    self._keys.stream,
                    type(exc).__name__,
                    exc,
                    retries[attempt],
                )
                await anyio.sleep(retries[attempt])
            else:
                return [
                    entry_id.decode() if entry_id.__class__ is bytes else str(entry_id)
                    for entry_id in reply
                ]
        raise AssertionError("unreachable")  # pragma: no cover
