"""The Redis cost of idempotent publish: commands per message and memory per key.

Run: ``PYTHONPATH=src python benchmarks/idempotency_cost.py [redis-server ...]``
(default: the ``redis-server`` redcurrent.testing finds). Starts a private
server per binary and prints, from ``INFO commandstats``, the commands the
keyed script runs per message for single publishes, for one ``publish_many``
chunk and for a repeat of that chunk (every key remembered), then ``MEMORY
USAGE`` of one remembered key and the growth of ``used_memory`` per keyed
message (stream entry included).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable

import anyio
import redis.asyncio as aredis

from redcurrent import Topic
from redcurrent.testing import RedisServer, find_redis_server

N = 1000
BULK = 100_000


async def measure(url: str) -> None:
    client = aredis.Redis.from_url(url)
    topic = Topic(client, "orders")
    await topic.publish("order", {"n": 0}, idempotency_key="warm-up")

    async def singles() -> None:
        for n in range(N):
            await topic.publish("order", {"n": n}, idempotency_key=f"order-{n:06d}")

    async def chunk() -> None:
        await topic.publish_many([("order", {"n": n}, None, f"many-{n:06d}") for n in range(N)])

    runs: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        (f"publish x{N}", singles),
        (f"publish_many of {N} (one chunk)", chunk),
        (f"publish_many of the same {N} (all remembered)", chunk),
    ]
    for label, run in runs:
        await client.config_resetstat()
        await run()
        stats = await client.info("commandstats")
        calls = {
            name[len("cmdstat_") :]: value["calls"]
            for name, value in stats.items()
            if name.startswith("cmdstat_") and not name.startswith("cmdstat_config")
        }
        per = ", ".join(f"{name} {count / N:g}" for name, count in sorted(calls.items()))
        print(f"  {label}: per message {per}")
    for key in ("order-000042", "x" * 36):
        await topic.publish("order", {}, idempotency_key=key)
        name = topic.keys.idempotency(key)
        print(f"  MEMORY USAGE of a {len(key)}-char key: {await client.memory_usage(name)} B")
    before = (await client.info("memory"))["used_memory"]
    await topic.publish_many([("order", {}, None, f"bulk-{n:06d}") for n in range(BULK)])
    after = (await client.info("memory"))["used_memory"]
    print(f"  used_memory per keyed message (entry + key): {(after - before) / BULK:.0f} B")
    await client.aclose()


def main() -> None:
    binaries = sys.argv[1:] or [find_redis_server()]
    for binary in binaries:
        if binary is None:
            raise SystemExit("no redis-server found")
        with RedisServer(binary) as server:
            print(f"Redis {'.'.join(map(str, server.version))}")
            anyio.run(measure, server.url)


if __name__ == "__main__":
    main()
