"""A read that failed may have been delivered: the server moved its entries to
the consumer's pending list, and the reply was lost with the connection (a
cluster client closes every connection on some redirects, a failover cuts
them). The consumer reads its own pending list again after any read error,
so such entries are handled at once rather than after ``claim_idle``."""

from __future__ import annotations

from typing import Any

import redis.asyncio

from helpers import wait_until
from redcurrent import Message, StartFrom, StreamConsumer, Topic

STREAM = "read-recovery"


async def test_entries_delivered_to_a_failed_read_are_handled_without_waiting_for_a_claim(
    redis_client: redis.asyncio.Redis,
) -> None:
    topic = Topic(redis_client, STREAM)
    handled: list[int] = []
    consumer = StreamConsumer(
        redis_client, STREAM, "g", "c", start=StartFrom.EARLIEST, claim_idle=600.0, block=5.0
    )

    @consumer.handler("t")
    async def record(msg: Message[Any]) -> None:
        handled.append(msg.data["n"])

    async with consumer:
        await topic.publish("t", {"n": 0})
        await wait_until(lambda: handled == [0])
        # Entries delivered to "c" whose reply "c" never saw, as a lost reply
        # leaves them: added and read in one transaction, before the blocked
        # read of "c" is served (it gets nothing).
        async with redis_client.pipeline(transaction=True) as pipe:
            for n in range(1, 51):
                pipe.xadd(STREAM, {"type": "t", "data": f'{{"n":{n}}}', "metadata": "{}"})
            pipe.xreadgroup("g", "c", {STREAM: ">"}, count=50)
            await pipe.execute()

        async def blocked_reads() -> list[int]:
            clients = await redis_client.client_list()
            return [int(c["id"]) for c in clients if c.get("cmd") == "xreadgroup"]

        await wait_until(blocked_reads)
        for client_id in await blocked_reads():
            await redis_client.client_kill_filter(_id=client_id)
        # claim_idle is 600 s: only re-reading its own pending list brings them.
        await wait_until(lambda: sorted(handled) == list(range(51)), timeout=10)
