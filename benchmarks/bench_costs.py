"""Server commands per message: a plain message, a retried one and a scheduled one.

Part of ``benchmarks/run.py`` (section ``costs``). Counts every command the server runs
(``INFO commandstats``: commands inside scripts count one each, ``evalsha`` counts the
script calls; INFO itself is left out), from publish to the last ack:

* plain vs retried: ``retry_cost.run`` (a backlog of ``n`` published with
  ``publish_many``, handled once; then ``n`` that fail once and succeed on their retry);
* plain vs scheduled: ``n`` messages published one at a time, each awaited in the handler
  before the next, with ``publish`` and with ``publish(delay=...)`` (the worst case for
  scheduling: one mover run per message; many due at once share mover runs).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aredis

sys.path.insert(0, str(Path(__file__).resolve().parent))

import retry_cost

from redcurrent import Message, StartFrom, StreamConsumer, Topic


async def _stats(client: aredis.Redis) -> dict[str, int]:
    info = await client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(row["calls"])
        for name, row in info.items()
        if name != "cmdstat_info"
    }


async def _one_at_a_time(url: str, n: int, delay: float | None) -> dict[str, int]:
    client = aredis.Redis.from_url(url)
    stream = f"bench:cost:{'sched' if delay else 'plain'}"
    await client.delete(stream)
    got = anyio.Event()
    consumer = StreamConsumer(client, stream, "g", "c", start=StartFrom.EARLIEST, block=1.0)

    @consumer.handler("t")
    async def handle(_msg: Message[Any]) -> None:
        got.set()

    topic = Topic(client, stream)
    async with consumer:
        # Start-up and the first message out of the window.
        await topic.publish("t", {"n": -1}, delay=delay)
        await got.wait()
        before = await _stats(client)
        for i in range(n):
            got = anyio.Event()
            await topic.publish("t", {"n": i}, delay=delay)
            with anyio.fail_after(10):
                await got.wait()
        # The last ack: flushed within the acker's delay; wait for XPENDING to say so.
        polls = 1
        while int((await client.xpending(stream, "g"))["pending"]):
            polls += 1
            await anyio.sleep(0.002)
        after = await _stats(client)
        after["xpending"] -= polls
    await client.delete(stream)
    await client.aclose()
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def _extra(bad: dict[str, int], ok: dict[str, int], n: int) -> dict[str, Any]:
    total = (sum(bad.values()) - sum(ok.values())) / n
    per = {
        k: round((bad.get(k, 0) - ok.get(k, 0)) / n, 3)
        for k in sorted(set(bad) | set(ok))
        if abs(bad.get(k, 0) - ok.get(k, 0)) >= n / 100
    }
    return {"extra_commands_per_msg": total, "by_command": per}


async def costs(url: str, n: int, scheduled_n: int) -> dict[str, Any]:
    import logging

    logging.disable(logging.WARNING)
    try:
        ok = await retry_cost.run(url, n, fail=False, jitter=0.0)
        bad = await retry_cost.run(url, n, fail=True, jitter=0.0)
        plain = await _one_at_a_time(url, scheduled_n, None)
        sched = await _one_at_a_time(url, scheduled_n, 0.05)
    finally:
        logging.disable(logging.NOTSET)
    return {
        "retry": {"messages": n, **_extra(bad, ok, n)},
        "scheduled": {"messages": scheduled_n, **_extra(sched, plain, scheduled_n)},
        "plain_commands_per_msg": sum(ok.values()) / n,
        "plain_one_at_a_time_commands_per_msg": sum(plain.values()) / scheduled_n,
    }
