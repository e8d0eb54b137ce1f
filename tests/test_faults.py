"""Fault tests for issue 13: what a consumer does when Redis misbehaves.

Start-up without Redis, wrong credentials and missing ACL permissions, a
group that vanishes (a restart without persistence, XGROUP DESTROY), a
handler raising CancelledError on its own, pending entries whose stream
entries were deleted (Redis 6.2's XAUTOCLAIM returns nil for them), errors
raised inside Lua scripts (6.2 wraps them: ``Error running script ...:
@user_script:5: NOGROUP ...``) and a replica promoted under a running
consumer. Every test runs on every server flavour (6.2, 7.0, 8.2, Valkey),
always on private servers when it needs a special configuration, and holds
many entries at once, the way production runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
import redis.asyncio
from redis import exceptions as rex
from redis.backoff import NoBackoff
from redis.retry import Retry

from helpers import (
    Recorder,
    closed_port,
    nothing_pending,
    pending,
    pending_count,
    wait_until,
    wait_while_running,
)
from redcurrent import Message, StartFrom, StopReason, StreamConsumer, Topic
from redcurrent._faults import Fault, classify, is_busygroup, is_wrongtype
from redcurrent._keys import TopicKeys
from redcurrent._scripts import REFRESH_LEASE, SET_DELIVERY_COUNTS
from redcurrent.errors import ConfigurationError, RedcurrentError
from redcurrent.testing import RedisServer

pytestmark = pytest.mark.timeout(60)  # every wait inside is bounded far below this

STREAM = "orders"
GROUP = "workers"
PASSWORD = "s3cret-pw"
USER_PASSWORD = "worker-pw"


def make_consumer(
    client: redis.asyncio.Redis, name: str = "worker-1", **kwargs: Any
) -> StreamConsumer:
    """A consumer with durations small enough for tests and several handlers at once."""
    options: dict[str, Any] = {
        "start": StartFrom.EARLIEST,
        "claim_idle": 0.5,
        "block": 0.2,
        "shutdown_timeout": 1.0,
        "concurrency": 4,
    }
    options.update(kwargs)
    return StreamConsumer(client, STREAM, GROUP, name, **options)


async def publish_many(topic: Topic, items: list[tuple[str, Any]], chunk: int = 500) -> list[str]:
    ids: list[str] = []
    for start in range(0, len(items), chunk):
        ids += await topic.publish_many(items[start : start + chunk])
    return ids


async def publish_when_back(topic: Topic, items: list[tuple[str, Any]]) -> list[str]:
    """Publish, retrying while a restarted server is still coming back."""
    ids: list[str] = []

    async def attempt() -> bool:
        nonlocal ids
        try:
            ids = await topic.publish_many(items)
        except (rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError):
            return False
        return True

    await wait_until(attempt, timeout=10, interval=0.05)
    return ids


def no_retry_client(url: str, **kwargs: Any) -> redis.asyncio.Redis:
    """A client whose failures reach the caller at once (no redis-py retries)."""
    return redis.asyncio.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **kwargs)


# ==================================================================== start-up


@pytest.mark.timeout(20)
async def test_unreachable_redis_raises_start_timeout_error() -> None:
    from redcurrent.errors import StartTimeoutError

    async with redis.asyncio.Redis(host="127.0.0.1", port=closed_port()) as client:
        consumer = make_consumer(client, start_timeout=1.0)
        consumer.handler("job")(Recorder())
        with anyio.fail_after(10), pytest.raises(StartTimeoutError) as raised:  # guard: not forever
            async with consumer:
                pytest.fail("the consumer started without a Redis server")
    assert isinstance(raised.value, RedcurrentError)
    assert isinstance(raised.value, TimeoutError)


@pytest.mark.timeout(20)
async def test_start_up_without_redis_stays_cancellable() -> None:
    """The default start_timeout is long: a host shutting down meanwhile (uvicorn
    on SIGTERM) cancels the start-up, and that must return promptly."""
    async with redis.asyncio.Redis(host="127.0.0.1", port=closed_port()) as client:
        consumer = make_consumer(client)  # start_timeout: the default
        consumer.handler("job")(Recorder())
        entered = False
        with anyio.fail_after(10):  # guard: a start-up that ignores cancellation
            with anyio.move_on_after(0.5) as scope:
                async with consumer:
                    entered = True
        assert scope.cancelled_caught
        assert not entered


@pytest.mark.timeout(30)
async def test_server_coming_up_within_start_timeout_is_waited_for(
    redis_server_binary: str | None,
) -> None:
    """Start-up keeps retrying until start_timeout: a server that is not up yet
    when the consumer starts (a container starting beside the app) is fine."""
    if redis_server_binary is None:
        pytest.skip("no redis-server binary")
    server = RedisServer(redis_server_binary, port=closed_port())
    try:
        async with redis.asyncio.Redis.from_url(server.url) as client:
            seen = Recorder()
            consumer = make_consumer(client, start_timeout=20.0)
            consumer.handler("job")(seen)
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, server.start)
                async with consumer:
                    ids = await publish_many(
                        Topic(client, STREAM), [("job", {"n": i}) for i in range(50)]
                    )
                    await wait_while_running(consumer, lambda: len(seen.messages) >= 50)
                    await wait_until(nothing_pending(client, STREAM, GROUP))
            assert sorted(seen.ids) == sorted(ids)
            assert consumer.stop_reason is StopReason.STOPPED
    finally:
        server.stop()


async def test_start_timeout_does_not_limit_outages_after_start(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """start_timeout is about start-up only: a running consumer waits out an
    outage longer than it."""
    caplog.set_level(logging.WARNING, logger="redcurrent.consumer")
    client = redis.asyncio.Redis.from_url(private_redis.url)
    seen = Recorder()
    consumer = make_consumer(client, start_timeout=0.5, claim_idle=2.0)
    consumer.handler("job")(seen)
    try:
        async with consumer:
            first = await publish_many(
                Topic(client, STREAM), [("job", {"n": i}) for i in range(100)]
            )
            await wait_while_running(consumer, lambda: len(seen.messages) >= 100)
            outage_at = len(caplog.records)
            await anyio.to_thread.run_sync(private_redis.kill)
            # The consumer notices the outage (one warning), then the outage
            # lasts well beyond start_timeout.
            await wait_while_running(
                consumer,
                lambda: any(
                    r.name == "redcurrent.consumer" and r.levelno == logging.WARNING
                    for r in caplog.records[outage_at:]
                ),
            )
            await anyio.sleep(1.5)  # the outage itself: 3x start_timeout
            assert consumer.stop_reason is None, consumer.error
            await anyio.to_thread.run_sync(private_redis.restart)
            async with redis.asyncio.Redis.from_url(private_redis.url) as fresh:
                later = await publish_when_back(
                    Topic(fresh, STREAM), [("job", {"n": i}) for i in range(100, 200)]
                )
                await wait_while_running(consumer, lambda: set(later) <= set(seen.ids), timeout=15)
                await wait_until(nothing_pending(fresh, STREAM, GROUP), timeout=10)
        assert set(seen.ids) == {*first, *later}
        assert consumer.stop_reason is StopReason.STOPPED
    finally:
        await client.aclose()


# ==================================================================== credentials and ACLs

# ACL users of the secured server: (name, rules). Each lacks one thing a
# consumer needs; ``worker`` lacks nothing.
ACL_USERS: dict[str, tuple[str, ...]] = {
    "worker": ("+@all",),
    "no-xgroup": ("+@all", "-xgroup"),
    "no-xautoclaim": ("+@all", "-xautoclaim"),
    "no-subscribe": ("+@all", "-subscribe"),
}


@pytest.fixture(scope="module")
def secured_server(redis_server_binary: str | None) -> Iterator[RedisServer]:
    """A private server with ``requirepass`` and ACL users that each lack one permission."""
    if redis_server_binary is None:
        pytest.skip("no redis-server binary")
    # RedisServer's readiness check cannot authenticate: the password is set
    # once the server is up (CONFIG SET requirepass, as --requirepass would).
    with RedisServer(redis_server_binary) as server:
        import redis as sync_redis

        with sync_redis.Redis(host="127.0.0.1", port=server.port) as admin:
            admin.config_set("requirepass", PASSWORD)
            admin.auth(PASSWORD)
            for name, rules in ACL_USERS.items():
                admin.execute_command(
                    "ACL", "SETUSER", name, "reset", "on", f">{USER_PASSWORD}", "~*", "&*", *rules
                )
            # A user without access to any pub/sub channel (the control channel).
            admin.execute_command(
                "ACL", "SETUSER", "no-channels", "reset", "on", f">{USER_PASSWORD}", "~*",
                "resetchannels", "+@all",
            )  # fmt: skip
        yield server


@pytest.fixture
async def secured_admin(secured_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    async with redis.asyncio.Redis.from_url(secured_server.url, password=PASSWORD) as client:
        await client.delete(STREAM)
        yield client


CREDENTIALS = {
    "no password": {},
    "wrong password": {"password": "not-the-password"},
    "unknown user": {"username": "nobody", "password": "whatever"},
    "wrong password of a user": {"username": "worker", "password": "not-the-password"},
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("credentials", list(CREDENTIALS))
async def test_wrong_credentials_fail_start_up_at_once(
    secured_server: RedisServer, secured_admin: redis.asyncio.Redis, credentials: str
) -> None:
    from redcurrent.errors import AccessDeniedError

    async with redis.asyncio.Redis.from_url(
        secured_server.url, **CREDENTIALS[credentials]
    ) as client:
        consumer = make_consumer(client, start_timeout=60.0)
        consumer.handler("job")(Recorder())
        # The guard is far below start_timeout: retrying as if it were an outage
        # trips it.
        with anyio.fail_after(10), pytest.raises(AccessDeniedError) as raised:
            async with consumer:
                pytest.fail("the consumer started with wrong credentials")
    assert isinstance(raised.value, ConfigurationError)
    assert isinstance(raised.value.__cause__, rex.RedisError), raised.value.__cause__
    assert await secured_admin.exists(STREAM) == 0  # nothing was created


@pytest.mark.timeout(20)
@pytest.mark.parametrize("user", ["no-xgroup", "no-xautoclaim", "no-subscribe", "no-channels"])
async def test_missing_acl_permission_fails_start_up_at_once(
    secured_server: RedisServer, secured_admin: redis.asyncio.Redis, user: str
) -> None:
    """A user lacking a command (or the control channel) the consumer needs:
    start-up fails with AccessDeniedError instead of running half-crippled or
    retrying forever. Many entries wait to be claimed, so that a claim loop
    lacking XAUTOCLAIM would have work at once."""
    from redcurrent.errors import AccessDeniedError

    topic = Topic(secured_admin, STREAM)
    await secured_admin.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    await publish_many(topic, [("job", {"n": i}) for i in range(300)])
    await secured_admin.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=300)

    async with redis.asyncio.Redis.from_url(
        secured_server.url, username=user, password=USER_PASSWORD
    ) as client:
        seen = Recorder()
        consumer = make_consumer(client, start_timeout=60.0, claim_idle=0.1)
        consumer.handler("job")(seen)
        with anyio.fail_after(10), pytest.raises(AccessDeniedError) as raised:
            async with consumer:
                pytest.fail(f"the consumer started as {user!r}")
    assert isinstance(raised.value, ConfigurationError)
    assert isinstance(raised.value.__cause__, rex.RedisError), raised.value.__cause__
    assert classify(raised.value.__cause__) is Fault.DENIED
    assert seen.messages == []
    # Nothing was taken from the dead consumer either.
    assert {c for _, c, _ in await pending(secured_admin, STREAM, GROUP)} == {"dead"}


async def test_a_user_with_every_permission_a_consumer_needs_consumes(
    secured_server: RedisServer, secured_admin: redis.asyncio.Redis
) -> None:
    """The control case of the ACL tests: the same server, a complete user."""
    topic = Topic(secured_admin, STREAM)
    async with redis.asyncio.Redis.from_url(
        secured_server.url, username="worker", password=USER_PASSWORD
    ) as client:
        seen = Recorder()
        consumer = make_consumer(client)
        consumer.handler("job")(seen)
        async with consumer:
            ids = await publish_many(topic, [("job", {"n": i}) for i in range(300)])
            await wait_while_running(consumer, lambda: set(ids) <= set(seen.ids))
            await wait_until(nothing_pending(secured_admin, STREAM, GROUP))
    assert consumer.stop_reason is StopReason.STOPPED


# ==================================================================== a vanished group


@pytest.fixture
def volatile_redis(redis_server_binary: str | None) -> Iterator[RedisServer]:
    """A private server without persistence: a restart loses every key."""
    if redis_server_binary is None:
        pytest.skip("no redis-server binary")
    with RedisServer(redis_server_binary, extra_args=("--appendonly", "no")) as server:
        yield server


async def _vanish(how: str, server: RedisServer, client: redis.asyncio.Redis) -> None:
    if how == "restart without persistence":
        await anyio.to_thread.run_sync(server.kill)
        await anyio.to_thread.run_sync(server.restart)
    else:
        await client.xgroup_destroy(STREAM, GROUP)


VANISH = ["restart without persistence", "XGROUP DESTROY"]


@pytest.mark.parametrize("how", VANISH)
async def test_vanished_group_stops_the_consumer_loudly(
    volatile_redis: RedisServer, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """By default a vanished group stops the consumer with DELETED, at ERROR
    level: a web app must not keep accepting publishes nobody consumes
    without anyone noticing."""
    caplog.set_level(logging.INFO, logger="redcurrent.consumer")
    client = redis.asyncio.Redis.from_url(volatile_redis.url)
    seen = Recorder()
    consumer = make_consumer(client, claim_idle=1.0)
    consumer.handler("job")(seen)
    try:
        async with consumer:
            ids = await publish_many(Topic(client, STREAM), [("job", {"n": i}) for i in range(200)])
            await wait_while_running(consumer, lambda: set(ids) <= set(seen.ids))
            await wait_until(nothing_pending(client, STREAM, GROUP))
            await _vanish(how, volatile_redis, client)
            await wait_until(lambda: consumer.stop_reason is not None, timeout=15)
        assert consumer.stop_reason is StopReason.DELETED, consumer.error
        assert consumer.auto_stopped
    finally:
        await client.aclose()
    errors = [
        r for r in caplog.records if r.name == "redcurrent.consumer" and r.levelno >= logging.ERROR
    ]
    assert errors, "the stop was not logged at ERROR level"
    assert any(GROUP in r.getMessage() for r in errors), [r.getMessage() for r in errors]


@pytest.mark.parametrize("how", VANISH)
async def test_recreate_group_keeps_consuming_after_the_group_vanished(
    volatile_redis: RedisServer, how: str
) -> None:
    """With recreate_group=True the consumer re-creates its group and goes on:
    what is published after the group vanished gets handled, including what
    was published before the consumer could notice."""
    client = redis.asyncio.Redis.from_url(volatile_redis.url)
    seen = Recorder()
    consumer = make_consumer(client, claim_idle=1.0, recreate_group=True)
    consumer.handler("job")(seen)
    try:
        async with consumer:
            before = await publish_many(
                Topic(client, STREAM), [("job", {"phase": "before", "n": i}) for i in range(200)]
            )
            await wait_while_running(consumer, lambda: set(before) <= set(seen.ids))
            await wait_until(nothing_pending(client, STREAM, GROUP))
            async with redis.asyncio.Redis.from_url(volatile_redis.url) as fresh:
                topic = Topic(fresh, STREAM)
                if how == "XGROUP DESTROY":
                    # Destroyed and published to in one step: the consumer can
                    # only re-create the group after these entries exist.
                    async with fresh.pipeline(transaction=True) as pipe:
                        pipe.xgroup_destroy(STREAM, GROUP)
                        for i in range(100):
                            pipe.xadd(
                                STREAM,
                                {
                                    "type": "job",
                                    "data": f'{{"phase":"gap","n":{i}}}',
                                    "metadata": "{}",
                                },
                            )
                        replies = await pipe.execute()
                    gap = [r.decode() for r in replies[1:]]
                else:
                    await _vanish(how, volatile_redis, client)
                    gap = await publish_when_back(
                        topic, [("job", {"phase": "gap", "n": i}) for i in range(100)]
                    )
                await wait_while_running(consumer, lambda: set(gap) <= set(seen.ids), timeout=15)
                after = await publish_many(
                    topic, [("job", {"phase": "after", "n": i}) for i in range(200)]
                )
                await wait_while_running(consumer, lambda: set(after) <= set(seen.ids))
                await wait_until(nothing_pending(fresh, STREAM, GROUP))
                groups = await fresh.xinfo_groups(STREAM)
                assert [g["name"] for g in groups] == [GROUP.encode()]
                assert consumer.stop_reason is None
        assert consumer.stop_reason is StopReason.STOPPED
    finally:
        await client.aclose()


async def test_recreate_group_does_not_undo_a_terminate(redis_client: redis.asyncio.Redis) -> None:
    """Terminating a topic is final even for a consumer that re-creates its
    group: it stops with TERMINATED and does not bring the stream back."""
    topic = Topic(redis_client, STREAM)
    seen = Recorder()
    consumer = make_consumer(redis_client, recreate_group=True)
    consumer.handler("job")(seen)
    async with consumer:
        ids = await publish_many(topic, [("job", {"n": i}) for i in range(200)])
        await wait_while_running(consumer, lambda: set(ids) <= set(seen.ids))
        await topic.terminate()
        await wait_until(lambda: consumer.stop_reason is not None, timeout=10)
    assert consumer.stop_reason is StopReason.TERMINATED, consumer.error
    assert await redis_client.exists(STREAM) == 0


# ==================================================================== CancelledError from a handler


async def _cancelled_elsewhere() -> None:
    """Await a task that someone else cancelled: CancelledError, though nobody
    cancelled the caller."""
    victim = asyncio.get_running_loop().create_task(asyncio.sleep(10))
    victim.cancel()
    await victim


async def test_handler_raising_cancelled_error_is_a_handler_failure(
    redis_client: redis.asyncio.Redis,
) -> None:
    topic = Topic(redis_client, STREAM)
    ids = await publish_many(topic, [("job", {"n": i}) for i in range(300)])
    poison = set(ids[::30])  # 10: always cancelled -> dead letters after 3 deliveries
    flaky = set(ids[5::30])  # 10: cancelled on their first delivery only
    seen = Recorder()
    consumer = make_consumer(redis_client, max_deliveries=3, claim_idle=0.5)

    @consumer.handler("job")
    async def handle(msg: Message[Any]) -> None:
        await anyio.sleep(0.002)
        if msg.id in poison or (msg.id in flaky and msg.delivery_count == 1):
            await _cancelled_elsewhere()
        seen.record(msg)

    async with consumer:
        await wait_while_running(
            consumer,
            lambda: (
                consumer.stats.dead_lettered == len(poison) and set(ids) - poison <= set(seen.ids)
            ),
            timeout=15,
        )
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
        assert consumer.stop_reason is None
        stats = consumer.stats
    assert consumer.stop_reason is StopReason.STOPPED
    assert set(seen.ids) == set(ids) - poison
    assert {m.delivery_count for m in seen.messages if m.id in flaky} == {2}
    assert stats.failed == 3 * len(poison) + len(flaky)
    assert stats.dead_lettered == len(poison)
    letters = await topic.dead_letters(count=100)
    assert {d.original_id for d in letters} == poison
    assert {d.error_type for d in letters} == {"CancelledError"}
    assert {d.delivery_count for d in letters} == {3}


async def test_batch_handler_raising_cancelled_error_is_a_batch_failure(
    redis_client: redis.asyncio.Redis,
) -> None:
    topic = Topic(redis_client, STREAM)
    ids = await publish_many(topic, [("sms", {"n": i}) for i in range(200)])
    seen = Recorder()
    consumer = make_consumer(redis_client, max_deliveries=5, claim_idle=0.5)

    @consumer.batch_handler("sms", size=10, timeout=0.1)
    async def handle(msgs: list[Message[Any]]) -> None:
        if any(m.delivery_count == 1 for m in msgs):
            await _cancelled_elsewhere()
        for m in msgs:
            seen.record(m)

    async with consumer:
        await wait_while_running(consumer, lambda: set(ids) <= set(seen.ids), timeout=15)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
        stats = consumer.stats
    assert consumer.stop_reason is StopReason.STOPPED
    assert sorted(seen.ids) == sorted(ids)
    assert {m.delivery_count for m in seen.messages} == {2}
    assert stats.failed == len(ids)
    assert stats.dead_lettered == 0


# ==================================================================== deleted pending entries


async def _leave_pending(
    client: redis.asyncio.Redis, n: int, how: str
) -> tuple[list[str], set[str]]:
    """``n`` entries read by a consumer that then died; some of them deleted
    from the stream afterwards. Returns all ids and the deleted ones."""
    topic = Topic(client, STREAM)
    await client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ids = await publish_many(topic, [("job", {"n": i}) for i in range(n)])
    await client.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=n)
    if how == "XDEL":
        gone = set(ids[7::15])  # spread over every claim page
        assert await client.xdel(STREAM, *gone) == len(gone)
    else:  # an impatient publisher capping the stream
        gone = set(ids[:100])
        await client.xtrim(STREAM, maxlen=n - 100, approximate=False)
    assert await pending_count(client, STREAM, GROUP) == n
    return ids, gone


@pytest.mark.parametrize("how", ["XDEL", "XTRIM"])
async def test_claiming_deleted_pending_entries_fails_no_consumer(
    redis_client: redis.asyncio.Redis, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis 6.2's XAUTOCLAIM answers nil for a pending entry whose stream entry
    was deleted (7.0+ drops it and reports its id). Consumers started one
    after another all keep running, handle every live entry, and the deleted
    ones end up not pending, with a warning."""
    caplog.set_level(logging.WARNING, logger="redcurrent.consumer")
    ids, gone = await _leave_pending(redis_client, 300, how)
    seen = Recorder()
    consumers: list[StreamConsumer] = []

    async def handle(msg: Message[Any]) -> None:
        await anyio.sleep(0.02)  # slow enough that the work spreads over all three
        seen.record(msg)

    async with contextlib.AsyncExitStack() as stack:
        for n in range(3):
            consumer = make_consumer(redis_client, f"rescuer-{n}", claim_idle=0.3, prefetch=64)
            consumer.handler("job")(handle)
            await stack.enter_async_context(consumer)
            consumers.append(consumer)
            # The next one starts once this one has claimed (and met deleted entries).
            await wait_while_running(
                consumers,
                lambda c=consumer: c.stats.claimed > 0 or set(ids) - gone <= set(seen.ids),
            )
        await wait_while_running(consumers, lambda: set(ids) - gone <= set(seen.ids), timeout=15)
        await wait_while_running(consumers, nothing_pending(redis_client, STREAM, GROUP))
        assert all(c.stop_reason is None for c in consumers)
    assert [c.stop_reason for c in consumers] == [StopReason.STOPPED] * 3
    assert set(seen.ids) == set(ids) - gone
    assert await Topic(redis_client, STREAM).dead_letters() == []
    assert any(
        r.name == "redcurrent.consumer" and r.levelno == logging.WARNING for r in caplog.records
    )


async def test_own_deleted_pending_entries_are_acknowledged_on_restart(
    redis_client: redis.asyncio.Redis,
) -> None:
    """The consumer that held them restarts under its name: it recovers its own
    pending entries (more than one read page), handles the live ones and
    acknowledges the deleted ones."""
    ids, gone = await _leave_pending(redis_client, 1200, "XDEL")
    seen = Recorder()
    consumer = make_consumer(redis_client, "dead", claim_idle=30.0, prefetch=256)
    consumer.handler("job")(seen)
    async with consumer:
        await wait_while_running(consumer, lambda: set(ids) - gone <= set(seen.ids), timeout=15)
        await wait_while_running(consumer, nothing_pending(redis_client, STREAM, GROUP))
    assert consumer.stop_reason is StopReason.STOPPED
    assert set(seen.ids) == set(ids) - gone
    assert consumer.stats.claimed == 0


# ==================================================================== group gone mid-script


@pytest.mark.parametrize("vanish", ["XGROUP DESTROY", "DEL"])
async def test_group_gone_while_scripts_run_stops_deleted(
    redis_client: redis.asyncio.Redis, vanish: str
) -> None:
    """A consumer holding 700 entries with its handlers held back, after
    dead-lettering 100 messages: the reader waits for room, so only the lease
    script (renewing more than its 500-id XCLAIM chunk) talks to Redis. The
    group or the stream vanishes; the next lease script fails with NOGROUP
    (on 6.2 wrapped as ``Error running script ...``). That is a deletion, not
    a failure."""
    topic = Topic(redis_client, STREAM)
    items = [("job", {"fail": True, "n": i}) for i in range(100)]
    items += [("job", {"fail": False, "n": i}) for i in range(1400)]
    await publish_many(topic, items)
    gate = anyio.Event()
    consumer = make_consumer(
        redis_client, "busy", concurrency=8, prefetch=800, claim_idle=0.6, max_deliveries=1
    )

    @consumer.handler("job")
    async def handle(msg: Message[Any]) -> None:
        if msg.data["fail"]:
            raise ValueError("poison")
        await gate.wait()

    async def holding_still() -> bool:
        stats = consumer.stats
        if stats.dead_lettered < 100 or stats.held != stats.received - 100:
            return False
        if stats.held <= 500:
            return False
        # No blocked XREADGROUP: the first command to meet the vanished group
        # is a script.
        clients = await redis_client.client_list()
        return not any("b" in str(c.get("flags", "")) for c in clients)

    try:
        async with consumer:
            await wait_while_running(consumer, holding_still, timeout=15)
            if vanish == "DEL":
                await redis_client.delete(STREAM)
            else:
                await redis_client.xgroup_destroy(STREAM, GROUP)
            await wait_until(lambda: consumer.stop_reason is not None, timeout=10)
            assert consumer.stop_reason is StopReason.DELETED, repr(consumer.error)
            assert consumer.auto_stopped
    finally:
        gate.set()
    assert consumer.stop_reason is StopReason.DELETED
    assert len(await topic.dead_letters(count=200)) == 100


# ==================================================================== the classifier on real errors


async def _error(coro: Any) -> BaseException:
    """The exception a real server answered with (fails if it answered)."""
    try:
        reply = await coro
    except Exception as exc:
        return exc
    raise AssertionError(f"expected an error reply, got {reply!r}")


async def test_classify_missing_group_and_wrong_type(redis_client: redis.asyncio.Redis) -> None:
    """Direct commands and the same commands inside scripts (on 6.2 wrapped as
    ``Error running script (...): @user_script:N: NOGROUP ...``)."""
    topic = Topic(redis_client, STREAM)
    ids = await topic.publish_many([("job", {"n": i}) for i in range(3)])
    lease = redis_client.register_script(REFRESH_LEASE)
    recount = redis_client.register_script(SET_DELIVERY_COUNTS)

    gone = {
        "XREADGROUP": await _error(redis_client.xreadgroup("nogroup", "c", {STREAM: ">"}, count=1)),
        "XAUTOCLAIM": await _error(
            redis_client.execute_command("XAUTOCLAIM", STREAM, "nogroup", "c", 0, "0-0")
        ),
        "XPENDING on a missing key": await _error(redis_client.xpending("nokey", "nogroup")),
        "lease script": await _error(lease(keys=[STREAM], args=["nogroup", "c", 0, *ids])),
        "lease script, missing key": await _error(
            lease(keys=["nokey"], args=["nogroup", "c", 0, *ids])
        ),
        "delivery count script": await _error(
            recount(keys=[STREAM], args=["nogroup", "c", ids[0], 1, ids[1], 1, ids[2], 1])
        ),
        "XCLAIM in a script": await _error(
            redis_client.eval(
                "return redis.call('XCLAIM', KEYS[1], 'nogroup', 'c', 0, ARGV[1])",
                1,
                STREAM,
                ids[0],
            )
        ),
        "XAUTOCLAIM in a script": await _error(
            redis_client.eval(
                "return redis.call('XAUTOCLAIM', KEYS[1], 'nogroup', 'c', 0, '0-0')", 1, STREAM
            )
        ),
    }
    assert {what: classify(exc) for what, exc in gone.items()} == dict.fromkeys(gone, Fault.GONE)

    await redis_client.set("text", "not a stream")
    wrong = {
        "XADD": await _error(redis_client.xadd("text", {"a": "b"})),
        "XGROUP CREATE": await _error(redis_client.xgroup_create("text", GROUP, id="0")),
        "XADD in a script": await _error(
            redis_client.eval("return redis.call('XADD', KEYS[1], '*', 'a', 'b')", 1, "text")
        ),
        "lease script": await _error(lease(keys=["text"], args=[GROUP, "c", 0, *ids])),
    }
    assert {what: classify(exc) for what, exc in wrong.items()} == dict.fromkeys(wrong, Fault.FATAL)
    assert {what: is_wrongtype(exc) for what, exc in wrong.items()} == dict.fromkeys(wrong, True)
    assert not any(is_wrongtype(exc) for exc in gone.values())

    await redis_client.xgroup_create(STREAM, GROUP, id="0")
    busy = {
        "XGROUP CREATE": await _error(redis_client.xgroup_create(STREAM, GROUP, id="0")),
        "XGROUP CREATE in a script": await _error(
            redis_client.eval(
                "return redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0')", 1, STREAM, GROUP
            )
        ),
    }
    assert {what: is_busygroup(exc) for what, exc in busy.items()} == dict.fromkeys(busy, True)
    assert not any(is_busygroup(exc) for exc in (*gone.values(), *wrong.values()))


async def _blocked_read_error(
    url: str, action: Any, group: str = GROUP, block_ms: int = 5000
) -> BaseException:
    """Block an XREADGROUP on one connection, run ``action`` on another once it
    is blocked, and return the error the blocked read ended with."""
    async with no_retry_client(url) as reader, no_retry_client(url) as admin:
        reader_id = await reader.client_id()
        outcome: list[BaseException] = []

        async def read() -> None:
            outcome.append(
                await _error(reader.xreadgroup(group, "c", {STREAM: ">"}, count=1, block=block_ms))
            )

        async def blocked() -> bool:
            return any(
                int(c["id"]) == reader_id and "b" in str(c.get("flags", ""))
                for c in await admin.client_list()
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await wait_until(blocked, timeout=5)
            await action(admin, reader_id)
        return outcome[0]


async def test_classify_blocked_read_endings(
    redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    await redis_client.xgroup_create(STREAM, GROUP, id="$", mkstream=True)

    async def destroy(admin: redis.asyncio.Redis, _: int) -> None:
        await admin.xgroup_destroy(STREAM, GROUP)

    destroyed = await _blocked_read_error(redis_url, destroy)
    assert classify(destroyed) is Fault.GONE, destroyed

    await redis_client.xgroup_create(STREAM, GROUP, id="$")

    async def unblock(admin: redis.asyncio.Redis, reader_id: int) -> None:
        await admin.execute_command("CLIENT", "UNBLOCK", reader_id, "ERROR")

    # An operator unblocking a client does not delete anything: retry.
    unblocked = await _blocked_read_error(redis_url, unblock)
    assert classify(unblocked) is Fault.TRANSIENT, unblocked


@pytest.mark.redis_min("7.0")
async def test_classify_blocked_read_on_a_deleted_stream(
    redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    """Redis 7.0+ wakes a blocked read when its stream is deleted (6.2 lets it
    sit out its BLOCK)."""
    await redis_client.xgroup_create(STREAM, GROUP, id="$", mkstream=True)

    async def delete(admin: redis.asyncio.Redis, _: int) -> None:
        await admin.delete(STREAM)

    deleted = await _blocked_read_error(redis_url, delete)
    assert classify(deleted) is Fault.GONE, deleted


@pytest.fixture
def replica_pair(redis_server_binary: str | None) -> Iterator[tuple[RedisServer, RedisServer]]:
    if redis_server_binary is None:
        pytest.skip("no redis-server binary")
    # Redis 7 waits 5 s before a diskless full sync by default: no waiting here.
    # No AOF: a server that just loaded a full sync rewrites its AOF and refuses
    # SIGTERM meanwhile ("Writing initial AOF, can't exit"), so stopping it
    # would take RedisServer's 10 s stop timeout.
    fast_sync = ("--repl-diskless-sync-delay", "0", "--appendonly", "no")
    with (
        RedisServer(redis_server_binary, extra_args=fast_sync) as a,
        RedisServer(redis_server_binary, extra_args=fast_sync) as b,
    ):
        yield a, b


async def _replicate(replica: redis.asyncio.Redis, master: RedisServer) -> None:
    """Make ``replica`` a replica of ``master`` and wait until it is in sync."""
    await replica.execute_command("REPLICAOF", "127.0.0.1", master.port)

    async def synced() -> bool:
        try:
            info = await replica.info("replication")
        except rex.BusyLoadingError:
            return False
        return info.get("role") == "slave" and info.get("master_link_status") == "up"

    await wait_until(synced, timeout=15, interval=0.05)


async def test_classify_replica_errors(replica_pair: tuple[RedisServer, RedisServer]) -> None:
    master, replica = replica_pair
    async with no_retry_client(master.url) as m, no_retry_client(replica.url) as r:
        ids = await Topic(m, STREAM).publish_many([("job", {"n": i}) for i in range(3)])
        await m.xgroup_create(STREAM, GROUP, id="0")
        await m.xreadgroup(GROUP, "c", {STREAM: ">"}, count=3)
        await r.xgroup_create(STREAM, GROUP, id="$", mkstream=True)

        async def become_replica(admin: redis.asyncio.Redis, _: int) -> None:
            await _replicate(admin, master)

        # A read blocked on a master that is turned into a replica.
        demoted = await _blocked_read_error(replica.url, become_replica)
        assert await pending_count(r, STREAM, GROUP) == 3  # the master's data arrived
        lease = r.register_script(REFRESH_LEASE)
        read_only = {
            "UNBLOCKED on becoming a replica": demoted,
            "XADD": await _error(r.xadd(STREAM, {"a": "b"})),
            "XREADGROUP": await _error(r.xreadgroup(GROUP, "c", {STREAM: ">"}, count=1)),
            "XACK": await _error(r.xack(STREAM, GROUP, *ids)),
            "lease script": await _error(lease(keys=[STREAM], args=[GROUP, "c", 0, *ids])),
            "XACK in a script": await _error(
                r.eval(
                    "return redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])", 1, STREAM, GROUP, ids[0]
                )
            ),
        }
        assert {w: classify(e) for w, e in read_only.items()} == dict.fromkeys(
            read_only, Fault.TRANSIENT
        ), {w: repr(e) for w, e in read_only.items()}

        # A replica whose master is down and that may not serve stale data.
        await r.config_set("replica-serve-stale-data", "no")
        await r.execute_command("REPLICAOF", "127.0.0.1", closed_port())
        master_down = await _error(r.xpending(STREAM, GROUP))
        await r.execute_command("REPLICAOF", "NO", "ONE")  # or it may not stop at once
        assert classify(master_down) is Fault.TRANSIENT, master_down


async def test_classify_access_errors(
    secured_server: RedisServer, secured_admin: redis.asyncio.Redis
) -> None:
    url = secured_server.url
    await secured_admin.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    denied: dict[str, BaseException] = {}
    for what, credentials in CREDENTIALS.items():
        async with no_retry_client(url, **credentials) as client:
            denied[what] = await _error(client.ping())
    async with no_retry_client(url, username="no-xautoclaim", password=USER_PASSWORD) as client:
        denied["NOPERM command"] = await _error(
            client.execute_command("XAUTOCLAIM", STREAM, GROUP, "c", 0, "0-0")
        )
    async with no_retry_client(url, username="no-subscribe", password=USER_PASSWORD) as client:
        pubsub = client.pubsub()
        try:
            denied["NOPERM subscribe"] = await _error(_subscribe_confirmed(pubsub))
        finally:
            await pubsub.aclose()
    async with no_retry_client(url, username="no-channels", password=USER_PASSWORD) as client:
        pubsub = client.pubsub()
        try:
            denied["NOPERM channel"] = await _error(_subscribe_confirmed(pubsub))
        finally:
            await pubsub.aclose()
    assert {w: classify(e) for w, e in denied.items()} == dict.fromkeys(denied, Fault.DENIED), {
        w: repr(e) for w, e in denied.items()
    }

    # Inside a script, Redis < 7.2 reports a missing permission without an
    # error code: it cannot be told from a bug, but it must never be retried
    # as an outage or taken for a deletion.
    async with no_retry_client(url, username="no-xautoclaim", password=USER_PASSWORD) as client:
        in_script = await _error(
            client.eval(
                "return redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], 'c', 0, '0-0')", 1, STREAM, GROUP
            )
        )
    assert classify(in_script) in (Fault.DENIED, Fault.FATAL), in_script

    async with no_retry_client(f"redis://127.0.0.1:{closed_port()}") as client:
        refused = await _error(client.ping())
    assert classify(refused) is Fault.TRANSIENT, refused


async def _subscribe_confirmed(pubsub: Any) -> None:
    await pubsub.subscribe(TopicKeys(STREAM).control_channel)
    with anyio.fail_after(5):
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None and message["type"] in (b"subscribe", "subscribe"):
                return


# ============================================================ failover under a running consumer


async def _script_runs(client: redis.asyncio.Redis) -> int:
    """Scripts the server ran by SHA: EVALSHA calls less those answered NOSCRIPT
    (a full sync empties a replica's script cache; redis-py then loads the
    script and calls again)."""
    calls = await client.info("commandstats")
    return int(calls.get("cmdstat_evalsha", {}).get("calls", 0)) - await _error_count(
        client, "NOSCRIPT"
    )


async def _error_count(client: redis.asyncio.Redis, code: str) -> int:
    stats = await client.info("errorstats")
    value = stats.get(f"errorstat_{code}", {})
    if isinstance(value, str):  # redis-py < 5.0.5 leaves "count=N" unparsed
        value = dict(part.split("=", 1) for part in value.split(","))
    return int(value.get("count", 0))


async def test_replica_promoted_under_a_running_consumer(
    replica_pair: tuple[RedisServer, RedisServer],
) -> None:
    """Two servers, A (the consumer's) and B, its replica. B is promoted and A
    turned into B's replica under the consumer, which holds a full prefetch:
    every write of the consumer (lease script, acks, reads) fails with
    READONLY for a while. It keeps running; once A is master again it goes
    on, and nothing published to whichever was master is lost."""
    a, b = replica_pair
    prefetch = 64
    gate = anyio.Event()
    seen = Recorder()
    consumer_client = redis.asyncio.Redis.from_url(a.url)
    consumer = StreamConsumer(
        consumer_client,
        STREAM,
        GROUP,
        "steady",
        start=StartFrom.EARLIEST,
        claim_idle=0.6,
        block=0.2,
        shutdown_timeout=1.0,
        concurrency=4,
        prefetch=prefetch,
    )

    @consumer.handler("job")
    async def handle(msg: Message[Any]) -> None:
        if msg.data["phase"] == "hold":
            await gate.wait()
        seen.record(msg)

    async with (
        redis.asyncio.Redis.from_url(a.url) as admin_a,
        redis.asyncio.Redis.from_url(b.url) as admin_b,
    ):
        await _replicate(admin_b, a)
        topic_a, topic_b = Topic(admin_a, STREAM), Topic(admin_b, STREAM)
        try:
            async with consumer:
                quick = await publish_many(
                    topic_a, [("job", {"phase": "quick", "n": i}) for i in range(100)]
                )
                await wait_while_running(consumer, lambda: set(quick) <= set(seen.ids))
                hold = await publish_many(
                    topic_a, [("job", {"phase": "hold", "n": i}) for i in range(200)]
                )
                await wait_while_running(consumer, lambda: consumer.stats.held == prefetch)
                assert int(await admin_a.execute_command("WAIT", 1, 5000)) == 1

                # Failover: B becomes master, A its replica.
                await admin_b.execute_command("REPLICAOF", "NO", "ONE")
                await _replicate(admin_a, b)
                scripts_before = await _script_runs(admin_a)
                # The lease script keeps running against read-only A (and failing).
                await wait_while_running(
                    consumer, lambda: _at_least(_script_runs(admin_a), scripts_before + 5)
                )
                during = await publish_many(
                    topic_b, [("job", {"phase": "during", "n": i}) for i in range(100)]
                )
                assert int(await admin_b.execute_command("WAIT", 1, 5000)) == 1
                # Handlers finish now: their acks and the next reads meet READONLY.
                readonly_before = await _error_count(admin_a, "READONLY")
                gate.set()
                await wait_while_running(
                    consumer,
                    lambda: _at_least(_error_count(admin_a, "READONLY"), readonly_before + 2),
                )
                assert consumer.stop_reason is None

                # A is master again (with B's data, which has everything).
                await admin_a.execute_command("REPLICAOF", "NO", "ONE")
                after = await publish_many(
                    topic_a, [("job", {"phase": "after", "n": i}) for i in range(100)]
                )
                everything = {*quick, *hold, *during, *after}
                await wait_while_running(consumer, lambda: everything <= set(seen.ids), timeout=20)
                await wait_while_running(consumer, nothing_pending(admin_a, STREAM, GROUP))
                assert consumer.stop_reason is None
        finally:
            gate.set()
            await consumer_client.aclose()
        assert consumer.stop_reason is StopReason.STOPPED
        assert await admin_a.xlen(STREAM) == len(everything)
        assert await Topic(admin_a, STREAM).dead_letters() == []


async def _at_least(value: Any, want: int) -> bool:
    return int(await value) >= want
