"""The Redis cost of scheduled messages and of the movers' idle loop.

Run: ``PYTHONPATH=src python benchmarks/schedule_cost.py [seconds] [consumers]``.
Starts a private Redis (the ``redis-server`` redcurrent.testing finds), then
counts, with ``INFO commandstats``: the script runs per scheduled message
(publish + move) for one message at a time and for 1,000 due at once, and the
mover runs per second of consumers with nothing due. Inside the scripts only
the mover sends ZRANGEBYSCORE and only a schedule sends ZADD, so those count
the runs.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

import anyio
import redis.asyncio as aredis

from redcurrent import Message, StartFrom, StreamConsumer, Topic
from redcurrent.testing import RedisServer, find_redis_server

STREAM = "bench:schedule"


async def stats(client: aredis.Redis) -> dict[str, int]:
    info = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in info.items()}


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


async def main(seconds: float, consumers: int) -> None:
    binary = find_redis_server()
    assert binary is not None, "no redis-server"
    with RedisServer(binary) as server:
        client = aredis.Redis.from_url(server.url)
        topic = Topic(client, STREAM)
        got: list[str] = []
        runners = []
        for i in range(consumers):
            consumer = StreamConsumer(
                client, STREAM, f"g{i % 2}", f"c{i}", start=StartFrom.EARLIEST
            )

            async def handle(msg: Message[Any]) -> None:
                got.append(msg.id)

            consumer.handler("t")(handle)
            runners.append(consumer)
        async with contextlib.AsyncExitStack() as stack:
            for consumer in runners:
                await stack.enter_async_context(consumer)
            await anyio.sleep(1)

            # Idle, nothing scheduled: the movers' cap.
            before, t0 = await stats(client), time.perf_counter()
            await anyio.sleep(seconds)
            idle = diff(await stats(client), before)
            wall = time.perf_counter() - t0
            runs = idle.get("zrangebyscore", 0)
            print(
                f"idle, nothing scheduled, {consumers} consumers, {wall:.0f} s: "
                f"{runs} mover runs = {runs / wall / consumers:.2f} runs/s per consumer "
                f"(all commands: {sum(v for k, v in idle.items() if k not in INNER)} "
                f"top-level, of which evalsha {idle.get('evalsha', 0)})"
            )

            # One message at a time, each due 0.5 s later.
            n = 20
            before = await stats(client)
            for _ in range(n):
                await topic.publish("t", None, delay=0.5)
                await anyio.sleep(0.7)
            one = diff(await stats(client), before)
            print(
                f"one at a time, {n} messages: {one.get('zadd', 0)} schedule runs, "
                f"{one.get('zrangebyscore', 0)} mover runs "
                f"= {one.get('zrangebyscore', 0) / n:.2f} per message "
                f"({one.get('publish', 0)} notices)"
            )

            # 1,000 due at once.
            count = 1000
            before = await stats(client)
            await topic.publish_many([("t", None)] * count, delay=0.5)
            await anyio.sleep(1.5)
            many = diff(await stats(client), before)
            print(
                f"{count} due at once: {many.get('evalsha', 0)} evalsha in all "
                f"({many.get('zrangebyscore', 0)} mover runs, "
                f"{many.get('zrangebyscore', 0) / count:.3f} per message), "
                f"{many.get('xadd', 0)} XADD inside them"
            )
        await client.aclose()


INNER = {
    "time",
    "zrange",
    "zrangebyscore",
    "zadd",
    "zrem",
    "hset",
    "hget",
    "hdel",
    "xadd",
    "publish",
    "xpending",
    "xclaim",
    "xack",
    "xrange",
    "xinfo|consumers",
}

if __name__ == "__main__":
    anyio.run(
        main,
        float(sys.argv[1]) if len(sys.argv) > 1 else 30.0,
        int(sys.argv[2]) if len(sys.argv) > 2 else 1,
    )
