"""Lag and pending of consumer groups as Redis counts them, for exporters.

The figures are the group's, not this process's share: every process that
reads them exports the same numbers, which is what an autoscaler needs. They
are read with one ``XINFO GROUPS`` per stream (plus :func:`topic_info`'s
counting where the server gives no lag: Redis < 7, or after deletions), cached
for ``max_age`` seconds.

Exporters collect synchronously, in a thread of their own (an HTTP server's)
or on an event loop (an ASGI app). A refresh runs on the loop of a running
consumer of the stream, with that consumer's client, submitted from the
reading thread when the cached figures are older than ``max_age``; the reader
waits for it at most ``wait`` seconds, then serves what it has. A reader on
that very loop cannot wait for it (the refresh would run only after the reader
returned): it serves what it has and the refresh lands for the next read. So
no read blocks for long whatever Redis does, nothing is sent while nobody
reads, and the figures carry the time they were read at, for an age gauge.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import anyio
from redis import exceptions as rex

from ._faults import Fault, classify
from ._info import topic_info
from ._keys import TopicKeys
from ._redis import AnyRedis, as_str
from ._tally import ConsumerTally, Running

__all__ = ["REFRESH_DEADLINE", "GroupFigures", "GroupWatch", "StreamReading", "read_groups"]

log = logging.getLogger("redcurrent.metrics")

#: how long one refresh may take on the consumer's loop before it is given up.
REFRESH_DEADLINE: Final = 10.0


@dataclass(frozen=True)
class GroupFigures:
    lag: int | None  #: None: the server gave none and counting would be too long
    pending: int


@dataclass(frozen=True)
class StreamReading:
    groups: Mapping[str, GroupFigures]
    read_at: float  #: ``time.monotonic()`` when the reply came


@dataclass(frozen=True)
class Watched:
    """What a read returns for one stream consumed in this process."""

    groups: frozenset[str]  #: the groups consumed here
    reading: StreamReading | None  #: None until a refresh succeeded


def _field(row: Mapping[Any, Any], name: str) -> Any:
    """A field of an XINFO GROUPS row, whose keys are str (RESP2) or bytes (RESP3)."""
    return row[name] if name in row else row.get(name.encode())


async def read_groups(redis: AnyRedis, stream: str) -> dict[str, GroupFigures]:
    """Every group of ``stream`` (none when the stream does not exist)."""
    try:
        rows = await redis.xinfo_groups(stream)
    except rex.ResponseError as exc:
        if classify(exc) is Fault.GONE:
            return {}
        raise
    if all(_field(row, "lag") is not None for row in rows):
        return {
            as_str(_field(row, "name")): GroupFigures(
                lag=int(_field(row, "lag")), pending=int(_field(row, "pending"))
            )
            for row in rows
        }
    info = await topic_info(redis, TopicKeys(stream))
    return {g.name: GroupFigures(lag=g.lag, pending=g.pending) for g in info.groups}


class GroupWatch:
    """The figures of the streams this process consumes, readable from any thread."""

    def __init__(self, tally: ConsumerTally, *, max_age: float, wait: float) -> None:
        self._tally = tally
        self._max_age = max_age
        self._wait = wait
        self._lock = threading.Lock()
        self._readings: dict[str, StreamReading] = {}
        self._refreshing: dict[str, concurrent.futures.Future[None]] = {}
        self._failing: set[str] = set()

    def read(self) -> dict[str, Watched]:
        """Per stream consumed here: its groups and the latest figures,
        refreshed first (waiting at most ``wait``) when older than ``max_age``."""
        streams: dict[str, tuple[Running | None, set[str]]] = {}
        for entry in self._tally.running():
            consumer = entry.consumer
            borrowed, groups = streams.setdefault(consumer.stream, (None, set()))
            groups.add(consumer.group)
            if borrowed is None and entry.loop is not None and not entry.loop.is_closed():
                streams[consumer.stream] = (entry, groups)
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        waits: list[concurrent.futures.Future[None]] = []
        now = time.monotonic()
        with self._lock:
            for gone in set(self._readings) - set(streams):
                del self._readings[gone]
            for stream, (borrowed, _) in streams.items():
                if borrowed is None or not self._stale(stream, now):
                    continue
                future = self._refreshing.get(stream)
                if future is None or future.done():
                    future = self._submit(stream, borrowed)
                    if future is None:
                        continue
                    self._refreshing[stream] = future
                if borrowed.loop is not here:
                    waits.append(future)
        if waits and self._wait > 0:
            concurrent.futures.wait(waits, timeout=self._wait)
        with self._lock:
            return {
                stream: Watched(frozenset(groups), self._readings.get(stream))
                for stream, (_, groups) in streams.items()
            }

    def _stale(self, stream: str, now: float) -> bool:
        reading = self._readings.get(stream)
        return reading is None or now - reading.read_at >= self._max_age

    def _submit(self, stream: str, borrowed: Running) -> concurrent.futures.Future[None] | None:
        assert borrowed.loop is not None
        # The consumer's own client: bytes, on the consumer's loop (an asyncio
        # client's connections belong to the loop that opened them).
        redis = borrowed.consumer._run.redis
        refresh = self._refresh(stream, redis)
        try:
            return asyncio.run_coroutine_threadsafe(refresh, borrowed.loop)
        except RuntimeError:  # the loop closed meanwhile
            refresh.close()
            return None

    async def _refresh(self, stream: str, redis: AnyRedis) -> None:
        try:
            with anyio.fail_after(REFRESH_DEADLINE):
                groups = await read_groups(redis, stream)
        except Exception as exc:  # stale figures are served; their age tells
            with self._lock:
                first = stream not in self._failing
                self._failing.add(stream)
            # Once per failing streak: a scrape every few seconds must not
            # flood the log while Redis is down (the consumers report that).
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "reading the groups of stream %r for metrics failed (%s: %s); "
                "serving the last figures",
                stream,
                type(exc).__name__,
                exc,
            )
            return
        reading = StreamReading(groups, time.monotonic())
        with self._lock:
            self._readings[stream] = reading
            self._failing.discard(stream)
