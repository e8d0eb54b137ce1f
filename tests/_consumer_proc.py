"""A consumer in its own process, for tests that SIGKILL it.

Usage: ``python _consumer_proc.py URL STREAM GROUP NAME HELD_KEY``

Every message it receives is pushed (its id) onto the list ``HELD_KEY``; then
the handler blocks forever, so the process holds every message it got until
it is killed.
"""

from __future__ import annotations

import sys

import anyio
import redis.asyncio

from redcurrent import Message, StartFrom, StreamConsumer


async def main(url: str, stream: str, group: str, name: str, held_key: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    consumer = StreamConsumer(
        client,
        stream,
        group,
        name,
        start=StartFrom.EARLIEST,
        claim_idle=0.5,
        block=0.2,
        concurrency=32,
    )

    @consumer.handler("*")
    async def hold(msg: Message) -> None:
        await client.rpush(held_key, msg.id)
        await anyio.sleep_forever()

    await consumer.run()


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:6])
