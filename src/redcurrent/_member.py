"""One consumer's seat in one stream's group.

Every loop of a consumer (read, claim, lease, ack, dead letters,
housekeeping) needs the same four names and the same way of calling Redis:
transient faults retried with backoff and logged once per outage, a vanished
stream or group turned into :class:`TopicGoneError`. They all get them from
a :class:`GroupMember`. A consumer of a partitioned topic will hold one per
stream, while its dispatcher stays shared.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio.cluster import RedisCluster

from ._backoff import Backoff, Outage
from ._faults import (
    Fault,
    access_denied,
    classify,
    is_busygroup,
    is_wrongtype,
    woken_by_deletion,
)
from ._keys import TopicKeys
from ._redis import AnyRedis, as_str, execute_pipeline
from ._scripts import CHECK_SCRIPT_ACCESS
from .errors import ConfigurationError, TopicGoneError

__all__ = ["GroupMember"]

logger = logging.getLogger("redcurrent.consumer")

R = TypeVar("R")

#: Longer than any entry can have been idle (about 146,000 years).
_NEVER_IDLE_MS = 2**62


class GroupMember:
    __slots__ = (
        "group",
        "keys",
        "last_ok",
        "last_read",
        "name",
        "on_gone",
        "outage",
        "redis",
        "stream",
    )

    def __init__(self, redis: AnyRedis, keys: TopicKeys, group: str, name: str) -> None:
        self.redis = redis
        self.keys = keys
        self.stream = keys.stream
        self.group = group
        self.name = name
        self.outage = Outage(logger, f"consumer {name} of {keys.stream}/{group}")
        #: when (monotonic) a Redis call last succeeded; None before the first.
        self.last_ok: float | None = None
        #: the newest entry id this member read with ``>`` (None before the first).
        self.last_read: bytes | None = None
        #: asked when the stream or group vanished; True means "re-created it,
        #: try again" (see ``StreamConsumer(recreate_group=...)``).
        self.on_gone: Callable[[BaseException], Awaitable[bool]] | None = None

    def __repr__(self) -> str:
        return f"GroupMember({self.stream!r}, group={self.group!r}, name={self.name!r})"

    async def call(self, what: str, fn: Callable[[], Awaitable[R]]) -> R:
        """One Redis call: transient faults retried with backoff, a vanished
        stream or group raised as :class:`TopicGoneError`."""
        backoff: Backoff | None = None
        while True:
            try:
                result = await fn()
            except Exception as exc:
                fault = classify(exc)
                if fault is Fault.TRANSIENT:
                    self.outage.failed(exc, what)
                    backoff = backoff or Backoff()
                    await backoff.sleep()
                    continue
                if fault is Fault.GONE:
                    if woken_by_deletion(exc):
                        continue  # deleted (NOGROUP next) or resharded away
                    if self.on_gone is not None and await self.on_gone(exc):
                        continue
                    raise TopicGoneError(self.stream, f"{what}: {exc}") from exc
                if fault is Fault.DENIED:
                    raise access_denied(exc, f"{what} on stream {self.stream!r}") from exc
                raise
            self.last_ok = time.monotonic()
            if self.outage.ongoing:
                self.outage.recovered()
            return result

    async def own_pending(self, lo: bytes, hi: bytes, count: int) -> list[dict[str, Any]]:
        """This consumer's pending entries from ``lo`` to ``hi`` (``(id`` for an
        exclusive bound), at most ``count``: id, idle time, delivery count."""
        rows: list[dict[str, Any]] = await self.call(
            "XPENDING",
            lambda: self.redis.xpending_range(
                self.stream, self.group, lo, hi, count, consumername=self.name
            ),
        )
        return rows

    async def server_version(self) -> tuple[int, ...] | None:
        """``redis_version`` of the server (Valkey reports its compatibility
        level), or None when it cannot be read (a cluster, a proxy)."""
        redis = self.redis
        try:
            if isinstance(redis, RedisCluster):
                # The node that serves the stream, not whichever answers first.
                node = redis.get_node_from_key(self.stream)
                info: Any = await self.call(
                    "INFO", lambda: redis.execute_command("INFO", "server", target_nodes=node)
                )
            else:
                info = await self.call("INFO", lambda: redis.info("server"))
        except Exception:  # only used to pick a fallback: never worth a stop
            return None
        version = info.get("redis_version") if isinstance(info, dict) else None
        if not isinstance(version, str | bytes):
            return None
        parts = as_str(version).split(".")
        return tuple(int(p) for p in parts if p.isdigit())

    async def check_access(self) -> None:
        """At start, send once each command the loops send outside scripts, in
        a form that changes nothing, so that an ACL user lacking one fails the
        start (:class:`AccessDeniedError`) instead of a loop later on. The
        commands sent inside scripts cannot be tried harmlessly: the server's
        ACL is asked about them instead (Redis >= 7.0)."""
        stream, group, name = self.stream, self.group, self.name
        scripted = self.redis.register_script(CHECK_SCRIPT_ACCESS)

        async def probe() -> Any:
            pipe = self.redis.pipeline(transaction=False)
            # An idle time no entry has: claims nothing.
            pipe.execute_command(
                "XAUTOCLAIM", stream, group, name, _NEVER_IDLE_MS, "0-0", "COUNT", 1, "JUSTID"
            )
            pipe.execute_command("XPENDING", stream, group)
            pipe.execute_command("XACK", stream, group, "0-1")  # not a real entry
            pipe.execute_command("XINFO", "CONSUMERS", stream, group)
            return await execute_pipeline(pipe)

        await self.call("permission check", probe)
        await self.call(
            "permission check",
            lambda: scripted(keys=[stream, self.keys.dead_letters], args=[group, name]),
        )

    async def create_group(self, start: str) -> bool:
        """Create the group at ``start`` (and the stream if missing); False if
        it existed, in which case it keeps its position."""
        try:
            await self.call(
                "XGROUP CREATE",
                lambda: self.redis.execute_command(
                    "XGROUP", "CREATE", self.stream, self.group, start, "MKSTREAM"
                ),
            )
        except Exception as exc:
            if is_busygroup(exc):
                return False
            if is_wrongtype(exc):
                raise ConfigurationError(
                    f"key {self.stream!r} exists and is not a stream: {exc}"
                ) from exc
            raise
        return True
