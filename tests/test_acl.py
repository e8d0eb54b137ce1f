"""The ACL rule the README gives is enough for every feature, and a user without
one of its permissions is told so at once (AccessDeniedError), never retried."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import redis.asyncio

from helpers import Recorder, nothing_pending, wait_until
from redcurrent import (
    AccessDeniedError,
    CleanupPolicy,
    ConfigurationError,
    Message,
    StartFrom,
    StreamConsumer,
    Topic,
)
from redcurrent.testing import RedisServer

STREAM = "orders"
GROUP = "workers"
PASSWORD = "s3cret"

# The README's rule, word for word (section "ACL permissions").
README_RULE = (
    "on",
    f">{PASSWORD}",
    "~orders",
    "~redcurrent:{orders}:orders:*",
    "resetchannels",
    "&redcurrent:{orders}:orders:control",
    "+@stream",
    "+@scripting",
    "+subscribe",
    "+publish",
    "+smembers",
    "+sadd",
    "+srem",
    "+del",
    "+set",
    "+get",
    "+pexpire",
    "+exists",
    "+type",
    "+info",
    "+ping",
    "+time",
    "+client|setinfo",
)

pytestmark = pytest.mark.private_server


@pytest.fixture
async def acl_server(private_redis: RedisServer) -> AsyncIterator[RedisServer]:
    admin = redis.asyncio.Redis.from_url(private_redis.url)
    try:
        rule: list[Any] = list(README_RULE)
        if private_redis.version < (7, 2):
            rule.remove("+client|setinfo")  # CLIENT SETINFO came with 7.2
        await admin.acl_setuser("orders-worker", reset=True)
        await admin.execute_command("ACL", "SETUSER", "orders-worker", *rule)
        for command in ("xgroup", "xclaim"):
            await admin.execute_command(
                "ACL", "SETUSER", f"no-{command}", *rule, f"-{command}", "resetpass", ">x"
            )
        yield private_redis
    finally:
        await admin.aclose()


def _client(server: RedisServer, user: str, password: str) -> redis.asyncio.Redis:
    return redis.asyncio.Redis(host="127.0.0.1", port=server.port, username=user, password=password)


async def test_the_readme_rule_is_enough_for_every_feature(acl_server: RedisServer) -> None:
    client = _client(acl_server, "orders-worker", PASSWORD)
    try:
        topic = Topic(client, STREAM)
        seen = Recorder()
        consumer = StreamConsumer(
            client,
            STREAM,
            GROUP,
            "c1",
            start=StartFrom.EARLIEST,
            claim_idle=0.5,
            concurrency=4,
            max_deliveries=1,
            cleanup=CleanupPolicy(auto=True, interval=0.2, max_length=0, min_retention=0),
        )

        @consumer.handler("job")
        async def job(msg: Message[Any]) -> None:
            if msg.data.get("fail"):
                raise RuntimeError("boom")
            await seen(msg)

        ids = await topic.publish_many([("job", {"n": i}) for i in range(300)])
        await topic.stop_message(ids[5])
        async with consumer:
            await topic.publish("job", {"fail": True})
            await seen.wait_for(299, timeout=20)
            await topic.resume_message(ids[5])
            await seen.wait_for(300, timeout=20)
            await wait_until(nothing_pending(client, STREAM, GROUP), timeout=10)
            letters = await topic.dead_letters()
            assert [letter.reason for letter in letters] == ["RuntimeError: boom"]
            info = await topic.info()
            assert info.groups[0].pending == 0
            assert await topic.cleanup(CleanupPolicy(min_retention=0)) >= 0
            await topic.terminate()
            assert await consumer.done() == "terminated"
        assert consumer.error is None
        assert sorted(seen.ids, key=lambda i: tuple(map(int, i.split("-")))) == ids
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("user", "password"),
    [("orders-worker", "wrong"), ("nobody", PASSWORD), ("no-xgroup", "x")],
    ids=["wrong-password", "unknown-user", "missing-permission"],
)
async def test_denied_start_up_fails_at_once(
    acl_server: RedisServer, user: str, password: str
) -> None:
    client = _client(acl_server, user, password)
    try:
        consumer = StreamConsumer(client, STREAM, GROUP, "c1", start_timeout=60)
        consumer.handler("job")(Recorder())
        with anyio.fail_after(10):  # far below start_timeout: no retry loop
            with pytest.raises(AccessDeniedError) as caught:
                async with consumer:
                    pytest.fail("a denied consumer must not start")
        assert isinstance(caught.value, ConfigurationError)
        assert caught.value.__cause__ is not None
        if user == "no-xgroup":
            assert "xgroup" in str(caught.value).lower()
    finally:
        await client.aclose()


async def test_a_permission_only_scripts_use_fails_the_consumer_at_once(
    acl_server: RedisServer,
) -> None:
    """XCLAIM runs only inside the lease script, which the start-up check cannot
    try harmlessly: the first lease refresh fails the consumer, at once."""
    client = _client(acl_server, "no-xclaim", "x")
    try:
        consumer = StreamConsumer(
            client, STREAM, GROUP, "c1", start=StartFrom.EARLIEST, claim_idle=0.6
        )

        @consumer.handler("job")
        async def job(msg: Message[Any]) -> None:
            await anyio.sleep_forever()

        await Topic(client, STREAM).publish_many([("job", {"n": i}) for i in range(5)])
        with anyio.fail_after(10):
            async with consumer:
                assert await consumer.done() == "failed"
        # Redis reports a command refused inside a script without an error code
        # (and in words that differ between servers): FAILED, with the server's error.
        assert isinstance(consumer.error, redis.exceptions.ResponseError)
        # Nothing was handled or acknowledged: all five are still pending.
        assert (await client.xpending(STREAM, GROUP))["pending"] == 5
    finally:
        await client.aclose()
