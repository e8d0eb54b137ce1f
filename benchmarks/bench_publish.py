"""Publishing throughput: redcurrent against the redis-py loop a user would write.

Usage::

    python benchmarks/bench_publish.py [--count N] [--repeat R] [--url URL] [--json PATH]

Without ``--url`` a server is found or started by ``redcurrent.testing.redis_url_for_demo()``
(``REDCURRENT_TEST_REDIS_URL``, a container, a private ``redis-server``, or the embedded
one) and stopped afterwards. Point ``--url`` only at a server whose stream ``bench:publish``
you may delete.

Measured side by side in one run, each the median of ``R`` repetitions (the variants take
turns inside each repetition, on a fresh stream each time):

* ``publish_many``: :meth:`redcurrent.Topic.publish_many` on ``N`` messages;
* ``raw pipeline``: a redis-py pipelined ``XADD`` loop (``transaction=False``, chunks of
  500, payload encoded with ``json.dumps``), as a user would write it;
* ``publish``: :meth:`redcurrent.Topic.publish` one message at a time, on ``N/10``
  messages (one round trip each), reported per message.

Prints a Markdown table with messages per second and the ratio of each to the raw loop,
then a JSON dict (also written to ``--json PATH``) for a suite to collect.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import redis
import redis.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PAYLOAD, TYPE

import redcurrent
from redcurrent import Topic

STREAM = "bench:publish"
CHUNK = 500


async def bench_publish_many(client: redis.asyncio.Redis, count: int) -> None:
    topic = Topic(client, STREAM)
    items = [(TYPE, PAYLOAD)] * count
    ids = await topic.publish_many(items)
    assert len(ids) == count


async def bench_raw_pipeline(client: redis.asyncio.Redis, count: int) -> None:
    ids: list[Any] = []
    for start in range(0, count, CHUNK):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(CHUNK, count - start)):
            pipe.xadd(STREAM, {"type": TYPE, "data": json.dumps(PAYLOAD), "metadata": "{}"})
        ids.extend(await pipe.execute())
    assert len(ids) == count


async def bench_publish_one_by_one(client: redis.asyncio.Redis, count: int) -> None:
    topic = Topic(client, STREAM)
    for _ in range(count):
        await topic.publish(TYPE, PAYLOAD)


async def server_persistence(client: redis.asyncio.Redis) -> str:
    """How the server persists writes; ``appendfsync always`` slows every round trip."""
    try:
        config = await client.config_get("appendonly")
        config.update(await client.config_get("appendfsync"))
    except redis.RedisError:  # CONFIG may be disabled on managed servers
        return "unknown"
    values = {k.decode() if isinstance(k, bytes) else k: v for k, v in config.items()}

    def text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    if text(values.get("appendonly")) != "yes":
        return "no AOF"
    return f"AOF, appendfsync {text(values.get('appendfsync'))}"


Variant = tuple[str, Callable[[redis.asyncio.Redis, int], Awaitable[None]], int]


async def time_once(
    client: redis.asyncio.Redis,
    func: Callable[[redis.asyncio.Redis, int], Awaitable[None]],
    count: int,
) -> float:
    await client.delete(STREAM)
    started = time.perf_counter()
    await func(client, count)
    elapsed = time.perf_counter() - started
    length = await client.xlen(STREAM)
    if length != count:
        raise RuntimeError(f"expected {count} entries on {STREAM!r}, found {length}")
    await client.delete(STREAM)
    return elapsed


async def run(url: str, count: int, repeat: int) -> dict[str, Any]:
    client = redis.asyncio.Redis.from_url(url)
    try:
        info = await client.info("server")
        persistence = await server_persistence(client)
        variants: list[Variant] = [
            ("publish_many", bench_publish_many, count),
            ("raw pipeline", bench_raw_pipeline, count),
            ("publish", bench_publish_one_by_one, max(1, count // 10)),
        ]
        # Warm up connections, script caches and code paths.
        for _, func, n in variants:
            await time_once(client, func, min(n, 1000))
        times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
        for _ in range(repeat):
            for name, func, n in variants:
                times[name].append(await time_once(client, func, n))
    finally:
        await client.aclose()

    results: dict[str, Any] = {}
    for name, _, n in variants:
        median = statistics.median(times[name])
        results[name] = {
            "messages": n,
            "median_s": median,
            "runs_s": times[name],
            "msgs_per_s": n / median,
            "us_per_msg": median / n * 1e6,
        }
    raw_rate = results["raw pipeline"]["msgs_per_s"]
    for entry in results.values():
        entry["ratio_to_raw"] = entry["msgs_per_s"] / raw_rate
    return {
        "benchmark": "publish",
        "count": count,
        "repeat": repeat,
        "chunk": CHUNK,
        "payload_bytes": len(json.dumps(PAYLOAD, separators=(",", ":"))),
        "redis_version": str(info.get("redis_version", "?")),
        "persistence": persistence,
        "redis_py": redis.__version__,
        "redcurrent": redcurrent.__version__,
        "python": platform.python_version(),
        "results": results,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"publish benchmark: N={report['count']}, median of {report['repeat']}, "
        f"Redis {report['redis_version']} ({report['persistence']}), "
        f"redis-py {report['redis_py']}, "
        f"Python {report['python']}",
        "",
        "| variant | messages | median s | msgs/s | µs/msg | vs raw loop |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["results"].items():
        lines.append(
            f"| {name} | {r['messages']} | {r['median_s']:.3f} | {r['msgs_per_s']:,.0f} "
            f"| {r['us_per_msg']:.2f} | {r['ratio_to_raw']:.2f}x |"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def server_url(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    try:
        from redcurrent.testing import redis_url_for_demo
    except ImportError as exc:  # pytest is not installed, for one
        raise SystemExit(
            f"cannot import redcurrent.testing ({exc}); pass --url redis://host:port/db"
        ) from exc
    try:
        manager = redis_url_for_demo()
        found = manager.__enter__()
    except Exception as exc:
        raise SystemExit(
            f"no Redis server found or started ({type(exc).__name__}: {exc});\n"
            "pass --url redis://host:port/db of a server you may write to"
        ) from exc
    try:
        yield found
    finally:
        manager.__exit__(None, None, None)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="messages per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant (median)")
    parser.add_argument("--url", default=os.environ.get("BENCH_REDIS_URL"), help="Redis URL")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.count < 1 or args.repeat < 1:
        parser.error("--count and --repeat must be positive")

    with server_url(args.url) as url:
        report = asyncio.run(run(url, args.count, args.repeat))
    print(table(report))
    print()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
