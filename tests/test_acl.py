"""The ACL rule the README gives is enough for every feature, and a user without
one of its permissions, or pointed at a topic outside it, is told so at once
(AccessDeniedError), never retried and never left hanging."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
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
    StopReason,
    StreamConsumer,
    Topic,
)
from redcurrent.testing import RedisServer

STREAM = "orders"
GROUP = "workers"
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_rule() -> tuple[str, tuple[str, ...]]:
    """The user name and rule of the ``ACL SETUSER`` block in the README's
    "ACL permissions" section, read from the README so the two cannot drift."""
    section = README.read_text().split("### ACL permissions", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.DOTALL)
    assert block is not None, "the README's ACL section has no code block"
    words = block.group(1).split()
    assert words[:2] == ["ACL", "SETUSER"], words
    return words[2], tuple(words[3:])


USER, README_RULE = readme_rule()
PASSWORD = next(word[1:] for word in README_RULE if word.startswith(">"))
# The README says to leave this one out before Redis 7.2 (no CLIENT SETINFO there).
SETINFO = "+client|setinfo"

pytestmark = pytest.mark.private_server


@pytest.fixture
async def acl_server(private_redis: RedisServer) -> AsyncIterator[RedisServer]:
    admin = redis.asyncio.Redis.from_url(private_redis.url)
    try:
        rule: list[Any] = list(README_RULE)
        if private_redis.version < (7, 2):
            rule.remove(SETINFO)
        await admin.acl_setuser(USER, reset=True)
        await admin.execute_command("ACL", "SETUSER", USER, *rule)
        for command in ("xgroup", "xclaim", "del"):
            await admin.execute_command(
                "ACL", "SETUSER", f"no-{command}", *rule, f"-{command}", "resetpass", ">x"
            )
        no_channel = [word for word in rule if not word.startswith("&")]
        await admin.execute_command("ACL", "SETUSER", "no-channel", *no_channel, "resetpass", ">x")
        yield private_redis
    finally:
        await admin.aclose()


def _client(server: RedisServer, user: str, password: str) -> redis.asyncio.Redis:
    return redis.asyncio.Redis(host="127.0.0.1", port=server.port, username=user, password=password)


async def test_the_readme_rule_is_enough_for_every_feature(acl_server: RedisServer) -> None:
    client = _client(acl_server, USER, PASSWORD)
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
            replayed = await topic.replay_dead_letters()
            assert len(replayed) == 1

            async def died_again() -> bool:  # max_deliveries=1: it fails once more
                again = await topic.dead_letters()
                return [(d.original_id, d.reason) for d in again] == [
                    (replayed[0], "RuntimeError: boom")
                ]

            await wait_until(died_again, timeout=10)
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
    ("user", "password", "stream"),
    [
        (USER, "wrong", STREAM),
        ("nobody", PASSWORD, STREAM),
        ("no-xgroup", "x", STREAM),
        (USER, PASSWORD, "invoices"),
    ],
    ids=["wrong-password", "unknown-user", "missing-permission", "topic-outside-the-rule"],
)
async def test_denied_start_up_fails_at_once(
    acl_server: RedisServer, user: str, password: str, stream: str
) -> None:
    client = _client(acl_server, user, password)
    try:
        consumer = StreamConsumer(client, stream, GROUP, "c1", start_timeout=60)
        consumer.handler("job")(Recorder())
        with anyio.fail_after(10):  # far below start_timeout: no retry loop
            with pytest.raises(AccessDeniedError) as caught:
                async with consumer:
                    pytest.fail("a denied consumer must not start")
        assert isinstance(caught.value, ConfigurationError)
        assert caught.value.__cause__ is not None
        if user == "no-xgroup":
            assert "xgroup" in str(caught.value).lower()
        if stream != STREAM:
            assert repr(stream) in str(caught.value)
    finally:
        await client.aclose()


async def test_a_permission_only_scripts_use_fails_the_consumer_at_once(
    acl_server: RedisServer,
) -> None:
    """XCLAIM runs only inside the lease script, which cannot be tried
    harmlessly. From Redis 7.0 the start-up check asks the ACL about it and the
    start fails; before 7.0 the first lease refresh fails the consumer, at once."""
    client = _client(acl_server, "no-xclaim", "x")
    try:
        consumer = StreamConsumer(
            client, STREAM, GROUP, "c1", start=StartFrom.EARLIEST, claim_idle=0.6
        )

        @consumer.handler("job")
        async def job(msg: Message[Any]) -> None:
            await anyio.sleep_forever()

        await Topic(client, STREAM).publish_many([("job", {"n": i}) for i in range(5)])
        if acl_server.version >= (7, 0):
            with anyio.fail_after(10), pytest.raises(AccessDeniedError) as caught:
                async with consumer:
                    pytest.fail("a consumer that may not XCLAIM must not start")
            assert "XCLAIM" in str(caught.value)
            # It read nothing: none of the five was delivered to anyone.
            assert (await client.xpending(STREAM, GROUP))["pending"] == 0
            return
        with anyio.fail_after(10):
            async with consumer:
                assert await consumer.done() == "failed"
        # Redis 6.2 reports a command refused inside a script without an error
        # code: FAILED, with the server's error.
        assert isinstance(consumer.error, redis.exceptions.ResponseError)
        # Nothing was handled or acknowledged: all five are still pending.
        assert (await client.xpending(STREAM, GROUP))["pending"] == 5
    finally:
        await client.aclose()


TOPIC_CALLS: dict[str, Callable[[Topic], Awaitable[Any]]] = {
    "publish": lambda t: t.publish("job", {"n": 1}),
    "publish_many": lambda t: t.publish_many([("job", {"n": 1})]),
    "publish keyed": lambda t: t.publish("job", {"n": 1}, idempotency_key="k"),
    "publish_many keyed": lambda t: t.publish_many([("job", {"n": 1}, None, "k")]),
    "stop_message": lambda t: t.stop_message("1-0"),
    "resume_message": lambda t: t.resume_message("1-0"),
    "info": lambda t: t.info(),
    "dead_letters": lambda t: t.dead_letters(),
    "replay_dead_letters": lambda t: t.replay_dead_letters(),
    "cleanup": lambda t: t.cleanup(CleanupPolicy(min_retention=0)),
    "terminate": lambda t: t.terminate(),
}


@pytest.mark.parametrize("call", list(TOPIC_CALLS))
async def test_a_topic_outside_the_rule_is_refused_at_once(
    acl_server: RedisServer, call: str
) -> None:
    """The README's user, pointed at another topic: every Topic method raises
    AccessDeniedError naming the stream, and changes nothing there."""
    admin = redis.asyncio.Redis.from_url(acl_server.url)
    client = _client(acl_server, USER, PASSWORD)
    try:
        await admin.xadd("invoices", {"type": "job", "data": "{}", "metadata": "{}"})
        before = await admin.xrange("invoices")
        with anyio.fail_after(10), pytest.raises(AccessDeniedError) as caught:
            await TOPIC_CALLS[call](Topic(client, "invoices"))
        assert "'invoices'" in str(caught.value)
        assert isinstance(caught.value.__cause__, redis.exceptions.NoPermissionError)
        assert await admin.xrange("invoices") == before
        assert await admin.keys("redcurrent:*") == []
    finally:
        await client.aclose()
        await admin.aclose()


@pytest.mark.redis_min("7.0")
async def test_a_refused_control_change_changes_nothing(acl_server: RedisServer) -> None:
    """A script's writes stay when a later command of it is refused. A user
    without the control channel must not leave a stop stored but unannounced,
    nor a user without DEL a "terminate" announced to consumers of a topic
    that stays: both are refused before anything is written."""
    admin = redis.asyncio.Redis.from_url(acl_server.url)
    worker = _client(acl_server, USER, PASSWORD)
    no_channel = _client(acl_server, "no-channel", "x")
    no_del = _client(acl_server, "no-del", "x")
    try:
        topic = Topic(worker, STREAM)
        consumer = StreamConsumer(worker, STREAM, GROUP, "c1", start=StartFrom.EARLIEST)
        seen = Recorder()
        consumer.handler("job")(seen)
        async with consumer:
            with anyio.fail_after(10):
                with pytest.raises(AccessDeniedError, match="channel"):
                    await Topic(no_channel, STREAM).stop_message("1-0")
                with pytest.raises(AccessDeniedError):
                    await Topic(no_del, STREAM).terminate()
            assert await admin.smembers(topic.keys.stopped) == set()
            # The consumer heard no "terminate": it still runs and handles.
            await topic.publish("job", {"n": 1})
            await seen.wait_for(1, timeout=10)
            assert consumer.stop_reason is None
            assert await admin.exists(STREAM) == 1
    finally:
        for client in (worker, no_channel, no_del, admin):
            await client.aclose()


async def test_permissions_revoked_under_a_running_consumer_fail_it(
    acl_server: RedisServer,
) -> None:
    """Keys taken away while a consumer runs: it stops FAILED with
    AccessDeniedError within a read's block, instead of retrying for ever."""
    admin = redis.asyncio.Redis.from_url(acl_server.url)
    client = _client(acl_server, USER, PASSWORD)
    try:
        consumer = StreamConsumer(client, STREAM, GROUP, "c1", block=0.2)
        seen = Recorder()
        consumer.handler("job")(seen)
        async with consumer:
            await Topic(client, STREAM).publish("job", {"n": 1})
            await seen.wait_for(1, timeout=10)
            await admin.execute_command("ACL", "SETUSER", USER, "resetkeys", "~invoices")
            with anyio.fail_after(10):
                assert await consumer.done() == StopReason.FAILED
        assert isinstance(consumer.error, AccessDeniedError)
    finally:
        await client.aclose()
        await admin.aclose()


async def test_the_readme_rule_is_enough_for_scheduled_messages(acl_server: RedisServer) -> None:
    client = _client(acl_server, USER, PASSWORD)
    try:
        topic = Topic(client, STREAM)
        seen = Recorder()
        consumer = StreamConsumer(client, STREAM, GROUP, "c1", start=StartFrom.EARLIEST)
        consumer.handler("job")(seen)
        later = await topic.publish("job", {"n": 1}, delay=3600)
        await topic.publish_many([("job", {"n": 2})], delay=0)
        async with consumer:
            await topic.publish("job", {"n": 3}, delay=0.1)
            await seen.wait_for(2, timeout=10)
            assert (await topic.info()).scheduled == 1
            assert await topic.cancel_scheduled(later) is True
            await topic.terminate()
            assert await consumer.done() == "terminated"
        assert sorted(m.data["n"] for m in seen.messages) == [2, 3]
    finally:
        await client.aclose()


@pytest.mark.redis_min("7.0")
async def test_scheduling_and_moving_without_their_permissions_are_refused_at_once(
    acl_server: RedisServer,
) -> None:
    """A user without ZADD schedules nothing (refused before any write); a
    consumer whose user may not move scheduled messages fails at start-up."""
    admin = redis.asyncio.Redis.from_url(acl_server.url)
    rule: list[Any] = [
        word for word in README_RULE if acl_server.version >= (7, 2) or word != SETINFO
    ]
    for command in ("zadd", "zrangebyscore"):
        await admin.execute_command(
            "ACL", "SETUSER", f"no-{command}", *rule, f"-{command}", "resetpass", ">x"
        )
    no_zadd = _client(acl_server, "no-zadd", "x")
    no_move = _client(acl_server, "no-zrangebyscore", "x")
    try:
        with anyio.fail_after(10):
            with pytest.raises(AccessDeniedError):
                await Topic(no_zadd, STREAM).publish("job", {"n": 1}, delay=1)
            assert (await Topic(admin, STREAM).info()).scheduled == 0
            consumer = StreamConsumer(no_move, STREAM, GROUP, "c1", start_timeout=60)
            consumer.handler("job")(Recorder())
            with pytest.raises(AccessDeniedError, match="scheduled"):
                async with consumer:
                    pytest.fail("a consumer that may not move scheduled messages must not start")
    finally:
        for client in (no_zadd, no_move, admin):
            await client.aclose()


async def test_the_readme_rule_is_enough_for_idempotent_publish(acl_server: RedisServer) -> None:
    client = _client(acl_server, USER, PASSWORD)
    try:
        topic = Topic(client, STREAM)
        first = await topic.publish("job", {"n": 1}, idempotency_key="order-42")
        ids = await topic.publish_many(
            [("job", {"n": 2}, None, "order-42"), ("job", {}, None, "b")]
        )
        assert ids[0] == first
        assert (await topic.info()).length == 2
        await topic.terminate()
    finally:
        await client.aclose()
