"""Stop/resume/terminate and the ControlListener, against a real Redis."""

from __future__ import annotations

import logging
import math
import random
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import redis.asyncio as aredis
from redis import exceptions as rex
from redis.asyncio.cluster import RedisCluster

from redcurrent import ConfigurationError, Topic, TopicKeys
from redcurrent._control import ControlListener
from redcurrent._ids import normalize_id
from redcurrent.testing import RedisServer


class Recorder:
    """Collects callbacks and lets a test await a given one without sleeping."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        self._changed = anyio.Event()

    def _note(self, item: tuple[str, str]) -> None:
        self.log.append(item)
        self._changed.set()
        self._changed = anyio.Event()

    def on_stop(self, entry_id: str) -> None:
        self._note(("stop", entry_id))

    def on_resume(self, entry_id: str) -> None:
        self._note(("resume", entry_id))

    def on_terminate(self) -> None:
        self._note(("terminate", ""))

    async def wait_for(self, item: tuple[str, str], within: float = 5.0) -> None:
        with anyio.fail_after(within):
            while True:
                changed = self._changed
                if item in self.log:
                    return
                await changed.wait()


def make_listener(client: Any, topic: Topic, rec: Recorder, **kwargs: Any) -> ControlListener:
    return ControlListener(
        client,
        topic.keys,
        on_stop=rec.on_stop,
        on_resume=rec.on_resume,
        on_terminate=rec.on_terminate,
        **kwargs,
    )


@asynccontextmanager
async def running(listener: ControlListener) -> AsyncIterator[ControlListener]:
    async with anyio.create_task_group() as tg:
        await tg.start(listener.run)
        yield listener
        tg.cancel_scope.cancel()


# -- stop / resume ---------------------------------------------------------


async def test_stop_and_resume_are_stored_and_announced(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    msg_id = await topic.publish("email", {"to": "a"})
    rec = Recorder()
    async with running(make_listener(redis_client, topic, rec)) as listener:
        assert not listener.is_stopped(msg_id)

        await topic.stop_message(msg_id)
        assert await redis_client.sismember(topic.keys.stopped, msg_id)
        await rec.wait_for(("stop", msg_id))
        assert listener.is_stopped(msg_id)
        assert listener.stopped == frozenset({msg_id})

        await topic.resume_message(msg_id)
        assert not await redis_client.sismember(topic.keys.stopped, msg_id)
        await rec.wait_for(("resume", msg_id))
        assert not listener.is_stopped(msg_id)
    assert rec.log == [("stop", msg_id), ("resume", msg_id)]


async def test_stop_of_an_id_not_yet_in_the_stream(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    await topic.stop_message("99999999999999-7")
    assert await redis_client.smembers(topic.keys.stopped) == {b"99999999999999-7"}
    assert not await redis_client.exists("orders")


async def test_stop_twice_announces_a_change_once(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    rec = Recorder()
    async with running(make_listener(redis_client, topic, rec)):
        await topic.stop_message("1-1")
        await topic.stop_message("1-1")
        await topic.stop_message("2-2")
        await rec.wait_for(("stop", "2-2"))
    assert rec.log == [("stop", "1-1"), ("stop", "2-2")]


async def test_listener_started_after_a_stop_loads_it(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    await topic.stop_message("5-0")
    await topic.stop_message("6-1")
    rec = Recorder()
    async with running(make_listener(redis_client, topic, rec)) as listener:
        # started() comes after the initial load: no waiting needed.
        assert listener.is_stopped("5-0")
        assert listener.is_stopped("6-1")
        assert not listener.is_stopped("7-0")
    assert rec.log == []  # the initial load is not a change


async def test_missed_notification_converges_on_resync(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    rec = Recorder()
    async with running(make_listener(redis_client, topic, rec, resync_interval=0.2)) as listener:
        await redis_client.sadd(topic.keys.stopped, "3-0")  # no PUBLISH
        await rec.wait_for(("stop", "3-0"))
        assert listener.is_stopped("3-0")
        await redis_client.srem(topic.keys.stopped, "3-0")
        await rec.wait_for(("resume", "3-0"))
        assert not listener.is_stopped("3-0")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "abc",
        "1-",
        "-1",
        "1-2-3",
        "1.5-0",
        "0x1-0",
        "1 -0",
        f"{2**64}-0",
        "0-99999999999999999999",
    ],
)
async def test_invalid_id_raises_configuration_error(redis_client: aredis.Redis, bad: str) -> None:
    topic = Topic(redis_client, "orders")
    with pytest.raises(ConfigurationError):
        await topic.stop_message(bad)
    with pytest.raises(ConfigurationError):
        await topic.resume_message(bad)
    assert not await redis_client.exists(topic.keys.stopped)


async def test_non_str_id_raises_configuration_error(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    with pytest.raises(ConfigurationError):
        await topic.stop_message(17)  # type: ignore[arg-type]


async def test_ids_are_stored_in_the_servers_canonical_form(redis_client: aredis.Redis) -> None:
    assert normalize_id("0017-00") == "17-0"
    assert normalize_id("17") == "17-0"  # as XRANGE and XGROUP CREATE read it
    assert normalize_id(f"{2**64 - 1}-{2**64 - 1}") == f"{2**64 - 1}-{2**64 - 1}"
    topic = Topic(redis_client, "orders")
    await topic.stop_message("0017-00")
    assert await redis_client.smembers(topic.keys.stopped) == {b"17-0"}
    await topic.resume_message("17-0000")
    assert not await redis_client.exists(topic.keys.stopped)


def test_resync_interval_must_be_positive() -> None:
    rec = Recorder()
    for bad in (0, -1.0, math.nan):
        with pytest.raises(ConfigurationError):
            ControlListener(
                aredis.Redis(),
                TopicKeys("x"),
                on_stop=rec.on_stop,
                on_resume=rec.on_resume,
                on_terminate=rec.on_terminate,
                resync_interval=bad,
            )


# -- terminate --------------------------------------------------------------


async def _owned_keys(client: aredis.Redis, topic: Topic) -> set[bytes]:
    keys = set(await client.keys(f"*{topic.keys.tag}*"))
    if await client.exists(topic.name):
        keys.add(topic.name.encode())
    return keys


async def test_terminate_deletes_every_owned_key_and_notifies(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    other = Topic(redis_client, "invoices")
    msg_id = await topic.publish("email", {"to": "a"})
    await other.publish("email", {"to": "b"})
    await redis_client.xgroup_create(topic.name, "workers", "0")
    await topic.stop_message(msg_id)
    await redis_client.xadd(topic.keys.dead_letters, {"type": "x"})
    await redis_client.set(topic.keys.cleanup_lock, "me", px=60_000)
    await topic.publish("email", {"to": "d"}, idempotency_key="k")  # the idempotency epoch
    # What a key remembers is not owned: it expires by itself (the epoch goes).
    remembered = {topic.keys.idempotency("k").encode()}
    await topic.publish("email", {"to": "c"}, delay=3600)  # scheduled and its payload
    await redis_client.hset(topic.keys.workers, "w", "1 0")  # worker names
    # The keys of a partitioned topic's layout, membership and ownership.
    await redis_client.hset(topic.keys.meta, "state", "terminating")
    await redis_client.zadd(topic.keys.members, {"1:g:c": 0})
    await redis_client.hset(topic.keys.owners, "h:g", "c#1")
    owned = {k.encode() for k in topic.keys.owned()}
    assert await _owned_keys(redis_client, topic) == owned | remembered

    rec = Recorder()
    listener = make_listener(redis_client, topic, rec)
    async with anyio.create_task_group() as tg:
        await tg.start(listener.run)
        assert not listener.terminated
        await topic.terminate()
        assert await listener.wait_terminated(5.0)
        # run() ends by itself after a termination: the task group exits.

    assert listener.terminated
    assert rec.log == [("terminate", "")]
    assert await _owned_keys(redis_client, topic) == remembered
    assert await redis_client.xlen("invoices") == 1  # another topic is untouched

    # The topic is usable again.
    await topic.publish("email", {"to": "again"})
    assert await redis_client.xlen(topic.name) == 1
    await redis_client.xgroup_create(topic.name, "workers", "0")
    assert await redis_client.xreadgroup("workers", "c", {topic.name: ">"})


async def test_wait_terminated_times_out_without_a_termination(
    redis_client: aredis.Redis,
) -> None:
    topic = Topic(redis_client, "orders")
    async with running(make_listener(redis_client, topic, Recorder())) as listener:
        await redis_client.delete(topic.name)  # a deletion is not a termination
        assert await listener.wait_terminated(0.05) is False
        assert not listener.terminated


async def test_terminate_of_a_missing_topic_still_notifies(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "never-created")
    rec = Recorder()
    async with running(make_listener(redis_client, topic, rec)) as listener:
        await topic.terminate()
        await rec.wait_for(("terminate", ""))
        assert listener.terminated


@pytest.mark.redis_min("7.0")
async def test_blocked_reader_fails_and_listener_tells_it_was_terminate(
    redis_client: aredis.Redis, redis_url: str
) -> None:
    """The consumer-side fallback: the blocked XREADGROUP fails (NOGROUP or UNBLOCKED),
    and the listener, asked right after, says it was a termination."""
    topic = Topic(redis_client, "orders")
    await redis_client.xgroup_create(topic.name, "workers", "$", mkstream=True)
    listener = make_listener(redis_client, topic, Recorder())
    reader = aredis.Redis.from_url(redis_url)
    errors: list[BaseException] = []

    async def blocked_read(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        await reader.client_setname("blocked-reader")
        task_status.started()
        try:
            await reader.xreadgroup("workers", "c", {topic.name: ">"}, block=10_000)
        except rex.ResponseError as exc:
            errors.append(exc)

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(listener.run)
            await tg.start(blocked_read)
            await _eventually(lambda: _is_blocked(redis_client, "blocked-reader"))
            await topic.terminate()
        assert errors
        assert str(errors[0]).startswith(("NOGROUP", "UNBLOCKED"))
        assert await listener.wait_terminated(1.0)
    finally:
        await reader.aclose()


async def _eventually(check: Any, within: float = 5.0) -> None:
    """Poll server-side state that no event announces (a client blocked, a
    subscriber dropped)."""
    with anyio.fail_after(within):
        while not await check():  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def _is_blocked(client: aredis.Redis, name: str) -> bool:
    listing = (await client.execute_command("CLIENT", "LIST")).decode()
    return any(f"name={name} " in line and "flags=b" in line for line in listing.splitlines())


# -- resilience and cost ------------------------------------------------------


@pytest.mark.private_server
@pytest.mark.slow
async def test_listener_survives_a_server_restart(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = aredis.Redis.from_url(private_redis.url)
    topic = Topic(client, "orders")
    rec = Recorder()
    # A long resync interval: what arrives must come from the notification or
    # from the resync that follows a reconnect, not from the periodic one.
    listener = make_listener(client, topic, rec, resync_interval=60.0)
    try:
        with caplog.at_level(logging.WARNING, logger="redcurrent.control"):
            async with running(listener):
                await topic.stop_message("1-0")
                await rec.wait_for(("stop", "1-0"))

                await anyio.to_thread.run_sync(private_redis.kill)
                await anyio.to_thread.run_sync(private_redis.restart)  # AOF keeps the set

                await _until_ok(lambda: topic.stop_message("2-0"))
                await rec.wait_for(("stop", "2-0"), within=30)
                await topic.resume_message("1-0")
                await rec.wait_for(("resume", "1-0"), within=30)
                assert listener.stopped == frozenset({"2-0"})
        outage_logs = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(outage_logs) <= 1  # once per outage, not once per attempt
    finally:
        await client.aclose()


async def _until_ok(action: Any, within: float = 10.0) -> None:
    """Retry a command while the restarted server is still coming up."""
    with anyio.fail_after(within):
        while True:
            try:
                await action()
                return
            except (rex.ConnectionError, rex.BusyLoadingError):
                await anyio.sleep(0.05)


@pytest.mark.private_server
@pytest.mark.slow
async def test_idle_listener_costs_about_one_command_per_resync(
    private_redis: RedisServer,
) -> None:
    client = aredis.Redis.from_url(private_redis.url)
    probe = aredis.Redis.from_url(private_redis.url)
    topic = Topic(client, "orders")
    interval = 0.25
    window = 2.0
    try:
        async with running(make_listener(client, topic, Recorder(), resync_interval=interval)):
            await probe.ping()
            before = await _commands(probe)
            started = time.monotonic()
            await anyio.sleep(window)  # measuring idleness: nothing to await
            after = await _commands(probe)
            elapsed = time.monotonic() - started
        spent = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        spent["info"] -= 1  # the second INFO is ours
        spent = {k: v for k, v in spent.items() if v}
        allowed = math.ceil(elapsed / interval) + 1
        assert set(spent) <= {"smembers"}, spent
        assert spent.get("smembers", 0) <= allowed, (spent, elapsed)
    finally:
        await client.aclose()
        await probe.aclose()


async def _commands(client: aredis.Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def test_cancellation_closes_the_subscription(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    async with running(make_listener(redis_client, topic, Recorder())):
        assert await redis_client.pubsub_numsub(topic.keys.control_channel) == [
            (topic.keys.control_channel.encode(), 1)
        ]
    channel = topic.keys.control_channel
    await _eventually(
        lambda: _numsub_is(redis_client, channel, 0)  # the server drops it asynchronously
    )


async def _numsub_is(client: aredis.Redis, channel: str, count: int) -> bool:
    return bool(await client.pubsub_numsub(channel) == [(channel.encode(), count)])


async def test_polling_fallback_without_pubsub(redis_url: str, redis_client: aredis.Redis) -> None:
    """A client without pub/sub (an old redis-py's RedisCluster) is polled instead."""
    client = aredis.Redis.from_url(redis_url)
    client.pubsub = None  # type: ignore[assignment,method-assign]
    topic = Topic(redis_client, "orders")
    await topic.stop_message("1-0")
    rec = Recorder()
    try:
        listener = make_listener(client, topic, rec, resync_interval=0.1)
        async with running(listener):
            assert listener.is_stopped("1-0")
            await topic.stop_message("2-0")
            await rec.wait_for(("stop", "2-0"))
            await topic.resume_message("1-0")
            await rec.wait_for(("resume", "1-0"))
            assert await redis_client.pubsub_numsub(topic.keys.control_channel) == [
                (topic.keys.control_channel.encode(), 0)
            ]
    finally:
        await client.aclose()


async def test_unknown_control_messages_are_ignored(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    rec = Recorder()
    async with running(make_listener(redis_client, topic, rec)) as listener:
        for junk in (b"", b"stop", b"resume", b"hello 1-0", b"\xff\xfe"):
            await redis_client.publish(topic.keys.control_channel, junk)
        await topic.stop_message("4-0")
        await rec.wait_for(("stop", "4-0"))
        assert rec.log == [("stop", "4-0")]
        assert not listener.terminated


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    while True:
        port = random.randint(20000, 50000)
        with socket.socket() as data, socket.socket() as bus:
            try:
                data.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port


@pytest.mark.private_server
@pytest.mark.slow
@pytest.mark.skipif(
    not hasattr(RedisCluster, "pubsub"),
    reason="redis-py < 8 has no asyncio RedisCluster.pubsub: the listener polls (tested apart)",
)
async def test_stop_listener_info_and_terminate_on_a_cluster(redis_server_binary: str) -> None:
    """One node owning every slot: enough for the server to enforce same-slot rules."""
    args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
    with RedisServer(redis_server_binary, port=_cluster_port(), extra_args=args) as server:
        admin = aredis.Redis.from_url(server.url)
        await admin.execute_command("CLUSTER", "ADDSLOTS", *range(16384))
        await _eventually(
            lambda: _cluster_ok(admin)  # slot assignment settles asynchronously
        )
        client = RedisCluster.from_url(server.url)
        topic = Topic(client, "orders")
        rec = Recorder()
        try:
            listener = make_listener(client, topic, rec)
            async with anyio.create_task_group() as tg:
                await tg.start(listener.run)
                msg_id = await topic.publish("email", {})
                await client.xgroup_create(topic.name, "g", "0")
                await topic.stop_message(msg_id)
                await rec.wait_for(("stop", msg_id))
                info = await topic.info()
                assert (info.length, info.stopped, [g.name for g in info.groups]) == (
                    1,
                    [msg_id],
                    ["g"],
                )
                await topic.terminate()
                assert await listener.wait_terminated(5.0)
            assert await client.keys("*") == []
        finally:
            await client.aclose()
            await admin.aclose()


async def _cluster_ok(client: aredis.Redis) -> bool:
    return b"cluster_state:ok" in await client.execute_command("CLUSTER", "INFO")
