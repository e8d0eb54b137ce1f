"""Commands packed by hiredis and sent through redis-py's connection API
(``_redis.packed_sender`` / ``packed_pipeline``, used for XACKs of many ids):
the same replies and errors as ``execute_command``, and a connection that goes
back to the pool with nothing unread, also after an error reply."""

from __future__ import annotations

import pytest
import redis.asyncio
from redis.exceptions import ResponseError

from redcurrent._redis import packed_pipeline, packed_sender, raw_reply_client


async def test_packed_xack_acknowledges_many_ids(redis_client: redis.asyncio.Redis) -> None:
    ids = [await redis_client.xadd("s", {"f": "v"}) for _ in range(300)]
    await redis_client.xgroup_create("s", "g", id="0")
    await redis_client.xreadgroup("g", "c", {"s": ">"}, count=1000)
    send = packed_sender(redis_client)
    assert send != redis_client.execute_command  # the packed path is the one tested
    assert await send("XACK", b"s", "g", *ids) == 300
    assert (await redis_client.xpending("s", "g"))["pending"] == 0


async def test_error_reply_raised_after_every_reply_is_read(
    redis_client: redis.asyncio.Redis,
) -> None:
    await redis_client.xadd("s", {"f": "v"})
    await redis_client.xgroup_create("s", "g", id="0")
    client = raw_reply_client(redis_client, "XREADGROUP")
    both = packed_pipeline(client)
    read = ("XREADGROUP", "GROUP", "g", "c", "COUNT", 10, "STREAMS", "s", ">")
    await redis_client.set("not-a-stream", "x")
    with pytest.raises(ResponseError) as caught:
        await both(("XACK", "not-a-stream", "g", b"1-0", b"2-0"), read)
    assert str(caught.value).startswith("WRONGTYPE")
    # The read after the failing XACK ran and its reply was consumed: the pooled
    # connection answers the next command with its own reply.
    assert await redis_client.ping() is True
    assert (await redis_client.xpending("s", "g"))["pending"] == 1
    replies = await both(("XACK", "s", "g", b"0-1"), read)
    assert replies[0] == 0
    assert not replies[1]  # nothing new to read
