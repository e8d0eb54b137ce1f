"""The Redis cost of a retry: commands per retried message.

Run: ``PYTHONPATH=src python benchmarks/retry_cost.py [messages]``.
Starts a private Redis (the ``redis-server`` redcurrent.testing finds), has a
consumer handle ``messages`` entries that succeed at once, then as many that
fail once and succeed on their retry (``RetryPolicy(delay=0.5)``, without and
with jitter), and prints the difference in ``INFO commandstats`` per message:
what retrying costs on top of handling. Commands run inside scripts are
counted as such (``XPENDING``, ``XCLAIM``), and ``evalsha`` counts the script
calls, each one round trip.
"""

from __future__ import annotations

import sys

import anyio
import redis.asyncio as aredis

from redcurrent import Message, RetryPolicy, StartFrom, StreamConsumer, Topic
from redcurrent.testing import RedisServer, find_redis_server


async def stats(client: aredis.Redis) -> dict[str, int]:
    info = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in info.items()}


async def run(url: str, n: int, *, fail: bool, jitter: float) -> dict[str, int]:
    client = aredis.Redis.from_url(url)
    stream = f"bench:retry:{fail}:{jitter}"
    await client.delete(stream)
    await Topic(client, stream).publish_many([("t", {"n": i}) for i in range(n)])
    done: set[str] = set()
    finished = anyio.Event()
    consumer = StreamConsumer(
        client,
        stream,
        "g",
        "c",
        start=StartFrom.EARLIEST,
        block=1.0,
        claim_idle=60.0,
        prefetch=2 * n,  # every retry waits in memory (at most prefetch // 2 do)
        retry=RetryPolicy(delay=0.5, jitter=jitter),
    )

    @consumer.handler("t")
    async def handle(msg: Message) -> None:
        if fail and msg.delivery_count == 1:
            raise RuntimeError("once")
        done.add(msg.id)
        if len(done) == n:
            finished.set()

    before = await stats(client)
    async with consumer:
        await finished.wait()
        retried = consumer.stats.retried
    assert retried == (n if fail else 0), retried
    after = await stats(client)
    await client.aclose()
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


async def main(n: int) -> None:
    import logging

    logging.disable(logging.WARNING)
    with RedisServer(find_redis_server()) as server:
        ok = await run(server.url, n, fail=False, jitter=0.0)
        for jitter in (0.0, 0.1):
            bad = await run(server.url, n, fail=True, jitter=jitter)
            diff = {k: bad.get(k, 0) - ok.get(k, 0) for k in set(ok) | set(bad)}
            per = {k: round(v / n, 3) for k, v in sorted(diff.items()) if abs(v) >= n / 100}
            print(f"{n} messages failing once, jitter {jitter}: extra per message {per}")


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
