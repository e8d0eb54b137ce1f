"""How the consumer reads the server's replies and errors, checked against a real server."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import redis.asyncio as aredis
from redis import exceptions as rex

from helpers import wait_until
from redcurrent import Message, StartFrom, StreamConsumer, Topic
from redcurrent._faults import Fault, classify
from redcurrent._redis import block_within_socket_timeout, entries_of, raw_reply_client


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("raw", [False, True])
async def test_entries_of_reads_every_reply_shape(redis_url: str, protocol: int, raw: bool) -> None:
    client = aredis.Redis.from_url(redis_url, protocol=protocol)
    reader = raw_reply_client(client, "XREADGROUP") if raw else client
    try:
        await client.delete("shapes")
        await client.xgroup_create("shapes", "g", id="0", mkstream=True)
        first = await client.xadd("shapes", {"type": "a", "data": "{}", "metadata": "{}"})
        await client.xadd("shapes", {"type": "b", "data": "[1]", "extra": "x"})
        reply = await reader.execute_command(
            "XREADGROUP", "GROUP", "g", "c", "COUNT", 10, "STREAMS", "shapes", ">"
        )
        entries = entries_of(reply)
        assert [fields[b"type"] for _, fields in entries] == [b"a", b"b"]
        assert entries[1][1] == {b"type": b"b", b"data": b"[1]", b"extra": b"x"}
        # A pending entry deleted from the stream comes back with no fields.
        await client.xdel("shapes", first)
        history = await reader.execute_command(
            "XREADGROUP", "GROUP", "g", "c", "COUNT", 10, "STREAMS", "shapes", "0"
        )
        assert entries_of(history)[0] == (first, {})
        assert entries_of(None) == []
    finally:
        await client.delete("shapes")
        await client.aclose()


async def test_server_errors_are_classified(redis_client: aredis.Redis, redis_url: str) -> None:
    with pytest.raises(rex.ResponseError) as nogroup:
        await redis_client.xreadgroup("missing", "c", {"nostream": ">"})
    assert classify(nogroup.value) is Fault.GONE

    # An operator's CLIENT UNBLOCK ... ERROR is not a deletion.
    await redis_client.xgroup_create("s", "g", id="$", mkstream=True)
    blocked = aredis.Redis.from_url(redis_url)
    client_id = await blocked.client_id()
    caught: list[BaseException] = []

    async def read() -> None:
        try:
            await blocked.xreadgroup("g", "c", {"s": ">"}, block=3000)
        except rex.ResponseError as exc:
            caught.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        await wait_until(lambda: _blocked_in_xreadgroup(redis_client, client_id), timeout=3.0)
        await redis_client.client_unblock(client_id, error=True)
    await blocked.aclose()
    assert caught
    assert str(caught[0]).startswith("UNBLOCKED")
    assert classify(caught[0]) is Fault.TRANSIENT

    refused = aredis.Redis(port=1, socket_connect_timeout=0.5, retry_on_error=[])
    with pytest.raises(rex.ConnectionError) as down:
        await refused.ping()
    await refused.aclose()
    assert classify(down.value) is Fault.TRANSIENT


async def _blocked_in_xreadgroup(client: aredis.Redis, client_id: int) -> bool:
    clients = await client.client_list()
    return any(int(c["id"]) == client_id and c["cmd"] == "xreadgroup" for c in clients)


async def test_a_consumer_on_a_resp3_client(redis_url: str, redis_client: aredis.Redis) -> None:
    client = aredis.Redis.from_url(redis_url, protocol=3)
    topic = Topic(client, "resp3")
    consumer = StreamConsumer(client, "resp3", "g", start=StartFrom.EARLIEST, block=0.2)
    seen: list[int] = []

    @consumer.handler("n")
    async def handle(msg: Message[Any]) -> None:
        seen.append(msg.data)

    try:
        await topic.publish_many([("n", i) for i in range(50)])
        async with consumer:
            await wait_until(lambda: len(seen) == 50)
        assert seen == list(range(50))
    finally:
        await client.aclose()


def test_blocking_reads_fit_inside_the_socket_timeout() -> None:
    # The default socket timeout differs between redis-py versions: say it.
    url = "redis://x?socket_timeout=5"
    assert block_within_socket_timeout(aredis.Redis.from_url(url), 5.0) == 4.0
    assert block_within_socket_timeout(aredis.Redis(socket_timeout=None), 5.0) == 5.0
    assert block_within_socket_timeout(aredis.Redis(socket_timeout=2), 5.0) == 1.6
