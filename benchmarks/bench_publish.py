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
  messages (one round trip each), reported per message;
* ``raw awaited XADD``: ``await client.xadd(...)`` one at a time, on ``N/10`` messages
  (the baseline of ``publish``);
* ``server bound -c 50`` / ``-c 1``: ``redis-benchmark -P 64`` XADD of the same entry
  (type, data, metadata) against the same server, 50 and 1 client connections; skipped
  when ``redis-benchmark`` is not installed.

Each variant also reports the server's CPU time per message (``INFO cpu``, user + sys)
and commands per message (``INFO commandstats``, INFO itself left out).

Prints a Markdown table with messages per second and the ratio of each to the raw loop,
then a JSON dict (also written to ``--json PATH``) for a suite to collect.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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


async def bench_raw_awaited(client: redis.asyncio.Redis, count: int) -> None:
    """A raw XADD awaited one by one: the baseline of ``publish`` one by one."""
    for _ in range(count):
        await client.xadd(STREAM, {"type": TYPE, "data": json.dumps(PAYLOAD), "metadata": "{}"})


#: ``redis-benchmark`` pipeline depth and clients for the server bound.
BOUND_PIPELINE = 64
BOUND_CLIENTS = (50, 1)


def server_bound_command(url: str, count: int, clients: int) -> list[str] | None:
    """The ``redis-benchmark -P 64`` XADD run of the same entry (type, data,
    metadata) against the server at ``url``, or None without redis-benchmark."""
    binary = shutil.which("redis-benchmark") or (
        "/usr/bin/redis-benchmark" if Path("/usr/bin/redis-benchmark").exists() else None
    )
    if binary is None:
        return None
    parsed = urlparse(url)
    data = json.dumps(PAYLOAD, separators=(",", ":"))
    cmd = [binary, "-h", parsed.hostname or "127.0.0.1", "-p", str(parsed.port or 6379)]
    db = (parsed.path or "/0").lstrip("/") or "0"
    cmd += ["--dbnum", db, "-n", str(count), "-P", str(BOUND_PIPELINE), "-c", str(clients)]
    cmd += ["--csv", "XADD", STREAM, "*", "type", TYPE, "data", data, "metadata", "{}"]
    return cmd


async def server_bound(client: redis.asyncio.Redis, url: str, count: int, clients: int) -> float:
    """Seconds ``redis-benchmark`` takes for ``count`` XADDs (its own rps figure),
    NaN without redis-benchmark."""
    cmd = server_bound_command(url, count, clients)
    if cmd is None:
        return math.nan
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed ({proc.returncode}): {' '.join(cmd)}")
    # The CSV's first column (the command) holds the payload's unescaped quotes:
    # read the numbers from the right (rps, then six latency columns).
    row = out.decode().strip().splitlines()[-1].split(",")
    rps = float(row[-7].strip('"'))
    return count / rps


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


async def counters(client: redis.asyncio.Redis) -> tuple[float, int]:
    """Server CPU seconds (user + sys) and commands processed (less INFO), one INFO."""
    info = await client.execute_command("INFO", "cpu", "commandstats")
    cpu = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    calls = sum(
        int(v["calls"]) for k, v in info.items() if k.startswith("cmdstat_") and k != "cmdstat_info"
    )
    return cpu, calls


async def time_once(
    client: redis.asyncio.Redis,
    func: Callable[[redis.asyncio.Redis, int], Awaitable[None]],
    count: int,
) -> dict[str, float]:
    await client.delete(STREAM)
    cpu0, calls0 = await counters(client)
    started = time.perf_counter()
    await func(client, count)
    elapsed = time.perf_counter() - started
    cpu1, calls1 = await counters(client)
    length = await client.xlen(STREAM)
    if length != count:
        raise RuntimeError(f"expected {count} entries on {STREAM!r}, found {length}")
    await client.delete(STREAM)
    return {"seconds": elapsed, "server_cpu_s": cpu1 - cpu0, "commands": calls1 - calls0}


async def time_bound(
    client: redis.asyncio.Redis, url: str, count: int, clients: int
) -> dict[str, float]:
    await client.delete(STREAM)
    cpu0, calls0 = await counters(client)
    seconds = await server_bound(client, url, count, clients)
    cpu1, calls1 = await counters(client)
    # redis-benchmark sends whole pipelines: a few more than asked.
    written = max(1, await client.xlen(STREAM))
    await client.delete(STREAM)
    return {
        "seconds": seconds,
        "server_cpu_s": (cpu1 - cpu0) * count / written,
        "commands": (calls1 - calls0) * count / written,
    }


async def run(url: str, count: int, repeat: int) -> dict[str, Any]:
    client = redis.asyncio.Redis.from_url(url)
    few = max(1, count // 10)
    has_bound = server_bound_command(url, 1, 1) is not None
    try:
        info = await client.info("server")
        persistence = await server_persistence(client)
        variants: list[Variant] = [
            ("publish_many", bench_publish_many, count),
            ("raw pipeline", bench_raw_pipeline, count),
            ("publish", bench_publish_one_by_one, few),
            ("raw awaited XADD", bench_raw_awaited, few),
        ]
        bounds = [f"server bound -c {c}" for c in BOUND_CLIENTS] if has_bound else []
        # Warm up connections, script caches and code paths.
        for _, func, n in variants:
            await time_once(client, func, min(n, 1000))
        runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in variants}
        runs.update({name: [] for name in bounds})
        for _ in range(repeat):
            for name, func, n in variants:
                runs[name].append(await time_once(client, func, n))
            for name, c in zip(bounds, BOUND_CLIENTS, strict=False):
                runs[name].append(await time_bound(client, url, count, c))
    finally:
        await client.aclose()

    sizes = {name: n for name, _, n in variants} | dict.fromkeys(bounds, count)
    results: dict[str, Any] = {}
    for name, n in sizes.items():
        rs = runs[name]
        median = statistics.median(r["seconds"] for r in rs)
        results[name] = {
            "messages": n,
            "median_s": median,
            "runs_s": [r["seconds"] for r in rs],
            "msgs_per_s": n / median,
            "us_per_msg": median / n * 1e6,
            "server_cpu_us_per_msg": statistics.median(r["server_cpu_s"] for r in rs) / n * 1e6,
            "commands_per_msg": statistics.median(r["commands"] for r in rs) / n,
        }
    raw_rate = results["raw pipeline"]["msgs_per_s"]
    for entry in results.values():
        entry["ratio_to_raw"] = entry["msgs_per_s"] / raw_rate
    bound_cmd = server_bound_command(url, count, BOUND_CLIENTS[0])
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
        "server_bound_command": " ".join(bound_cmd) if bound_cmd else None,
        "results": results,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"publish benchmark: N={report['count']}, median of {report['repeat']}, "
        f"Redis {report['redis_version']} ({report['persistence']}), "
        f"redis-py {report['redis_py']}, "
        f"Python {report['python']}",
        "",
        "| variant | messages | median s | msgs/s | µs/msg | server CPU µs/msg "
        "| commands/msg | vs raw loop |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["results"].items():
        lines.append(
            f"| {name} | {r['messages']} | {r['median_s']:.3f} | {r['msgs_per_s']:,.0f} "
            f"| {r['us_per_msg']:.2f} | {r['server_cpu_us_per_msg']:.2f} "
            f"| {r['commands_per_msg']:.3f} | {r['ratio_to_raw']:.2f}x |"
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
