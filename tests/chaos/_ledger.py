"""The verifiable-consumer ledger of a chaos scenario.

Every message a chaos producer publishes carries a sequence number (``seq``).
The producer appends a seq to its log only after Redis acknowledged the
publish; a consumer appends ``seq id delivery_count`` to its own log when its
handler finishes, before the acknowledgement. The logs are plain files written
with one ``write`` per line on an ``O_APPEND`` descriptor, so they outlive any
process or server the scenario kills, and a killed writer leaves at most one
incomplete last line (ignored).

:func:`audit` then says, by seq, what the README promises: every acknowledged
publish handled at least once or sitting in the dead-letter stream with a
reason (``lost`` must be 0), how many deliveries were duplicates (a producer's
retries and a consumer killed between its handler and its ack both make some),
and whether the group's pending list is empty.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio

from redcurrent import Topic

__all__ = [
    "CHAOS_TYPE",
    "Audit",
    "LineLog",
    "audit",
    "handled_log",
    "handled_rows",
    "published_log",
    "read_handled",
    "read_published",
    "write_report",
]

CHAOS_TYPE = "chaos"
"""The message type chaos producers publish; the payload is ``{"seq": n, ...}``."""


class LineLog:
    """An append-only file of lines, each written by one ``os.write``.

    No buffering in Python: once :meth:`add` returns, the line is in the
    kernel's page cache and survives a SIGKILL of this process.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def add(self, *fields: object) -> None:
        os.write(self._fd, (" ".join(map(str, fields)) + "\n").encode())

    def add_many(self, rows: Iterable[tuple[object, ...]]) -> None:
        text = "".join(" ".join(map(str, row)) + "\n" for row in rows)
        if text:
            os.write(self._fd, text.encode())

    def close(self) -> None:
        os.close(self._fd)


def published_log(root: Path, producer: str) -> LineLog:
    """The log of seqs whose publish Redis acknowledged."""
    return LineLog(root / f"published-{producer}.log")


def handled_log(root: Path, consumer: str) -> LineLog:
    """A consumer process's log of finished handler calls (one file per process)."""
    return LineLog(root / f"handled-{consumer}-{os.getpid()}.log")


def _lines(paths: Iterable[Path]) -> Iterator[list[str]]:
    for path in sorted(paths):
        text = path.read_text()
        complete = text if text.endswith("\n") else text.rsplit("\n", 1)[0]
        for line in complete.splitlines():
            if line:
                yield line.split(" ")


def read_published(root: Path) -> set[int]:
    return {int(row[0]) for row in _lines(root.glob("published-*.log"))}


def handled_rows(root: Path) -> Iterator[tuple[str, list[str]]]:
    """Every finished handler call as ``(log name, fields)``: the log name
    (``handled-<consumer>-<pid>``) tells which process ran it; the fields are
    ``seq id delivery_count`` and, from a ``timed`` worker, the wall-clock
    times the handler started and finished."""
    for path in sorted(root.glob("handled-*.log")):
        for row in _lines([path]):
            yield path.stem, row


def read_handled(root: Path) -> Counter[int]:
    """How many times each seq was handled, over all consumer processes."""
    return Counter(int(row[0]) for row in _lines(root.glob("handled-*.log")))


@dataclass
class Audit:
    """What one scenario did, by seq (see the module docstring)."""

    scenario: str
    published: int
    """Distinct seqs whose publish Redis acknowledged."""
    handled: int
    """Distinct seqs some handler finished."""
    deliveries: int
    """Finished handler calls in all."""
    duplicates: int
    """``deliveries - handled``: handler calls beyond the first for a seq."""
    dead_letters: int
    """Distinct seqs in the dead-letter stream (each with a reason)."""
    lost: int
    """Acknowledged seqs neither handled nor dead-lettered. Must be 0."""
    pending: int
    """Entries left in the group's pending list. Must be 0."""
    recovery_s: float | None = None
    """Seconds from the last fault to an empty pending list."""
    lag: int | None = None
    """Entries of the stream the group has not read yet (should be 0)."""
    faults: list[str] = field(default_factory=list)
    lost_sample: list[int] = field(default_factory=list)
    dead_reasons: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    """Figures particular to one scenario (say, losses a failover may cause)."""

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.pending == 0

    def row(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.1f}s"
        return (
            f"{self.scenario}: published={self.published} handled={self.handled} "
            f"duplicates={self.duplicates} dead_letters={self.dead_letters} "
            f"lost={self.lost} pending={self.pending} lag={self.lag} recovery={recovery}"
            + "".join(f" {key}={value}" for key, value in self.extra.items())
        )


async def _dead_seqs(topic: Topic) -> tuple[set[int], Counter[str]]:
    seqs: set[int] = set()
    reasons: Counter[str] = Counter()
    start = "-"
    while True:
        page = await topic.dead_letters(1000, start=start)
        for letter in page:
            reasons[letter.reason.split(":", 1)[0][:60]] += 1
            if isinstance(letter.data, dict) and isinstance(letter.data.get("seq"), int):
                seqs.add(letter.data["seq"])
        if len(page) < 1000:
            return seqs, reasons
        last = page[-1].id
        ms, seq = last.split("-")
        start = f"{ms}-{int(seq) + 1}"


async def audit(
    scenario: str,
    root: Path,
    client: redis.asyncio.Redis,
    stream: str,
    group: str,
    *,
    recovery_s: float | None = None,
    faults: Iterable[str] = (),
    extra: dict[str, Any] | None = None,
) -> Audit:
    """Compare the logs under ``root`` with the topic's state in Redis."""
    published = read_published(root)
    handled = read_handled(root)
    topic = Topic(client, stream)
    dead, reasons = await _dead_seqs(topic)
    summary = await client.xpending(stream, group)
    lags = [g.lag for g in (await topic.info()).groups if g.name == group]
    lost = sorted(published - set(handled) - dead)
    return Audit(
        scenario=scenario,
        published=len(published),
        handled=len(handled),
        deliveries=sum(handled.values()),
        duplicates=sum(handled.values()) - len(handled),
        dead_letters=len(dead),
        lost=len(lost),
        pending=int(summary["pending"]),
        recovery_s=recovery_s,
        lag=lags[0] if lags else None,
        faults=list(faults),
        lost_sample=lost[:20],
        dead_reasons=dict(reasons),
        extra=dict(extra or {}),
    )


def write_report(path: Path, result: Audit) -> None:
    """Add ``result`` to the JSON report at ``path`` (one object per scenario)."""
    rows: dict[str, Any] = {}
    if path.exists():
        rows = json.loads(path.read_text())
    rows[result.scenario] = {**result.row(), "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    path.write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
