"""The consumers of this process, summed per stream and group, for exporters.

A consumer observer: it learns of each consumer as it starts (with the event
loop it runs on, which :mod:`redcurrent._group_figures` borrows) and as it
stops. Totals are read from each running consumer's ``stats`` when asked
(nothing is counted per message) plus what the stopped ones had counted, so
they never go down when a consumer stops or is replaced: what a Prometheus
counter must guarantee.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._consumer import StreamConsumer
    from ._message import ConsumerStats

__all__ = ["COUNTED", "ConsumerTally", "GroupTotals", "Running"]

#: the monotonic fields of :class:`ConsumerStats`.
COUNTED = ("received", "handled", "failed", "claimed", "retried", "dead_lettered")


@dataclass
class GroupTotals:
    """One stream and group in this process: counters since the tally began,
    and what its running consumers hold now."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTED, 0))
    consumers: int = 0
    running: int = 0
    held: int = 0

    def add(self, stats: ConsumerStats) -> None:
        for name in COUNTED:
            self.counts[name] += getattr(stats, name)


@dataclass(frozen=True)
class Running:
    consumer: StreamConsumer
    #: the loop it runs on; None where there is no asyncio loop to borrow.
    loop: asyncio.AbstractEventLoop | None


class ConsumerTally:
    """A :class:`~redcurrent._instrument.ConsumerObserver`; safe to read from
    any thread (an exporter's) while consumers start and stop on theirs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[int, Running] = {}
        self._retired: dict[tuple[str, str], GroupTotals] = {}

    def started(self, consumer: StreamConsumer) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - another anyio backend
            loop = None
        with self._lock:
            self._running[id(consumer)] = Running(consumer, loop)

    def stopped(self, consumer: StreamConsumer) -> None:
        with self._lock:
            self._retire(id(consumer))

    def _retire(self, key: int) -> None:
        """Under the lock: keep what a stopped consumer counted (its stats are
        final once it is done)."""
        found = self._running.pop(key, None)
        if found is None:
            return
        consumer = found.consumer
        totals = self._retired.setdefault((consumer.stream, consumer.group), GroupTotals())
        totals.add(consumer.stats)

    def _retire_finished(self) -> None:
        # A host that cancels a consumer's task group may skip ``stopped``:
        # a consumer that is done counts as stopped all the same.
        for key, entry in list(self._running.items()):
            if entry.consumer.stop_reason is not None:
                self._retire(key)

    def running(self) -> list[Running]:
        with self._lock:
            self._retire_finished()
            return list(self._running.values())

    def totals(self) -> dict[tuple[str, str], GroupTotals]:
        """Per (stream, group): stopped consumers' counts plus running ones'."""
        with self._lock:
            self._retire_finished()
            result: dict[tuple[str, str], GroupTotals] = {}
            for key, retired in self._retired.items():
                result[key] = GroupTotals(counts=dict(retired.counts))
            for entry in self._running.values():
                consumer = entry.consumer
                stats = consumer.stats
                totals = result.setdefault((consumer.stream, consumer.group), GroupTotals())
                totals.add(stats)
                totals.consumers += 1
                totals.running += stats.running
                totals.held += stats.held
            return result
