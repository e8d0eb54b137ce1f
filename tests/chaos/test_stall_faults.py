"""Stalls: handlers far slower than ``claim_idle``, and a consumer frozen.

``long-handler``: two consumers hold hundreds of messages each, every
handler running four times ``claim_idle``, while the other polls with
XAUTOCLAIM: the leases must hold, so no message is handled twice and every
delivery is a first one.

``frozen-consumer``: one of three consumers is frozen (SIGSTOP) while it
holds messages, for longer than ``claim_idle``: the others take its messages
over and handle them. Thawed (SIGCONT), it must notice it lost them, neither
hand them to its handler again once it knows nor acknowledge them for the
others, and go on consuming new messages. A handler that was already running
when the process froze finishes when it thaws: those duplicates are
at-least-once working as documented, and are counted apart.
"""

from __future__ import annotations

import signal
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from _fleet import Fleet, Proc, drained
from _ledger import audit, handled_rows, read_published

from helpers import consumer_names, pel_of, wait_until
from redcurrent.testing import RedisServer

GROUP = "workers"

pytestmark = pytest.mark.timeout(900)


def _worker_of(log_name: str) -> str:
    """``handled-<consumer>-<pid>`` -> consumer name."""
    return log_name.split("-")[1]


async def test_long_handler_keeps_its_lease(
    private_redis: RedisServer,
    ledger_root: Path,
    tmp_path: Path,
    full_scale: bool,
    record: Any,
) -> None:
    stream = "chaos-long"
    count = 6_000 if full_scale else 1_500
    claim_idle, delay, concurrency = 1.0, 4.0, 300
    async with redis.asyncio.Redis.from_url(private_redis.url) as admin:
        with Fleet(ledger_root, tmp_path, stream=stream, group=GROUP) as fleet:
            options = {
                "url": private_redis.url,
                "claim_idle": claim_idle,
                "delay": delay,
                "concurrency": concurrency,
                "block": 0.5,
            }
            workers = [fleet.worker(f"slow{i}", **options) for i in range(2)]
            await wait_until(lambda: fleet.ready(*workers), timeout=60, interval=0.1)
            producer = fleet.producer(
                "p", url=private_redis.url, first=0, count=count, chunk=100, pause=0.2
            )
            peak: Counter[str] = Counter()

            async def published_all_and_watched() -> bool:
                for name, held in (await consumer_names(admin, stream, GROUP)).items():
                    peak[name] = max(peak[name], held)
                return fleet.finished(producer)

            await wait_until(published_all_and_watched, timeout=300, interval=0.1)
            published_at = time.monotonic()

            async def done_and_watched() -> bool:
                await published_all_and_watched()
                return await drained(admin, ledger_root, stream, GROUP)

            await wait_until(done_and_watched, timeout=600, interval=0.25)
            recovery = time.monotonic() - published_at
            lost_lease = [p.name for p in workers if "lost" in p.output()]

        result = record(
            await audit(
                "long-handler",
                ledger_root,
                admin,
                stream,
                GROUP,
                recovery_s=recovery,
                faults=[f"handlers of {delay}s, claim_idle={claim_idle}s"],
                extra={"peak_held": dict(peak)},
            )
        )
    counts = Counter(int(row[2]) for _, row in handled_rows(ledger_root))
    # Hundreds held at once by each, each for several claim_idle periods.
    assert min(peak[w.name] for w in workers) >= concurrency, peak
    assert result.duplicates == 0, result
    assert counts == {1: result.deliveries}, counts
    assert not lost_lease, lost_lease
    assert result.lost == 0, result
    assert result.pending == 0, result
    assert result.lag == 0, result


async def _held_by(admin: redis.asyncio.Redis, stream: str, name: str) -> set[str]:
    return {i for i, (owner, _, _) in (await pel_of(admin, stream, GROUP)).items() if owner == name}


def _handled_ids(root: Path, *, exclude: str) -> set[str]:
    return {row[1] for log, row in handled_rows(root) if _worker_of(log) != exclude}


def _log_times(proc: Proc, needle: str) -> list[float]:
    """Wall-clock times of the log lines of ``proc`` that contain ``needle``."""
    times = []
    for line in proc.output().splitlines():
        if needle in line and line[:4].isdigit():
            stamp, millis = line[:23].split(",")
            times.append(
                time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
            )
    return times


async def test_frozen_consumer_loses_its_messages_to_the_others(
    private_redis: RedisServer,
    ledger_root: Path,
    tmp_path: Path,
    full_scale: bool,
    record: Any,
) -> None:
    stream = "chaos-frozen"
    count = 40_000 if full_scale else 6_000
    half = count // 2
    claim_idle = 1.0
    async with redis.asyncio.Redis.from_url(private_redis.url) as admin:
        with Fleet(ledger_root, tmp_path, stream=stream, group=GROUP) as fleet:
            options = {
                "url": private_redis.url,
                "claim_idle": claim_idle,
                "delay": 0.05,
                "concurrency": 16,
                "block": 0.5,
                "timed": True,
            }
            frozen, *others = [fleet.worker(f"w{i}", **options) for i in range(3)]
            await wait_until(lambda: fleet.ready(frozen, *others), timeout=60, interval=0.1)
            first = fleet.producer("p1", url=private_redis.url, first=0, count=half, chunk=100)

            # Freeze it while it holds messages, some of them running.
            async def holds_plenty() -> bool:
                fleet.check()
                return len(await _held_by(admin, stream, frozen.name)) >= 100

            await wait_until(holds_plenty, timeout=60, interval=0.01)
            frozen.popen.send_signal(signal.SIGSTOP)
            frozen_at = time.time()
            held = await _held_by(admin, stream, frozen.name)
            assert held, "the frozen consumer held nothing"

            # The others take everything it held over, and handle it.
            async def taken_and_handled() -> bool:
                fleet.check()
                if await _held_by(admin, stream, frozen.name):
                    return False
                return held <= _handled_ids(ledger_root, exclude=frozen.name)

            await wait_until(taken_and_handled, timeout=120, interval=0.1)
            frozen_for = time.time() - frozen_at
            frozen.popen.send_signal(signal.SIGCONT)
            thawed_at = time.time()
            thawed_mono = time.monotonic()

            # New messages after the thaw: the thawed consumer takes part.
            await wait_until(lambda: fleet.finished(first), timeout=300, interval=0.1)
            second = fleet.producer(
                "p2", url=private_redis.url, first=half, count=count - half, chunk=100, pause=0.02
            )
            await wait_until(lambda: fleet.finished(second), timeout=300, interval=0.1)
            await wait_until(
                lambda: fleet.check() or drained(admin, ledger_root, stream, GROUP),
                timeout=300,
                interval=0.25,
            )
            recovery = time.monotonic() - thawed_mono
            noticed = _log_times(frozen, "lost")
            acked_for_others = [p.name for p in others if "lost" in p.output()]

        # Who handled what, and when (``timed`` rows: seq id count start end).
        by_seq: dict[int, list[tuple[str, float, float]]] = defaultdict(list)
        for log, row in handled_rows(ledger_root):
            by_seq[int(row[0])].append((_worker_of(log), float(row[3]), float(row[4])))
        # The lease refreshes after the thaw report what was lost, in one or
        # more warnings (each names only its first ids): every loss is known
        # once the last of them is logged.
        knew_at = noticed[-1] if noticed else float("inf")
        unacked_when_frozen = running_when_frozen = 0
        started_before_known = started_after_known = 0
        for calls in by_seq.values():
            if len(calls) < 2:
                continue
            for name, began, ended in calls:
                if name != frozen.name:
                    continue
                # A frozen process starts and finishes nothing: each time is
                # before the freeze or after the thaw.
                if ended < frozen_at:
                    unacked_when_frozen += 1  # handled, its ack not sent yet
                elif began < frozen_at:
                    running_when_frozen += 1
                elif began < knew_at:
                    started_before_known += 1
                else:
                    started_after_known += 1
        new_after_thaw = sum(
            1
            for seq, calls in by_seq.items()
            if seq >= half and any(n == frozen.name and b > frozen_at for n, b, _ in calls)
        )
        result = record(
            await audit(
                "frozen-consumer",
                ledger_root,
                admin,
                stream,
                GROUP,
                recovery_s=recovery,
                faults=[f"SIGSTOP {frozen_for:.1f}s holding {len(held)}"],
                extra={
                    "held_when_frozen": len(held),
                    "dup_unacked_when_frozen": unacked_when_frozen,
                    "dup_running_when_frozen": running_when_frozen,
                    "dup_started_before_loss_known": started_before_known,
                    "dup_started_after_loss_known": started_after_known,
                    "loss_known_after_s": round(knew_at - thawed_at, 3) if noticed else None,
                    "loss_reports": len(noticed),
                    "new_handled_after_thaw": new_after_thaw,
                    "peers_that_lost_entries": acked_for_others,
                },
            )
        )
    assert len(read_published(ledger_root)) == count
    assert noticed, "the thawed consumer did not notice it lost its messages"
    # Workers wait for a lease refresh after a stall past claim_idle: nothing
    # lost is started, before or after the loss is reported.
    assert started_before_known == 0, result
    assert started_after_known == 0, result
    assert not acked_for_others, result
    assert new_after_thaw > 0, result
    assert result.lost == 0, result
    assert result.pending == 0, result
    assert result.lag == 0, result
