"""Consumer benchmarks: throughput, end-to-end latency, memory and idle cost.

Each figure is measured for redcurrent and for the loop a user would write with
redis-py + hiredis (the *raw baseline*)::

    while True:
        reply = await r.xreadgroup(group, name, {stream: ">"}, count=500, block=...)
        for entry_id, fields in reply[0][1]:
            await handler(msgspec.json.decode(fields[b"data"]))
        await r.xack(stream, group, *ids)       # one XACK per batch

The raw loop decodes ``data`` with ``msgspec.json.decode`` (the decoder redcurrent
uses, so the comparison measures the library, not the JSON parser), calls the same
trivial async handler per message and acks every message: the user-visible work is
the same. redcurrent additionally decodes ``metadata``, builds a ``Message``, keeps
leases and the stopped-id check; that is the overhead being measured.

Normally driven by ``benchmarks/run.py``. Run on its own for a profile::

    python benchmarks/bench_consumer.py profile [--count N] [--concurrency C]

(pyinstrument if installed, else cProfile). ``child-memory`` and ``child-idle`` are
the subprocess entry points of the memory and idle benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import redis.asyncio as aredis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    GROUP,
    PAYLOAD,
    RAW_COUNT,
    TYPE,
    fill_stream,
    fresh_copy,
    median,
    pending_count,
    percentile,
    private_redis_url,
)

from redcurrent import Message, StartFrom, StreamConsumer

_decode = msgspec.json.decode
_encode = msgspec.json.encode


class Sink:
    """The trivial handler: counts messages and signals when ``target`` were seen."""

    __slots__ = ("done", "handled_at", "n", "target")

    def __init__(self, target: int) -> None:
        self.n = 0
        self.target = target
        self.done = anyio.Event()
        self.handled_at = 0.0

    async def one(self, _msg: Any) -> None:
        self.n += 1
        if self.n >= self.target:
            self.handled_at = time.perf_counter()
            self.done.set()

    async def many(self, msgs: list[Any]) -> None:
        self.n += len(msgs)
        if self.n >= self.target:
            self.handled_at = time.perf_counter()
            self.done.set()


# --------------------------------------------------------------------------- the two loops


async def raw_loop(
    client: aredis.Redis,
    stream: str,
    name: str,
    handler: Callable[[Any], Awaitable[None]],
    *,
    block_ms: int,
    until: Callable[[], bool],
) -> None:
    """The raw baseline: XREADGROUP COUNT 500, handler per message, one XACK per batch."""
    decode = _decode
    while not until():
        reply = await client.xreadgroup(GROUP, name, {stream: ">"}, count=RAW_COUNT, block=block_ms)
        if not reply:
            continue
        ids = []
        for entry_id, fields in reply[0][1]:
            await handler(decode(fields[b"data"]))
            ids.append(entry_id)
        await client.xack(stream, GROUP, *ids)


def make_consumer(
    client: aredis.Redis,
    stream: str,
    sink: Sink,
    *,
    concurrency: int,
    batch: int | None,
    start: StartFrom = StartFrom.EARLIEST,
    prefetch: int | None = None,
) -> StreamConsumer:
    consumer = StreamConsumer(
        client,
        stream,
        GROUP,
        name="rc",
        start=start,
        concurrency=concurrency,
        prefetch=prefetch,
    )
    if batch:
        consumer.batch_handler(TYPE, size=batch)(sink.many)
    else:
        consumer.handler(TYPE)(sink.one)
    return consumer


# --------------------------------------------------------------------------- throughput


class Variant(msgspec.Struct, frozen=True):
    key: str
    label: str
    impl: str  # "raw" | "raw_pipelined" | "redcurrent"
    concurrency: int = 1
    batch: int | None = None
    prefetch: int | None = None
    loop: str = "asyncio"


#: The prefetch of the read-ahead variants (not the default; see benchmarks/README.md).
READ_AHEAD_PREFETCH = 1024
#: The baseline every throughput ratio is taken against: the strongest simple raw loop.
BASELINE = "raw_pipelined"


def bench_loops() -> list[str]:
    """The event loops to measure: ``asyncio``, plus ``uvloop`` rows when
    ``BENCH_LOOP=uvloop`` is set (and uvloop imports)."""
    wanted = os.environ.get("BENCH_LOOP", "asyncio").strip().lower()
    loops = ["asyncio"]
    if wanted == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            print("BENCH_LOOP=uvloop but uvloop is not installed: asyncio only", file=sys.stderr)
        else:
            loops.append("uvloop")
    return loops


def run_in_loop(loop: str, coro: Awaitable[Any]) -> Any:
    """Run ``coro`` to completion in a fresh event loop of kind ``loop``."""
    if loop == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


def throughput_variants(quick: bool, loops: list[str] | None = None) -> list[Variant]:
    out: list[Variant] = []
    for loop in loops or ["asyncio"]:
        sfx = "" if loop == "asyncio" else f"@{loop}"
        tag = "" if loop == "asyncio" else f" [{loop}]"
        out.append(
            Variant(
                f"raw_pipelined{sfx}",
                f"raw loop, XACK pipelined with the next XREADGROUP (COUNT 500){tag}",
                "raw_pipelined",
                loop=loop,
            )
        )
        out.append(Variant(f"raw{sfx}", f"raw loop, XACK after each batch{tag}", "raw", loop=loop))
        for c in (1, 4, 16, 64) if loop == "asyncio" and not quick else (1, 64):
            out.append(
                Variant(
                    f"single_c{c}{sfx}",
                    f"redcurrent handler, concurrency {c}{tag}",
                    "redcurrent",
                    c,
                    loop=loop,
                )
            )
        for size in (10, 50, 100, 500) if loop == "asyncio" and not quick else (100, 500):
            out.append(
                Variant(
                    f"batch_{size}{sfx}",
                    f"redcurrent batch_handler size={size}{tag}",
                    "redcurrent",
                    1,
                    size,
                    loop=loop,
                )
            )
        # Read-ahead: with prefetch >= 2 x COUNT one read is in flight while the
        # workers run the previous one. Informational rows, not held against targets.
        if loop == "asyncio":
            p = READ_AHEAD_PREFETCH
            out.append(
                Variant("single_c1_ra", f"… concurrency 1, prefetch={p}", "redcurrent", 1, None, p)
            )
            out.append(
                Variant("batch_100_ra", f"… batch size=100, prefetch={p}", "redcurrent", 1, 100, p)
            )
    return out


async def server_counters(client: aredis.Redis) -> tuple[float, dict[str, int]]:
    """Server CPU seconds (user + sys) and calls per command, from one INFO."""
    info = await client.execute_command("INFO", "cpu", "commandstats")
    cpu = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    calls = {
        k.removeprefix("cmdstat_"): int(v["calls"])
        for k, v in info.items()
        if k.startswith("cmdstat_")
    }
    return cpu, calls


def counters_delta(
    before: tuple[float, dict[str, int]],
    after: tuple[float, dict[str, int]],
    *,
    own: dict[str, int],
) -> tuple[float, dict[str, int]]:
    """CPU seconds and commands between two :func:`server_counters`, without the
    measuring client's own ``own`` calls (and every INFO)."""
    calls = {}
    for name, n in after[1].items():
        d = n - before[1].get(name, 0) - own.get(name, 0)
        if d and name != "info":
            calls[name] = d
    return after[0] - before[0], calls


async def wait_acked(probe: aredis.Redis, stream: str) -> int:
    """Poll XPENDING until nothing is pending; the number of polls sent."""
    polls = 0
    while True:
        polls += 1
        if not await pending_count(probe, stream, GROUP):
            return polls
        await asyncio.sleep(0.0005)


async def raw_pipelined_loop(
    client: aredis.Redis,
    stream: str,
    name: str,
    handler: Callable[[Any], Awaitable[None]],
    *,
    block_ms: int,
    until: Callable[[], bool],
) -> None:
    """The strongest simple raw loop: XREADGROUP COUNT 500, handler per message,
    and the batch's XACK sent in the same pipeline as the next XREADGROUP (one
    round trip per batch)."""
    decode = _decode
    ids: list[bytes] = []
    while True:
        if ids:
            pipe = client.pipeline(transaction=False)
            pipe.xack(stream, GROUP, *ids)
            pipe.xreadgroup(GROUP, name, {stream: ">"}, count=RAW_COUNT, block=block_ms)
            reply = (await pipe.execute())[1]
        else:
            reply = await client.xreadgroup(
                GROUP, name, {stream: ">"}, count=RAW_COUNT, block=block_ms
            )
        ids = []
        if reply:
            for entry_id, fields in reply[0][1]:
                await handler(decode(fields[b"data"]))
                ids.append(entry_id)
        if until():
            if ids:
                await client.xack(stream, GROUP, *ids)
            return


async def _measure(url: str, stream: str, n: int, v: Variant) -> dict[str, Any]:
    """One timed run: from the consumer's start (its client's first connection,
    group checks, claim of its own pending, control subscription) until the last
    ack is visible in XPENDING; with the server's CPU time and commands meanwhile."""
    client = aredis.Redis.from_url(url)
    probe = aredis.Redis.from_url(url)
    sink = Sink(n)
    try:
        before = await server_counters(probe)
        cpu_started = time.process_time()
        started = time.perf_counter()
        if v.impl == "redcurrent":
            consumer = make_consumer(
                client, stream, sink, concurrency=v.concurrency, batch=v.batch, prefetch=v.prefetch
            )
            async with consumer:
                await sink.done.wait()
                polls = await wait_acked(probe, stream)
                elapsed = time.perf_counter() - started
                client_cpu = time.process_time() - cpu_started
                after = await server_counters(probe)
        else:
            loop_fn = raw_loop if v.impl == "raw" else raw_pipelined_loop
            await client.xgroup_create(stream, GROUP, id="0")
            await loop_fn(client, stream, "raw", sink.one, block_ms=1000, until=lambda: sink.n >= n)
            polls = await wait_acked(probe, stream)
            elapsed = time.perf_counter() - started
            client_cpu = time.process_time() - cpu_started
            after = await server_counters(probe)
    finally:
        await client.aclose()
        await probe.aclose()
    cpu, calls = counters_delta(before, after, own={"xpending": polls})
    handled = sink.handled_at - started
    return {
        "client_cpu_s": client_cpu,
        "seconds": elapsed,
        "handled_s": handled,
        "server_cpu_s": cpu,
        "commands": calls,
    }


async def _prepare(url: str, template: str, stream: str, count: int, n: int) -> None:
    client = aredis.Redis.from_url(url)
    try:
        if count == n:
            await fresh_copy(client, template, stream)
        else:
            await client.delete(stream)
            await fill_stream(client, stream, count)
    finally:
        await client.aclose()


async def _drop(url: str, *keys: str) -> None:
    client = aredis.Redis.from_url(url)
    try:
        await client.delete(*keys)
    finally:
        await client.aclose()


def throughput(url: str, n: int, repeat: int, quick: bool) -> dict[str, Any]:
    """Every variant on ``n`` messages, ``repeat`` rounds, variants interleaved; each
    run in a fresh event loop of its kind (asyncio, or uvloop with BENCH_LOOP=uvloop)."""
    variants = throughput_variants(quick, bench_loops())
    template = "bench:template"
    runs: dict[str, list[dict[str, Any]]] = {v.key: [] for v in variants}
    run_in_loop("asyncio", _drop(url, template))
    run_in_loop("asyncio", _fill(url, template, n))
    # One warm-up round on a small copy (imports, code paths).
    rounds = [("warm", min(n, 5000))] + [(str(r), n) for r in range(repeat)]
    for label, count in rounds:
        for v in variants:
            stream = f"bench:tp:{v.key}:{label}"
            run_in_loop("asyncio", _prepare(url, template, stream, count, n))
            one = run_in_loop(v.loop, _measure(url, stream, count, v))
            run_in_loop("asyncio", _drop(url, stream))
            if label != "warm":
                runs[v.key].append(one)
    run_in_loop("asyncio", _drop(url, template))
    results: dict[str, Any] = {}
    for v in variants:
        rs = runs[v.key]
        med = median([r["seconds"] for r in rs])
        cmds = [sum(r["commands"].values()) / n for r in rs]
        results[v.key] = {
            "label": v.label,
            "impl": v.impl,
            "loop": v.loop,
            "concurrency": v.concurrency,
            "batch": v.batch,
            "prefetch": v.prefetch,
            "messages": n,
            "runs_s": [r["seconds"] for r in rs],
            "median_s": med,
            "msgs_per_s": n / med,
            "us_per_msg": med / n * 1e6,
            "server_cpu_us_per_msg": median([r["server_cpu_s"] for r in rs]) / n * 1e6,
            # This process's CPU time (user + sys): steadier than wall time on a busy machine.
            "client_cpu_us_per_msg": median([r["client_cpu_s"] for r in rs]) / n * 1e6,
            # From the last handler call until XPENDING shows the last ack.
            "ack_lag_ms": median([(r["seconds"] - r["handled_s"]) * 1e3 for r in rs]),
            "commands_per_msg": median(cmds),
            "commands": rs[-1]["commands"] if rs else {},
        }
    return results


async def _fill(url: str, stream: str, n: int) -> None:
    client = aredis.Redis.from_url(url)
    try:
        await fill_stream(client, stream, n)
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- fairness


async def _fair_once(url: str, n: int, prefetch: int, consumers: int) -> list[int]:
    """``consumers`` consumers of one group (own clients, one event loop) share a
    backlog of ``n``; how many messages each handled."""
    setup = aredis.Redis.from_url(url)
    stream = f"bench:fair:{prefetch}"
    await setup.delete(stream)
    await fill_stream(setup, stream, n)
    counts = [0] * consumers
    done = anyio.Event()
    clients = [aredis.Redis.from_url(url) for _ in range(consumers)]
    members = []
    for i, client in enumerate(clients):
        consumer = StreamConsumer(
            client, stream, GROUP, name=f"c{i}", start=StartFrom.EARLIEST, prefetch=prefetch
        )

        async def one(_msg: Any, i: int = i) -> None:
            counts[i] += 1
            await asyncio.sleep(0)  # a handler that yields, as real ones do
            if sum(counts) >= n:
                done.set()

        consumer.handler(TYPE)(one)
        members.append(consumer)

    async def run(consumer: StreamConsumer) -> None:
        async with consumer:
            await done.wait()

    try:
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for consumer in members:
                    tg.start_soon(run, consumer)
    finally:
        await setup.delete(stream)
        await setup.aclose()
        for client in clients:
            await client.aclose()
    return counts


def fairness(url: str, n: int, repeat: int, prefetches: tuple[int, ...] = (256, 1024)) -> Any:
    """The share of a backlog each of 3 competing consumers gets, per prefetch,
    on a backlog of ``n`` and of ``n // 10``."""
    sizes = (n, max(300, n // 10))
    per: dict[tuple[int, int], list[list[float]]] = {(p, m): [] for m in sizes for p in prefetches}
    for _ in range(repeat):
        for p, m in per:
            counts = run_in_loop("asyncio", _fair_once(url, m, p, 3))
            per[(p, m)].append(sorted((c / m for c in counts), reverse=True))
    out: dict[str, Any] = {}
    for (p, m), runs in per.items():
        out[f"{p}/{m}"] = {
            "prefetch": p,
            "messages": m,
            "max_share": median([r[0] for r in runs]),
            "min_share": median([r[-1] for r in runs]),
            "runs": runs,
        }
    return out


# --------------------------------------------------------------------------- latency


async def _latency_once(url: str, impl: str, seconds: float, rate: float) -> list[float]:
    producer = aredis.Redis.from_url(url)
    client = aredis.Redis.from_url(url)
    stream = f"bench:lat:{impl}"
    count = max(1, int(seconds * rate))
    samples: list[float] = []
    clock = time.perf_counter
    all_in = anyio.Event()

    async def on_payload(data: Any) -> None:
        samples.append(clock() - data["t"])
        if len(samples) >= count:
            all_in.set()

    async def on_message(msg: Message[Any]) -> None:
        samples.append(clock() - msg.data["t"])
        if len(samples) >= count:
            all_in.set()

    async def produce() -> None:
        start = anyio.current_time()
        for i in range(count):
            await anyio.sleep_until(start + i / rate)
            data = _encode({"t": clock(), **PAYLOAD})
            await producer.xadd(stream, {"type": TYPE, "data": data, "metadata": b"{}"})

    try:
        await client.delete(stream)
        async with anyio.create_task_group() as tg:
            if impl == "raw":
                await client.xgroup_create(stream, GROUP, id="$", mkstream=True)
                tg.start_soon(
                    lambda: raw_pipelined_loop(
                        client,
                        stream,
                        "raw",
                        on_payload,
                        block_ms=1000,
                        until=lambda: len(samples) >= count,
                    )
                )
                await produce()
                with anyio.fail_after(10):
                    await all_in.wait()
            else:
                consumer = StreamConsumer(client, stream, GROUP, name="rc", start=StartFrom.LATEST)
                consumer.handler(TYPE)(on_message)
                async with consumer:
                    await produce()
                    with anyio.fail_after(10):
                        await all_in.wait()
        await client.delete(stream)
    finally:
        await producer.aclose()
        await client.aclose()
    # The first few messages include connection set-up and cold code paths.
    return samples[min(len(samples) // 20, 50) :]


async def latency(url: str, seconds: float, rate: float, repeat: int) -> dict[str, Any]:
    per: dict[str, list[dict[str, float]]] = {"raw": [], "redcurrent": []}
    for _ in range(repeat):
        for impl in ("raw", "redcurrent"):
            s = await _latency_once(url, impl, seconds, rate)
            per[impl].append(
                {
                    "p50_ms": percentile(s, 50) * 1e3,
                    "p99_ms": percentile(s, 99) * 1e3,
                    "max_ms": max(s) * 1e3,
                    "samples": len(s),
                }
            )
    out: dict[str, Any] = {}
    for impl, runs in per.items():
        out[impl] = {
            "rate_per_s": rate,
            "seconds": seconds,
            "p50_ms": median([r["p50_ms"] for r in runs]),
            "p99_ms": median([r["p99_ms"] for r in runs]),
            "max_ms": max(r["max_ms"] for r in runs),
            "runs": runs,
        }
    return out


# --------------------------------------------------------------------------- memory


def _child(mode: str, url: str, impl: str, stream: str, count: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), mode, url, impl, stream, str(count)]
    return subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    )


async def memory(url: str, n: int) -> dict[str, Any]:
    """Each implementation in its own process over a stream holding all ``n`` entries."""
    client = aredis.Redis.from_url(url)
    out: dict[str, Any] = {}
    try:
        template = "bench:mem:template"
        await client.delete(template)
        await fill_stream(client, template, n)
        for impl in ("raw", "redcurrent"):
            stream = f"bench:mem:{impl}"
            await fresh_copy(client, template, stream)
            proc = _child("child-memory", url, impl, stream, n)
            stdout, _ = await anyio.to_thread.run_sync(proc.communicate)
            if proc.returncode != 0:
                raise RuntimeError(f"memory child ({impl}) failed with {proc.returncode}")
            out[impl] = json.loads(stdout.strip().splitlines()[-1])
            await client.delete(stream)
        await client.delete(template)
    finally:
        await client.aclose()
    return out


class _RssSampler(threading.Thread):
    def __init__(self, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop_event = threading.Event()
        self.peak = 0
        self.samples = 0

    def rss(self) -> int:
        return int(self._proc.memory_info().rss)

    def run(self) -> None:
        while not self._stop_event.wait(self._interval):
            self.peak = max(self.peak, self.rss())
            self.samples += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, self.rss())


async def _child_memory(url: str, impl: str, stream: str, n: int) -> dict[str, Any]:
    client = aredis.Redis.from_url(url)
    await client.ping()
    sampler = _RssSampler()
    marks = {int(n * p): f"rss_{int(p * 100)}pct_mb" for p in (0.1, 0.5, 1.0)}
    at: dict[str, float] = {}
    seen = 0

    def progress(k: int) -> None:
        nonlocal seen
        before, seen = seen, seen + k
        for mark, key in marks.items():
            if before < mark <= seen:
                at[key] = sampler.rss() / 2**20

    async def on_payload(_data: Any) -> None:
        progress(1)

    async def on_message(_msg: Message[Any]) -> None:
        progress(1)

    start_rss = sampler.rss() / 2**20
    sampler.start()
    started = time.perf_counter()
    if impl == "raw":
        await client.xgroup_create(stream, GROUP, id="0")
        await raw_loop(client, stream, "raw", on_payload, block_ms=1000, until=lambda: seen >= n)
    else:
        done = anyio.Event()

        async def on_last(msg: Message[Any]) -> None:
            await on_message(msg)
            if seen >= n:
                done.set()

        consumer = StreamConsumer(client, stream, GROUP, name="rc", start=StartFrom.EARLIEST)
        consumer.handler(TYPE)(on_last)
        async with consumer:
            await done.wait()
    elapsed = time.perf_counter() - started
    sampler.stop()
    await client.aclose()
    return {
        "messages": n,
        "seconds": elapsed,
        "rss_start_mb": start_rss,
        **at,
        "peak_rss_mb": sampler.peak / 2**20,
        "rss_samples": sampler.samples,
    }


# --------------------------------------------------------------------------- idle


async def idle(url: str, seconds: float) -> dict[str, Any]:
    """Commands/s a consumer sends to an empty stream, and its CPU %."""
    import psutil

    client = aredis.Redis.from_url(url)
    out: dict[str, Any] = {}

    try:
        for impl in ("raw", "redcurrent"):
            stream = f"bench:idle:{impl}"
            await client.delete(stream)
            proc = _child("child-idle", url, impl, stream, 0)
            assert proc.stdout is not None
            assert proc.stdin is not None
            line = await anyio.to_thread.run_sync(proc.stdout.readline)
            if line.strip() != "ready":
                raise RuntimeError(f"idle child ({impl}) did not start: {line!r}")
            await anyio.sleep(1.0)  # let start-up traffic settle
            ps = psutil.Process(proc.pid)
            c0, cpu0, t0 = await server_counters(client), ps.cpu_times(), time.perf_counter()
            await anyio.sleep(seconds)
            c1, cpu1, t1 = await server_counters(client), ps.cpu_times(), time.perf_counter()
            proc.stdin.write("stop\n")
            proc.stdin.flush()
            await anyio.to_thread.run_sync(proc.wait)
            wall = t1 - t0
            cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
            # INFO commandstats: every command, those inside scripts too (INFO left out).
            _, calls = counters_delta(c0, c1, own={})
            n = sum(calls.values())
            out[impl] = {
                "seconds": wall,
                "commands": n,
                "commands_per_s": n / wall,
                "by_command_per_s": {k: v / wall for k, v in sorted(calls.items())},
                "cpu_pct": 100 * cpu / wall,
            }
            await client.delete(stream)
    finally:
        await client.aclose()
    return out


async def _child_idle(url: str, impl: str, stream: str) -> None:
    client = aredis.Redis.from_url(url)
    sink = Sink(1)

    async def wait_for_stop() -> None:
        await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)

    if impl == "raw":
        await client.xgroup_create(stream, GROUP, id="$", mkstream=True)
        async with anyio.create_task_group() as tg:
            # BLOCK 4000: redcurrent's default block (5 s) kept within redis-py's
            # default socket timeout (5 s), as a working raw loop must.
            tg.start_soon(
                lambda: raw_loop(
                    client, stream, "raw", sink.one, block_ms=4000, until=lambda: False
                )
            )
            print("ready", flush=True)
            await wait_for_stop()
            tg.cancel_scope.cancel()
    else:
        consumer = make_consumer(
            client, stream, sink, concurrency=16, batch=None, start=StartFrom.LATEST
        )
        async with consumer:
            print("ready", flush=True)
            await wait_for_stop()
    await client.aclose()


# --------------------------------------------------------------------------- profile


async def _profile_target(
    url: str, n: int, concurrency: int, impl: str, batch: int | None, prefetch: int | None
) -> float:
    client = aredis.Redis.from_url(url)
    try:
        stream = "bench:profile"
        await client.delete(stream)
        await fill_stream(client, stream, n)
    finally:
        await client.aclose()
    v = Variant("p", "profile", impl, concurrency, batch, prefetch)
    return float((await _measure(url, stream, n, v))["seconds"])


def profile(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench_consumer.py profile")
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument(
        "--impl", choices=["redcurrent", "raw", "raw_pipelined"], default="redcurrent"
    )
    parser.add_argument("--cprofile", action="store_true", help="use cProfile")
    parser.add_argument("--batch", type=int, help="batch_handler size (redcurrent)")
    parser.add_argument("--prefetch", type=int, help="prefetch (redcurrent)")
    args = parser.parse_args(argv)
    loop = bench_loops()[-1]
    what = (args.concurrency, args.impl, args.batch, args.prefetch)
    with private_redis_url() as url:
        # Warm up, then profile a second run.
        run_in_loop(loop, _profile_target(url, 5000, *what))
        try:
            if args.cprofile:
                raise ImportError
            from pyinstrument import Profiler
        except ImportError:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            elapsed = run_in_loop(bench_loops()[-1], _profile_target(url, args.count, *what))
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        else:
            profiler = Profiler(interval=0.0002, async_mode="disabled")
            profiler.start()
            elapsed = run_in_loop(bench_loops()[-1], _profile_target(url, args.count, *what))
            profiler.stop()
            print(profiler.output_text(unicode=True, color=False, show_all=False))
    rate, us = args.count / elapsed, elapsed / args.count * 1e6
    print(f"{args.impl}: {rate:,.0f} msgs/s ({us:.2f} µs/msg)")


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "child-memory":
        url, impl, stream, count = sys.argv[2:6]
        print(json.dumps(asyncio.run(_child_memory(url, impl, stream, int(count)))))
    elif mode == "child-idle":
        url, impl, stream, _ = sys.argv[2:6]
        asyncio.run(_child_idle(url, impl, stream))
    elif mode == "profile":
        profile(sys.argv[2:])
    else:
        raise SystemExit(
            "usage: bench_consumer.py profile [--count N] [--concurrency C] [--impl raw]\n"
            "(run the whole suite with benchmarks/run.py)"
        )


if __name__ == "__main__":
    main()
