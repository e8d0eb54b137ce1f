"""Consumer throughput of redcurrent beside FastStream, taskiq-redis, streaq and a raw loop.

Usage::

    pip install -e '.[bench]' -r benchmarks/requirements-compare.txt
    python benchmarks/compare.py                       # 20,000 messages, median of 3
    python benchmarks/compare.py --count 20000 --repeat 3 --write-docs

One run, one private ``redis-server`` (``_common.private_redis_url``; a shared server is
never touched). Every system consumes the same backlog of ``--count`` messages (the same
small JSON dict) from a Redis stream with a consumer group, calls a no-op async handler
per message and acknowledges it (``XACK``); the time runs from just before the consumer
is started until the server shows the last message acknowledged (the group's
last-delivered id is the stream's last id and ``XPENDING`` is 0). Systems and
concurrencies take turns in every repetition after a warm-up round; medians are
reported with their ratios to the raw redis-py loop (same concurrency, and concurrency 1),
the server's commands per message and the lag from the last handler call to the last ack.

Each system reads entries written by its own publisher (formats differ): the backlog is
published once into a template stream and copied (``COPY``) for every run; streaq keeps
each task's data beside the stream, so its tasks are enqueued again before every run
(outside the timing). A peer that is not installed or fails is reported as such, the
others still run. Not part of CI: peers are not project dependencies.

``--write-docs`` writes ``docs/comparison.md`` (figures, machine, the features table).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.metadata
import logging
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import redis.asyncio as aredis
from redis.exceptions import RedisError

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import GROUP, PAYLOAD, RAW_COUNT, ROOT, TYPE, median, private_redis_url, ratio

DOCS_PAGE = ROOT / "docs" / "comparison.md"
CONCURRENCIES = (1, 16)
#: Warm-up round: imports, connections, first code paths; not reported.
WARM_COUNT = 2_000
#: How often the ack watcher asks the server once every handler has run.
POLL_S = 0.001

_decode = msgspec.json.decode


class Sink:
    """The no-op handler's counter: fires ``done`` at the ``target``-th call."""

    def __init__(self, target: int) -> None:
        self.n = 0
        self.target = target
        self.done = anyio.Event()

    def hit(self) -> None:
        self.n += 1
        if self.n >= self.target:
            self.done.set()


#: The sink of the run in progress; every handler looks it up when called.
_SINK = Sink(0)


@dataclass
class Backlog:
    """One run's stream: ``n`` unacknowledged entries for ``group``, ending at ``last_id``."""

    stream: str
    group: str
    last_id: bytes
    n: int
    #: streaq's queue name.
    queue: str = ""
    #: A key pattern of what the run leaves beside the stream (streaq's task keys).
    extra: str = ""


async def _last_id(client: aredis.Redis, stream: str) -> bytes:
    info = await client.xinfo_stream(stream)
    return bytes(info["last-generated-id"])


async def wait_acked(client: aredis.Redis, b: Backlog) -> int:
    """Until the group has read up to the last entry and nothing is pending; the polls."""
    name = b.group.encode()
    polls = 0
    while True:
        polls += 1
        for g in await client.xinfo_groups(b.stream):
            if g["name"] == name and g["last-delivered-id"] == b.last_id and g["pending"] == 0:
                return polls
        await anyio.sleep(POLL_S)


async def _commands(client: aredis.Redis) -> int:
    """Commands the server has run, those inside scripts and transactions included."""
    return int((await client.info("stats"))["total_commands_processed"])


async def _copy(client: aredis.Redis, template: str, stream: str) -> None:
    await client.delete(stream)
    await client.execute_command("COPY", template, stream)


async def _drop(client: aredis.Redis, pattern: str) -> None:
    keys = [k async for k in client.scan_iter(match=pattern, count=1000)]
    if keys:
        await client.delete(*keys)


# --------------------------------------------------------------------------- systems


class System:
    """One contender: how its backlog is written and how its consumer is run."""

    key = ""
    label = ""
    #: What its concurrency setting is, for the page.
    setting = ""

    def __init__(self, url: str) -> None:
        self.url = url
        self.templates: dict[int, str] = {}

    def check(self) -> None:
        """Import the peer (ImportError: not installed)."""

    async def publish(self, client: aredis.Redis, stream: str, n: int) -> None:
        raise NotImplementedError

    async def backlog(self, client: aredis.Redis, n: int, run: str) -> Backlog:
        """A fresh copy of the template of ``n`` entries, its group created where needed."""
        template = self.templates.get(n)
        if template is None:
            template = self.templates[n] = f"cmp:{self.key}:template:{n}"
            await client.delete(template)
            await self.publish(client, template, n)
        stream = f"cmp:{self.key}:{run}"
        await _copy(client, template, stream)
        await self.create_group(client, stream)
        return Backlog(stream, GROUP, await _last_id(client, stream), n)

    async def create_group(self, client: aredis.Redis, stream: str) -> None:
        """Most peers create their group at ``$`` (new entries only): the harness makes it
        at ``0`` first, as a user consuming an existing backlog does."""
        await client.xgroup_create(stream, GROUP, id="0")

    def consume(self, b: Backlog, concurrency: int) -> contextlib.AbstractAsyncContextManager[None]:
        """Runs the consumer for the block; the caller waits for the acks inside it."""
        raise NotImplementedError

    async def cleanup(self, client: aredis.Redis, b: Backlog) -> None:
        await client.delete(b.stream)
        if b.extra:
            await _drop(client, b.extra)

    async def close(self, client: aredis.Redis) -> None:
        for template in self.templates.values():
            await client.delete(template)


async def _noop_data(_data: Any) -> None:
    _SINK.hit()


async def _publish_redcurrent(client: aredis.Redis, stream: str, n: int) -> None:
    """redcurrent's wire format, which the raw loop reads too."""
    from redcurrent import Topic

    await Topic(client, stream).publish_many([(TYPE, PAYLOAD)] * n)


class Raw(System):
    key = "raw"
    label = "raw redis-py loop"
    setting = (
        f"XREADGROUP COUNT {RAW_COUNT}; the handlers of one read run one after another (1) "
        "or as tasks, at most 16 at once (16); one XACK of the whole read, pipelined "
        "with the next XREADGROUP"
    )

    async def publish(self, client: aredis.Redis, stream: str, n: int) -> None:
        await _publish_redcurrent(client, stream, n)

    @contextlib.asynccontextmanager
    async def consume(self, b: Backlog, concurrency: int) -> AsyncIterator[None]:
        client = aredis.Redis.from_url(self.url)
        sem = asyncio.Semaphore(concurrency)

        async def limited(data: Any) -> None:
            async with sem:
                await _noop_data(data)

        async def loop() -> None:
            decode = _decode
            acks: list[bytes] = []
            while True:
                async with client.pipeline(transaction=False) as pipe:
                    if acks:
                        pipe.xack(b.stream, b.group, *acks)
                    pipe.xreadgroup(b.group, "raw", {b.stream: ">"}, count=RAW_COUNT, block=1000)
                    replies = await pipe.execute()
                reply = replies[-1]
                acks = []
                if not reply:
                    continue
                entries = reply[0][1]
                if concurrency == 1:
                    for entry_id, fields in entries:
                        await _noop_data(decode(fields[b"data"]))
                        acks.append(entry_id)
                else:
                    await asyncio.gather(*(limited(decode(f[b"data"])) for _, f in entries))
                    acks = [entry_id for entry_id, _ in entries]

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(loop)
                yield
                tg.cancel_scope.cancel()
        finally:
            await client.aclose()


class Redcurrent(System):
    key = "redcurrent"
    label = "redcurrent"
    setting = "`StreamConsumer(concurrency=c)`: at most c handlers run at once"

    async def publish(self, client: aredis.Redis, stream: str, n: int) -> None:
        await _publish_redcurrent(client, stream, n)

    async def create_group(self, client: aredis.Redis, stream: str) -> None:
        """``StartFrom.EARLIEST`` creates it at ``0``."""

    @contextlib.asynccontextmanager
    async def consume(self, b: Backlog, concurrency: int) -> AsyncIterator[None]:
        from redcurrent import Message, StartFrom, StreamConsumer

        client = aredis.Redis.from_url(self.url)
        consumer = StreamConsumer(
            client, b.stream, b.group, name="rc", start=StartFrom.EARLIEST, concurrency=concurrency
        )

        @consumer.handler(TYPE)
        async def noop(_msg: Message[Any]) -> None:
            _SINK.hit()

        try:
            async with consumer:
                yield
        finally:
            await client.aclose()


class FastStream(System):
    key = "faststream"
    label = "FastStream"
    setting = (
        "`max_workers=c` on the subscriber: at most c handlers run at once (1: the "
        "default, sequential subscriber)"
    )
    #: ``StreamSub(max_records=...)``: the XREADGROUP COUNT. FastStream's default is none
    #: (one read takes the whole backlog); 100 is taskiq-redis's default.
    MAX_RECORDS = 100

    def check(self) -> None:
        import faststream.redis  # noqa: F401

    async def publish(self, client: aredis.Redis, stream: str, n: int) -> None:
        from faststream.redis import RedisBroker

        broker = RedisBroker(self.url, logger=None)
        async with broker:
            for _ in range(n):
                await broker.publish(PAYLOAD, stream=stream)

    @contextlib.asynccontextmanager
    async def consume(self, b: Backlog, concurrency: int) -> AsyncIterator[None]:
        from faststream.redis import RedisBroker, StreamSub

        # logger=None: no per-message log lines (FastStream logs each one at INFO by default).
        broker = RedisBroker(self.url, logger=None)
        sub = StreamSub(b.stream, group=b.group, consumer="fs", max_records=self.MAX_RECORDS)

        async def noop(body: dict[str, Any]) -> None:
            _SINK.hit()

        if concurrency > 1:
            broker.subscriber(stream=sub, max_workers=concurrency)(noop)
        else:
            broker.subscriber(stream=sub)(noop)
        await broker.start()
        try:
            yield
        finally:
            await broker.stop()


class Taskiq(System):
    key = "taskiq"
    label = "taskiq-redis"
    setting = (
        "`Receiver(max_async_tasks=c)` (the worker's `--max-async-tasks`): at most c "
        "tasks run at once"
    )
    TASK = "bench_noop"

    def check(self) -> None:
        import taskiq_redis  # noqa: F401

    def _broker(self, stream: str) -> Any:
        from taskiq_redis import RedisStreamBroker

        # consumer_id="0": the group starts at the beginning of the backlog.
        broker = RedisStreamBroker(
            self.url, queue_name=stream, consumer_group_name=GROUP, consumer_id="0"
        )

        async def noop(payload: dict[str, Any]) -> None:
            _SINK.hit()

        broker.task(task_name=self.TASK)(noop)
        return broker

    async def publish(self, client: aredis.Redis, stream: str, n: int) -> None:
        broker = self._broker(stream)
        task = broker.find_task(self.TASK)
        try:
            for _ in range(n):
                await task.kiq(PAYLOAD)
        finally:
            await broker.shutdown()

    async def create_group(self, client: aredis.Redis, stream: str) -> None:
        """The broker creates it at ``consumer_id``."""

    @contextlib.asynccontextmanager
    async def consume(self, b: Backlog, concurrency: int) -> AsyncIterator[None]:
        from taskiq.receiver import Receiver

        broker = self._broker(b.stream)
        broker.is_worker_process = True
        receiver = Receiver(broker, max_async_tasks=concurrency)
        finish = asyncio.Event()
        listening = asyncio.create_task(receiver.listen(finish))
        try:
            yield
        finally:
            # The worker's own graceful stop (the finish event); closing the pool ends a
            # read blocked for up to xread_block. The figures are taken by then: an error
            # of a read cut short by the close is not one of the run.
            finish.set()
            await broker.shutdown()
            with anyio.move_on_after(5), contextlib.suppress(RedisError):
                await listening


class Streaq(System):
    key = "streaq"
    label = "streaq"
    setting = (
        "`Worker(concurrency=c)`: c tasks run at once; it reads ahead up to c more "
        "(`prefetch` defaults to c)"
    )
    TASK = "bench_noop"

    def check(self) -> None:
        import streaq  # noqa: F401

    def _worker(self, queue: str, concurrency: int = 16) -> Any:
        from streaq import Worker

        worker = Worker(
            redis_url=self.url, queue_name=queue, concurrency=concurrency, handle_signals=False
        )

        # ttl=0: no result stored (the other systems store none either).
        @worker.task(name=self.TASK, ttl=0)
        async def noop(payload: dict[str, Any]) -> None:
            _SINK.hit()

        return worker

    async def backlog(self, client: aredis.Redis, n: int, run: str) -> Backlog:
        """Tasks live in keys beside the stream and are deleted once done: enqueue anew."""
        from streaq.constants import REDIS_GROUP, REDIS_PREFIX, REDIS_STREAM

        queue = f"cmp{run}"
        producer = self._worker(queue)
        task = producer.registry[self.TASK]
        async with producer:
            for start in range(0, n, 1000):
                await producer.enqueue_many(
                    [task.enqueue(PAYLOAD) for _ in range(min(1000, n - start))]
                )
        stream = f"{REDIS_PREFIX}{queue}{REDIS_STREAM}normal"
        last = await _last_id(client, stream)
        return Backlog(stream, REDIS_GROUP, last, n, queue, f"{REDIS_PREFIX}{queue}:*")

    @contextlib.asynccontextmanager
    async def consume(self, b: Backlog, concurrency: int) -> AsyncIterator[None]:
        worker = self._worker(b.queue, concurrency)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run_async)
            yield
            tg.cancel_scope.cancel()


SYSTEMS: tuple[type[System], ...] = (Raw, Redcurrent, FastStream, Taskiq, Streaq)


# --------------------------------------------------------------------------- timing


async def time_one(
    client: aredis.Redis, system: System, n: int, concurrency: int, run: str, limit_s: float
) -> tuple[float, float, float]:
    """Seconds until the last ack is visible, from the last handler call to it, and the
    server's commands per message."""
    global _SINK
    b = await system.backlog(client, n, run)
    _SINK = Sink(n)
    gc.collect()
    try:
        with anyio.fail_after(limit_s):
            before = await _commands(client)
            started = time.perf_counter()
            async with system.consume(b, concurrency):
                await _SINK.done.wait()
                handled = time.perf_counter()
                polls = await wait_acked(client, b)
                acked = time.perf_counter()
                elapsed = acked - started
                # Less our own INFO (counted in ``before``) and XINFO GROUPS polls.
                commands = await _commands(client) - before - 1 - polls
        left = int((await client.xpending(b.stream, b.group))["pending"])
        if left:
            raise RuntimeError(f"{left} entries left pending")
        if _SINK.n != n:
            raise RuntimeError(f"{_SINK.n} handler calls for {n} messages")
    finally:
        await system.cleanup(client, b)
    return elapsed, acked - handled, commands / n


@dataclass
class Row:
    system: str
    concurrency: int
    runs: list[float] = field(default_factory=list)
    commands: list[float] = field(default_factory=list)
    ack_lag: list[float] = field(default_factory=list)
    error: str | None = None


async def measure(url: str, n: int, repeat: int, only: set[str]) -> dict[str, Any]:
    client = aredis.Redis.from_url(url)
    systems: list[System] = []
    skipped: dict[str, str] = {}
    rows: dict[tuple[str, int], Row] = {}
    for cls in SYSTEMS:
        if cls.key not in only:
            continue
        s = cls(url)
        try:
            s.check()
        except ImportError as exc:
            skipped[s.key] = f"not installed ({exc})"
            continue
        systems.append(s)
        for c in CONCURRENCIES:
            rows[s.key, c] = Row(s.key, c)
    timeout = max(60.0, n / 200)  # a peer under 200 msgs/s is reported as failed
    rounds = [("warm", min(n, WARM_COUNT))] + [(str(r), n) for r in range(repeat)]
    try:
        for label, count in rounds:
            for s in systems:
                for c in CONCURRENCIES:
                    row = rows[s.key, c]
                    if row.error:
                        continue
                    print(f"  round {label:>4}: {s.key:<11} c={c:<3}", end=" ", flush=True)
                    try:
                        elapsed, lag, per_msg = await time_one(
                            client, s, count, c, f"{label}c{c}", timeout
                        )
                    except Exception as exc:  # a peer failing is a result, not a crash
                        row.error = f"{type(exc).__name__}: {exc}"
                        print(f"FAILED {row.error}", flush=True)
                        traceback.print_exc()
                        continue
                    print(
                        f"{count / elapsed:>9,.0f} msgs/s {per_msg:6.2f} cmds/msg, "
                        f"ack lag {lag * 1e3:5.1f} ms",
                        flush=True,
                    )
                    if label != "warm":
                        row.runs.append(elapsed)
                        row.commands.append(per_msg)
                        row.ack_lag.append(lag)
        for s in systems:
            await s.close(client)
    finally:
        await client.aclose()
    results: dict[str, Any] = {"skipped": skipped, "rows": []}
    for row in rows.values():
        med = median(row.runs)
        results["rows"].append(
            {
                "system": row.system,
                "concurrency": row.concurrency,
                "runs_s": row.runs,
                "median_s": med,
                "msgs_per_s": n / med if row.runs else math.nan,
                "commands_per_msg": median(row.commands),
                "ack_lag_ms": median(row.ack_lag) * 1e3,
                "error": row.error,
            }
        )
    return results


# --------------------------------------------------------------------------- the page

FEATURES_INTRO = """\
What each library offers around the consume loop, at the versions measured, from its
documentation and, where the documentation is silent, its source (sources below the
table). "yes": built in and documented; "no": not offered (it can be built on top);
"partial": see the note; "?": not established.
"""

#: (feature, redcurrent, FastStream, taskiq-redis, streaq)
FEATURES: list[tuple[str, str, str, str, str]] = [
    (
        "at-least-once with consumer groups",
        "yes: ack after the handler; a failure stays pending",
        "yes: ack after the handler (default policy); a failure stays pending [1]",
        "partial: ack after the task, failed or not; only a crash leaves it pending [2]",
        "yes: ack when the task is done; a crash leaves it pending",
    ),
    (
        "pending recovery (XAUTOCLAIM)",
        "yes: own pending first, then claims after `claim_idle`; leases renewed",
        "partial: a subscriber with `min_idle_time` claims instead of reading new "
        "entries, so recovery is a second subscriber; `claim_min_idle_time` on Redis 8.4+ [3]",
        "yes: XAUTOCLAIM after each read, idle 10 min by default",
        "yes: XAUTOCLAIM in its read script after `idle_timeout`; leases renewed",
    ),
    (
        "dead letters",
        "yes: stream of dead letters with the error; list, replay, purge",
        "no",
        "no",
        "no: a failed task keeps its error as its result (for `ttl`)",
    ),
    (
        "retries with backoff",
        "yes: same entry, rising delivery count, exponential with jitter",
        "no: a nack leaves it pending",
        "yes: `SmartRetryMiddleware` (opt-in per task), as a new message [4]",
        "partial: when the task raises `StreaqRetry` (try² s by default); other "
        "errors fail the task [5]",
    ),
    (
        "scheduled messages",
        "yes: `delay=`, `at=` (server clock)",
        "no: the docs point to taskiq-faststream [6]",
        "yes: a separate `taskiq scheduler` process (one instance) with a schedule source",
        "yes: `delay`, `schedule`, cron",
    ),
    (
        "per-message stop/resume",
        "yes: `stop_message` / `resume_message`, for every group",
        "no",
        "no",
        "partial: `abort` (stop, no resume)",
    ),
    (
        "cleanup of acked entries",
        "yes: only what every group acknowledged, optionally automatic",
        "no: `maxlen` caps the stream whatever was processed",
        "no: `maxlen` caps the stream whatever was processed",
        "yes: each entry deleted (XDEL) once its task is done",
    ),
    (
        "batch handlers",
        "yes: `batch_handler(size, timeout)`, partial failure",
        "yes: `StreamSub(batch=True)`, one read per batch",
        "no",
        "no",
    ),
    (
        "typed handlers",
        "yes: msgspec models validated; bad payloads become dead letters",
        "yes: pydantic validation of the handler's annotations",
        "partial: arguments cast by annotation; a failed cast passes the value as is [7]",
        "partial: typed at enqueue for type checkers; no validation at run time (pickle)",
    ),
    (
        "Redis Cluster",
        "yes: one hash tag per topic; tested with failover and resharding",
        "yes: `RedisClusterBroker` [8]",
        "yes: `RedisStreamClusterBroker`",
        "yes: `cluster_nodes`, queue name with a hash tag [9]",
    ),
    (
        "CLI",
        "yes: `redcurrent worker`, info, pending, dead letters, stop, cleanup",
        "yes: `faststream run`",
        "yes: `taskiq worker`, `taskiq scheduler`",
        "yes: `streaq run`, `streaq web`",
    ),
]

FEATURES_NOTES = """\
Sources: redcurrent: README.md. FastStream 0.7.8: its docs (`docs/docs/en/redis/streams/`
ack.md, claiming.md, batch.md; `redis/cluster.md`; `scheduling.md`;
`getting-started/cli.md`) and source (`faststream/redis/message.py`,
`subscriber/usecases/stream_subscriber.py`, `schemas/stream_sub.py`). taskiq 0.13.0 and
taskiq-redis 1.2.4: taskiq's docs (`guide/cli.md`, `guide/scheduling-tasks.md`,
`available-components/middlewares.md`), taskiq-redis's README and source
(`redis_broker.py`, `redis_cluster_broker.py`), taskiq's `receiver/receiver.py`. streaq
7.2.0: its docs (`task.rst`, `worker.rst`, `cli.rst`) and source (`worker.py`,
`lua/streaq.lua`).

1. FastStream's docs call its default automatic ack "at most once"; in 0.7.8 the
   default policy (`REJECT_ON_ERROR`) sends XACK only after the handler returns, and a
   reject or nack sends nothing, so a failed message stays pending.
2. The receiver acks after the result is saved (`ack_type` `when_saved`) whether the
   task succeeded or raised; `--ack-type`/`ack_type` move the ack, not its condition.
3. With `min_idle_time` the subscriber reads with XAUTOCLAIM only (its docs' example
   pairs a normal subscriber with a claiming one). `claim_min_idle_time` uses
   XREADGROUP's CLAIM option, which needs Redis 8.4 and redis-py 7.1.
4. The middleware sends the task again (same arguments) after the delay; the failed
   message itself was acknowledged (note 2).
5. "Any other exception will result in the task failing" (streaq docs, Tasks).
6. "this functional conflicts with the original FastStream ideology" (FastStream
   docs, Tasks Scheduling).
7. "If type-cast fails you won't throw any error. It just leave the value as is"
   (taskiq docs, CLI, Type casts); `--no-parse` turns the casts off.
8. Same constructor as `RedisBroker`; no pipelines on a cluster.
9. "Redis Cluster support is also provided, with some caveats" (streaq docs, Worker).
"""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _fmt_rate(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.0f}"


def _x(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.3f}x" if value < 0.1 else f"{value:.2f}x"


def _small(value: float) -> str:
    return f"{value:.3f}" if value < 0.1 else f"{value:.2f}"


def page(res: dict[str, Any]) -> str:
    meta = res["meta"]
    tp = res["throughput"]
    by = {(r["system"], r["concurrency"]): r for r in tp["rows"]}
    labels = {cls.key: cls.label for cls in SYSTEMS}
    versions = ", ".join(f"{name} {v}" for name, v in meta["versions"].items())
    lines = [
        "# redcurrent beside other Redis Streams consumers",
        "",
        "<!-- Written by benchmarks/compare.py --write-docs; edit the script, not this page. -->",
        "",
        f"Consumer throughput of redcurrent, FastStream, taskiq-redis and streaq, beside a "
        f"hand-written redis-py loop, in one run on one private Redis server: "
        f"`{meta['command']}`.",
        "",
        f"- Machine: {meta['cpus']} CPUs ({meta['platform']}), Python {meta['python']}, "
        f"Redis {meta['redis_version']} (private server on the same machine), {meta['when']}, "
        f"{meta['seconds']:.0f} s in all.",
        f"- Packages: {versions}.",
        "",
        "## Consumer throughput",
        "",
        f"{meta['count']:,} messages (the same small JSON dict) wait in a stream; each "
        "system consumes them all through a consumer group, calls a no-op async handler per "
        "message and acknowledges every one (XACK). The time runs from just before the "
        "consumer starts until the server shows the last one acknowledged (the group's "
        "last-delivered id is the stream's last id and XPENDING is 0). Median of "
        f"{meta['repeat']} runs, systems and concurrencies taking turns in every round after "
        "a warm-up round. Ratios are to the raw loop at the same concurrency and at "
        "concurrency 1 (its best). *Commands/msg*: commands the server ran during the run "
        "divided by the messages (commands inside scripts and transactions counted one by "
        "one, MULTI/EXEC included; the harness's own polls left out). *Ack lag*: from the "
        "last handler call until the last ack is visible (included in the time; the "
        "harness polls every millisecond).",
        "",
        "| system | concurrency | msgs/s | median s | vs raw loop, same concurrency "
        "| vs raw loop, concurrency 1 | commands/msg | ack lag, ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    raw1 = by.get(("raw", 1))
    best = raw1["msgs_per_s"] if raw1 and not raw1["error"] else math.nan
    for cls in SYSTEMS:
        for c in CONCURRENCIES:
            r = by.get((cls.key, c))
            if r is None:
                continue
            if r["error"]:
                lines.append(f"| {cls.label} | {c} | failed: {r['error']} | | | | | |")
                continue
            raw = by.get(("raw", c))
            base = raw["msgs_per_s"] if raw and not raw["error"] else math.nan
            lines.append(
                f"| {cls.label} | {c} | {_fmt_rate(r['msgs_per_s'])} | {r['median_s']:.3f} "
                f"| {_x(ratio(r['msgs_per_s'], base))} | {_x(ratio(r['msgs_per_s'], best))} "
                f"| {_small(r['commands_per_msg'])} | {r['ack_lag_ms']:.1f} |"
            )
    for key, why in tp["skipped"].items():
        lines.append(f"| {labels[key]} | | {why} | | | | | |")
    lines += ["", "What concurrency means for each:", ""]
    for cls in SYSTEMS:
        lines.append(f"- **{cls.label}**: {cls.setting}.")
    lines += ["", READING.rstrip(), "", HOW.rstrip(), "", AGAINST_RAW.rstrip()]
    lines += ["", "## Features", "", FEATURES_INTRO]
    lines.append("| | redcurrent | FastStream | taskiq-redis | streaq |")
    lines.append("|---|---|---|---|---|")
    for feature, *cells in FEATURES:
        lines.append(f"| {feature} | {' | '.join(cells)} |")
    lines += ["", FEATURES_NOTES.rstrip()]
    return "\n".join(lines).rstrip() + "\n"


AGAINST_RAW = """\
## Against the strongest raw loop and the server's own limit

The suite in `benchmarks/` holds redcurrent against the strongest simple raw loop (the
one above: XREADGROUP COUNT 500, XACK in one pipeline with the next read) and publishing
against the server bound (`redis-benchmark -P 64` XADD of the same entry on the same
server), all variants interleaved, medians of 5, ratios only, with server CPU, client CPU
and commands per message, the fairness of competing consumers and the command cost of a
retry and of a scheduled message:

```sh
BENCH_LOOP=uvloop python benchmarks/run.py   # about 6 minutes
```

It writes the table to `benchmarks/results/latest.md` in the repository (the method:
`benchmarks/README.md`; the headline figures: the README's Performance section).
"""

READING = """\
Reading the figures:

- The machine has 2 cores, one mostly taken by the Redis server: every client runs on
  the other one, so the figures are CPU time per message on the client side plus what
  it waits for the server. Compare ratios within one run, not absolute figures across
  machines or runs.
- *Commands/msg* explains most of the spread. The raw loop and redcurrent acknowledge
  hundreds of ids per XACK. FastStream and taskiq-redis send one XACK per message and
  await it before that handler's slot is free (at concurrency 1, before the next
  message). streaq runs about twenty commands per message (its task data, the try
  counter, the abort set, a lease script, then a transaction that acks, deletes the
  entry and cleans up), which is the price of its per-task results, retries, aborts
  and dependencies.
- Concurrency 16 helps the peers that wait for a round trip per message, and costs the
  raw loop (a task per message for a handler that does nothing).
- *Ack lag* of redcurrent: while its reader waits for room, acknowledgements wait up to
  50 ms to travel with the reader's next read (`DEFERRED` in `_ack.py`); the last acks
  of a backlog can wait that long after the last handler call, and that wait is part of
  its time here. It delays when those acks become visible, not the handlers.
- The time includes each consumer's start: connecting, creating or checking its group,
  loading scripts (streaq loads its function library at every start).
"""

HOW = """\
How each one is driven (all in one process, one event loop, per-message logging off):

- **raw redis-py loop**: the loop a user writes with redis-py and hiredis, as in
  `benchmarks/run.py`, with the XACK of one read sent in the same round trip as the next
  XREADGROUP; it decodes `data` with `msgspec.json.decode`. The harness creates its
  group before the clock starts.
- **redcurrent**: `StreamConsumer(start=StartFrom.EARLIEST)` with
  `@consumer.handler(type)` taking `Message[Any]`; entries written by
  `Topic.publish_many` (the raw loop reads the same entries).
- **FastStream**: `RedisBroker(logger=None)` with
  `@broker.subscriber(stream=StreamSub(stream, group=..., consumer=..., max_records=100))`
  and a handler taking `body: dict[str, Any]`; entries written by `broker.publish(...,
  stream=...)`. Its default ack policy acknowledges (XACK) each message after its handler
  returns. FastStream creates its group at `$` (new entries only), so the harness
  creates it at `0` first, as a user consuming an existing backlog must;
  `max_records` (XREADGROUP COUNT) has no default, so one read would take the whole
  backlog: 100 here, taskiq-redis's default. Per message it also deep-copies its
  `StreamSub` to build a log context, with logging off too (about a tenth of its time
  under cProfile).
- **taskiq-redis**: `RedisStreamBroker(queue_name=stream, consumer_id="0")`, one task
  `async def noop(payload: dict[str, Any])` sent with `.kiq(payload)`, run by taskiq's
  `Receiver` (what `taskiq worker` runs) in this process, without a result backend;
  it XACKs each message once its task is done (`ack_type` `when_saved`, the default).
- **streaq**: `Worker(concurrency=c)` and `@worker.task(ttl=0)` (no result stored;
  default `ttl` is 5 minutes), its tasks enqueued with `enqueue_many` before each run
  (outside the timing: streaq keeps a task's data in a key beside the stream entry and
  deletes both once the task is done). Per task it reads that key, counts the try,
  checks for an abort, refreshes its lease, then acks and deletes the entry in one
  transaction: more work per message by design (results, retries, dependencies, abort).
"""


# --------------------------------------------------------------------------- main


def _server_version(url: str) -> str:
    import redis

    with redis.Redis.from_url(url) as client:
        return str(client.info("server")["redis_version"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="messages per run (20,000)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions, median (3)")
    parser.add_argument(
        "--only",
        default=",".join(cls.key for cls in SYSTEMS),
        help="comma-separated systems to run",
    )
    parser.add_argument("--write-docs", action="store_true", help=f"write {DOCS_PAGE}")
    args = parser.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    # The peers' own loggers stay quiet unless something goes wrong.
    logging.basicConfig(level=logging.WARNING)

    started = time.perf_counter()
    with private_redis_url() as url:
        meta: dict[str, Any] = {
            "when": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join(["python", "benchmarks/compare.py", *(argv or sys.argv[1:])]),
            "count": args.count,
            "repeat": args.repeat,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}",
            "redis_version": _server_version(url),
            "versions": {
                name: _version(name)
                for name in (
                    "redcurrent",
                    "redis",
                    "hiredis",
                    "faststream",
                    "taskiq",
                    "taskiq-redis",
                    "streaq",
                    "coredis",
                )
            },
        }
        throughput = asyncio.run(measure(url, args.count, args.repeat, only))
    meta["seconds"] = time.perf_counter() - started
    text = page({"meta": meta, "throughput": throughput})
    print()
    print(text)
    if args.write_docs:
        DOCS_PAGE.write_text(text)
        print(f"wrote {DOCS_PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
