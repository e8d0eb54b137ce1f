"""Single-server faults that hit processes: consumers and the Redis server.

``consumer-kills``: three consumer processes and a paced producer; five
consumer processes are SIGKILLed while they hold entries (a batch handler and
handlers with a small delay, so kills land mid-handling) and restarted,
alternately under the old name (it finishes its own pending entries first) and
under a new one (its predecessor's entries must be claimed by the others).

``server-kills``: the same fleet while the server is SIGKILLed and restarted
from its fsync-always AOF twice, then frozen with SIGSTOP longer than the
clients' socket timeout. Consumers and producer ride it out without exiting.

Each kill is made to land mid-work: the scenario waits until the victim holds
entries (the victim's or the group's pending list) and checks it right before
or after the kill, so a scenario cannot pass with faults that hit idle
processes. At the end every acknowledged publish is handled or dead-lettered,
the group's pending list is empty and its lag 0. ``recovery_s`` is the time
from the last fault to the first moment the group had caught up (nothing
pending, lag 0) while the producer still published.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio
from _ledger import Audit, _dead_seqs, audit, read_handled, read_published
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

from conftest import spawn
from helpers import wait_until
from redcurrent import Topic
from redcurrent.testing import RedisServer

STREAM = "chaos"
GROUP = "verify"
CLAIM_IDLE = 1.5
PROGRESS_POLL = 0.2


@dataclass(frozen=True)
class Scale:
    messages: int
    chunk: int
    pause: float
    """Seconds the producer waits between chunks: it must still publish when
    the last fault lands."""


def _scale(full: bool) -> Scale:
    return Scale(100_000, 100, 0.08) if full else Scale(8_000, 50, 0.12)


def _progress(scale: Scale, k: int, faults: int) -> int:
    """Acknowledged publishes before fault ``k``: spread evenly, the last at
    85 %, so that the producer still runs through every fault."""
    return int(scale.messages * 0.85 * (k + 1) / faults)


class Fleet:
    """The processes of a scenario: started, waited for, and always reaped."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def spawn(self, script: str, options: dict[str, Any], tag: str) -> subprocess.Popen[bytes]:
        log = self.dir / f"{tag}-{len(self.procs)}.out"
        proc = spawn(script, options, log)
        self.procs.append((proc, log))
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        for candidate, log in self.procs:
            if candidate is proc:
                return log.read_text(errors="replace")
        raise KeyError(proc)

    async def worker(self, options: dict[str, Any]) -> subprocess.Popen[bytes]:
        """Start a consumer process and wait until it runs."""
        proc = self.spawn("_worker.py", options, options["name"])
        await wait_until(
            lambda: proc.poll() is not None or "ready" in self.output(proc).splitlines(),
            timeout=60,
        )
        assert proc.poll() is None, self.output(proc)
        return proc

    def reap(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


async def held_by(client: redis.asyncio.Redis, consumer: str) -> list[str]:
    """Ids in the group's pending list that ``consumer`` holds."""
    rows = await client.xpending_range(
        STREAM, GROUP, min="-", max="+", count=100_000, consumername=consumer
    )
    return [r["message_id"].decode() for r in rows]


async def group_pending(client: redis.asyncio.Redis) -> int:
    return int((await client.xpending(STREAM, GROUP))["pending"])


async def caught_up(topic: Topic) -> bool:
    """The user's view of "done": nothing pending and nothing left to deliver."""
    info = await topic.info()
    group = next(g for g in info.groups if g.name == GROUP)
    return group.pending == 0 and group.lag == 0


def published_count(root: Path) -> int:
    """Acknowledged publishes so far (lines of the producers' logs)."""
    return sum(p.read_bytes().count(b"\n") for p in root.glob("published-*.log"))


def redelivered_ids(root: Path) -> set[str]:
    """Ids some handler finished on a second or later delivery."""
    ids: set[str] = set()
    for path in root.glob("handled-*.log"):
        for line in path.read_text().splitlines():
            fields = line.split(" ")
            if len(fields) >= 3 and fields[2].isdigit() and int(fields[2]) > 1:
                ids.add(fields[1])
    return ids


async def check(result: Audit, client: redis.asyncio.Redis, root: Path) -> None:
    """What the README promises, seq by seq: every acknowledged publish was
    handled at least once or is a dead letter with a reason; nothing pending."""
    assert result.lost == 0, result
    assert result.pending == 0, result
    unhandled = read_published(root) - set(read_handled(root))
    if unhandled:
        dead, _ = await _dead_seqs(Topic(client, STREAM))
        assert unhandled <= dead, sorted(unhandled - dead)[:20]


def worker_options(server: RedisServer, root: Path, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "url": server.url,
        "stream": STREAM,
        "group": GROUP,
        "name": name,
        "root": str(root),
        "claim_idle": CLAIM_IDLE,
        "block": 0.5,
        "concurrency": 16,
        **extra,
    }


#: The three consumer slots: a batch handler and two handlers that take a
#: little while, so that a kill finds messages in the middle of a handler.
SLOTS: list[dict[str, Any]] = [
    {"batch": 20, "delay": 0.02},
    {"delay": 0.005},
    {"delay": 0.002},
]


def producer_options(server: RedisServer, root: Path, scale: Scale, **extra: Any) -> dict[str, Any]:
    return {
        "url": server.url,
        "stream": STREAM,
        "root": str(root),
        "name": "p0",
        "first": 0,
        "count": scale.messages,
        "chunk": scale.chunk,
        "pause": scale.pause,
        **extra,
    }


async def recovered(topic: Topic, since: float) -> float:
    """Seconds from ``since`` (the last fault) to the first moment the group
    has caught up: nothing pending, nothing unread. The producer still runs,
    so this is the moment the consumers have absorbed the fault and keep up
    again, not the end of the publishing."""
    await wait_until(lambda: caught_up(topic), timeout=600, interval=0.02)
    return time.monotonic() - since


async def finish(
    fleet: Fleet,
    producer: subprocess.Popen[bytes],
    topic: Topic,
    patience: float,
) -> str:
    """Wait for the producer to publish everything, then for the group to
    drain; returns the producer's report line."""
    await wait_until(lambda: producer.poll() is not None, timeout=patience, interval=0.1)
    out = fleet.output(producer)
    assert producer.returncode == 0, out
    assert "done" in out, out
    await wait_until(lambda: caught_up(topic), timeout=patience, interval=0.1)
    return out.strip().splitlines()[-1]


@pytest.mark.timeout(1200)
async def test_consumer_kills(
    private_redis: RedisServer,
    ledger_root: Path,
    tmp_path: Path,
    full_scale: bool,
    record: Any,
) -> None:
    scale = _scale(full_scale)
    server = private_redis
    client = redis.asyncio.Redis.from_url(server.url)
    topic = Topic(client, STREAM)
    fleet = Fleet(tmp_path)
    faults: list[str] = []
    held_at_death: list[set[str]] = []
    try:
        names = [f"c{slot}" for slot in range(len(SLOTS))]
        workers = [
            await fleet.worker(worker_options(server, ledger_root, name, **SLOTS[slot]))
            for slot, name in enumerate(names)
        ]
        producer = fleet.spawn("_producer.py", producer_options(server, ledger_root, scale), "p0")
        started = time.monotonic()
        last_fault = started
        kills = 5
        for k in range(kills):
            goal = _progress(scale, k, kills)
            await wait_until(
                lambda goal=goal: published_count(ledger_root) >= goal,
                timeout=600,
                interval=PROGRESS_POLL,
            )
            assert producer.poll() is None, "the producer finished before the faults"
            slot = k % len(SLOTS)
            victim = names[slot]
            await wait_until(
                lambda victim=victim: _holds(client, victim), timeout=60, interval=0.005
            )
            workers[slot].kill()
            workers[slot].wait()
            last_fault = time.monotonic()
            held = await held_by(client, victim)
            if held:
                held_at_death.append(set(held))
            # else: it acknowledged what it held between the look and the
            # SIGKILL (acks go out within milliseconds): a kill that tests no
            # recovery path, counted below.
            # Alternately a new name (the others must claim what the dead one
            # held, after claim_idle) and the old one (it finishes its own
            # entries first). The last kill takes the slower path, claims.
            successor = f"c{slot}-r{k}" if k % 2 == 0 else victim
            names[slot] = successor
            workers[slot] = await fleet.worker(
                worker_options(server, ledger_root, successor, **SLOTS[slot])
            )
            faults.append(
                f"{last_fault - started:.1f}s SIGKILL {victim} holding {len(held)}"
                f" -> restarted as {successor}, ready after {time.monotonic() - last_fault:.1f}s"
            )
        recovery = await recovered(topic, last_fault)
        line = await finish(fleet, producer, topic, patience=900)
        faults.append(f"producer: {line}")
        for worker in workers:
            assert worker.poll() is None, fleet.output(worker)
        again = redelivered_ids(ledger_root)
        redelivered = [len(held & again) for held in held_at_death]
        faults.append(
            f"redelivered and handled of what each victim held: {redelivered}"
            f" of {[len(held) for held in held_at_death]}"
        )
        result = record(
            await audit(
                "consumer-kills",
                ledger_root,
                client,
                STREAM,
                GROUP,
                recovery_s=recovery,
                faults=faults,
            )
        )
        await check(result, client, ledger_root)
        # What each victim held went through a recovery path (its own
        # pending entries on a restart under its name, claims by the others
        # after a restart under a new one) and was handled again.
        assert all(redelivered), faults
        assert len(held_at_death) >= kills - 2, f"most kills must find messages held: {faults}"
    finally:
        fleet.reap()
        await client.aclose()


async def _holds(client: redis.asyncio.Redis, consumer: str) -> bool:
    rows = await client.xpending_range(
        STREAM, GROUP, min="-", max="+", count=1, consumername=consumer
    )
    return bool(rows)


@pytest.mark.timeout(1200)
async def test_server_kills(
    private_redis: RedisServer,
    ledger_root: Path,
    tmp_path: Path,
    full_scale: bool,
    record: Any,
) -> None:
    scale = _scale(full_scale)
    server = private_redis
    timeouts = {"socket_timeout": 1.0}
    # The scenario's own client reconnects after each restart.
    client = redis.asyncio.Redis.from_url(
        server.url,
        socket_timeout=5.0,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 20),
        retry_on_error=[ConnectionError, TimeoutError],
    )
    topic = Topic(client, STREAM)
    fleet = Fleet(tmp_path)
    faults: list[str] = []
    frozen = False
    try:
        workers = [
            await fleet.worker(worker_options(server, ledger_root, f"c{slot}", **opts, **timeouts))
            for slot, opts in enumerate(SLOTS)
        ]
        producer = fleet.spawn(
            "_producer.py", producer_options(server, ledger_root, scale, **timeouts), "p0"
        )
        started = time.monotonic()
        schedule = ["kill", "kill", "freeze"]
        last_fault = started
        for k, fault in enumerate(schedule):
            goal = _progress(scale, k, len(schedule))
            await wait_until(
                lambda goal=goal: published_count(ledger_root) >= goal,
                timeout=600,
                interval=PROGRESS_POLL,
            )
            assert producer.poll() is None, "the producer finished before the faults"
            await wait_until(lambda: _group_holds(client), timeout=60, interval=0.005)
            held = await group_pending(client)
            assert held, "nothing was in flight at the fault"
            at = time.monotonic() - started
            if fault == "kill":
                server.kill()
                await anyio.sleep(1.0)  # down for a while, under load
                await anyio.to_thread.run_sync(server.restart)
                last_fault = time.monotonic()
                faults.append(f"{at:.1f}s SIGKILL server with {held} pending; restarted")
            else:
                pid = server.pid
                assert pid is not None
                os.kill(pid, signal.SIGSTOP)
                frozen = True
                await anyio.sleep(3.0)  # three socket timeouts
                os.kill(pid, signal.SIGCONT)
                frozen = False
                last_fault = time.monotonic()
                faults.append(f"{at:.1f}s SIGSTOP server 3s with {held} pending; SIGCONT")
        recovery = await recovered(topic, last_fault)
        line = await finish(fleet, producer, topic, patience=900)
        faults.append(f"producer: {line}")
        for worker in workers:
            assert worker.poll() is None, fleet.output(worker)
        result = record(
            await audit(
                "server-kills",
                ledger_root,
                client,
                STREAM,
                GROUP,
                recovery_s=recovery,
                faults=faults,
            )
        )
        await check(result, client, ledger_root)
    finally:
        if frozen and server.pid is not None:
            os.kill(server.pid, signal.SIGCONT)
        fleet.reap()
        await client.aclose()


async def _group_holds(client: redis.asyncio.Redis) -> bool:
    return await group_pending(client) > 0
