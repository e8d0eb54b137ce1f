"""The same library on a three-node Redis Cluster: every key of a topic in one slot."""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import json
import random
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
import redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException

from helpers import wait_until as until
from redcurrent import CleanupPolicy, Message, StartFrom, StopReason, StreamConsumer, Topic
from redcurrent._faults import Fault, classify
from redcurrent._partitions import partition_for
from redcurrent.testing import RedisServer, find_redis_server

FAST: dict[str, Any] = {"claim_idle": 0.5, "block": 0.3, "shutdown_timeout": 1.0}
PARTS: dict[str, Any] = {
    "start": StartFrom.EARLIEST,
    "claim_idle": 2.0,
    "block": 0.5,
    "member_ttl": 1.5,
    "shutdown_timeout": 1.0,
}


def _cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster bus port (+10000) is free too, below 55536."""
    found: list[int] = []
    for port in random.sample(range(20000, 45000), 400):
        if all(_free(p) for p in (port, port + 10000)):
            found.append(port)
            if len(found) == count:
                return found
    pytest.skip("no free ports for a local cluster")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture(scope="module", autouse=True)
def _collect_dropped_cluster_nodes() -> Iterator[None]:
    """redis-py's cluster client drops the ClusterNode of a node that left its
    view of the topology (a migrated slot, a torn-down connection) without
    closing it; collected later, in whatever test then runs, its
    ResourceWarning would fail that test. Collect them here, at the end of
    this module."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    binary = find_redis_server()
    cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    if binary is None or not shutil.which(cli):
        pytest.skip("needs redis-server and redis-cli to build a local cluster")
    args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
    ports = _cluster_ports(3)
    servers = [RedisServer(binary, port=port, extra_args=args) for port in ports]
    try:
        for server in servers:
            server.start()
        nodes = [f"127.0.0.1:{s.port}" for s in servers]
        subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 15
        for server in servers:
            client = redis.Redis(port=server.port)
            while client.cluster("INFO").get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    pytest.fail("local cluster did not become ready")
                time.sleep(0.05)
            client.close()
        yield servers[0].url
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
async def cluster(cluster_url: str) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(cluster_url)
    await client.initialize()
    await client.flushall()
    yield client
    await client.aclose()


@pytest.mark.parametrize("stream", ["orders", "app{tenant-7}:orders"])
async def test_consume_dead_letter_and_replay_on_a_cluster(
    cluster: RedisCluster, stream: str
) -> None:
    topic = Topic(cluster, stream)
    ids = await topic.publish_many([("job", {"n": n}) for n in range(20)] + [("junk", {})])
    seen: list[str] = []
    consumer = StreamConsumer(cluster, stream, "g", start=StartFrom.EARLIEST, **FAST)

    @consumer.handler("job")
    async def job(msg: Message[Any]) -> None:
        seen.append(msg.id)

    async with consumer:
        await until(lambda: len(seen) == 20 and consumer.stats.dead_lettered == 1)
    assert sorted(seen) == sorted(ids[:20])
    letters = await topic.dead_letters()
    assert [d.original_id for d in letters] == [ids[20]]
    assert len(await topic.replay_dead_letters()) == 1
    assert (await topic.info()).length == 22


async def test_stop_resume_cleanup_and_terminate_on_a_cluster(cluster: RedisCluster) -> None:
    topic = Topic(cluster, "orders")
    first = await topic.publish("job", {})
    await topic.stop_message(first)
    seen: list[str] = []
    consumer = StreamConsumer(cluster, "orders", "g", start=StartFrom.EARLIEST, **FAST)

    @consumer.handler("job")
    async def job(msg: Message[Any]) -> None:
        seen.append(msg.id)

    async with consumer:
        second = await topic.publish("job", {})
        await until(lambda: second in seen)
        assert first not in seen
        await topic.resume_message(first)
        await until(lambda: first in seen, timeout=8.0)
        await until(lambda: consumer.stats.handled == 2)

        async def acked() -> bool:  # the coalesced acks have reached the server
            return int((await cluster.xpending("orders", "g"))["pending"]) == 0

        await until(acked)
        removed = await topic.cleanup(CleanupPolicy(min_retention=0))
        assert removed == 2
        await topic.terminate()
        with anyio.fail_after(2):
            reason = await consumer.done()
    assert sorted(seen) == sorted([first, second])
    # The consumer hears "terminate" on the control channel where redis-py's
    # cluster client has pub/sub; without it, it can only see the stream vanish
    # (documented in ControlListener).
    expected = StopReason.TERMINATED if hasattr(cluster, "pubsub") else StopReason.DELETED
    assert reason is expected
    assert consumer.auto_stopped
    assert await cluster.exists(*topic.keys.owned()) == 0


@pytest.mark.parametrize("stream", ["orders", "app{tenant-7}:orders"])
async def test_idempotent_publish_on_a_cluster(cluster: RedisCluster, stream: str) -> None:
    """Memory and epoch keys share the stream's slot: the script runs (no CROSSSLOT)."""
    topic = Topic(cluster, stream)
    first = await topic.publish("job", {}, idempotency_key="order-42")
    ids = await topic.publish_many([("job", {}, None, "order-42"), ("job", {}, None, "b")])
    assert ids[0] == first
    assert await cluster.xlen(stream) == 2
    want = key_slot(stream.encode())
    for key in (topic.keys.idempotency("order-42"), topic.keys.idempotency_epoch):
        assert key_slot(key.encode()) == want
        assert await cluster.exists(key) == 1
    await topic.terminate()
    assert await cluster.exists(topic.keys.idempotency_epoch) == 0


BINARY: dict[bytes, bytes] = {
    b"type": b"\xffbin\xfe",
    b"data": b'{"a":"\xc3\x28"}',
    b"metadata": b"\x80\x81",
}


async def test_a_decode_responses_cluster_client_reads_binary_entries(
    cluster_url: str, cluster: RedisCluster
) -> None:
    """Topic on a cluster client with decode_responses=True: publish, info, dead
    letters of binary entries, replay, stop and resume; the consumer needs bytes."""
    decoded = RedisCluster.from_url(cluster_url, decode_responses=True)
    try:
        stream = "app{tenant-7}:orders"
        topic = Topic(decoded, stream)
        first = text(await cluster.xadd(stream, BINARY))  # type: ignore[arg-type]
        ids = await topic.publish_many([("job", {"n": n}) for n in range(200)])
        last = text(await cluster.xadd(stream, BINARY))  # type: ignore[arg-type]
        await topic.stop_message(ids[5])
        await topic.stop_message(ids[6])
        await topic.resume_message(ids[6])
        seen: list[str] = []
        consumer = StreamConsumer(
            cluster, stream, "g", start=StartFrom.EARLIEST, concurrency=4, **FAST
        )

        @consumer.handler("job")
        async def job(msg: Message[Any]) -> None:
            seen.append(msg.id)

        async with consumer:
            await until(lambda: len(seen) == 199 and consumer.stats.dead_lettered == 2)

            async def only_the_stopped_one_pending() -> bool:
                rows = await cluster.xpending_range(stream, "g", "-", "+", 10)
                return [text(r["message_id"]) for r in rows] == [ids[5]]

            await until(only_the_stopped_one_pending)
            info = await topic.info()
            assert (info.length, info.first_id, info.last_id) == (202, first, last)
            assert (info.stopped, info.dead_letters) == ([ids[5]], 2)
            await topic.resume_message(ids[5])
            await until(lambda: ids[5] in seen)
        assert sorted(seen) == sorted(ids)

        letters = await topic.dead_letters()
        assert {d.original_id: d.fields for d in letters} == {first: BINARY, last: BINARY}
        new_ids = await topic.replay_dead_letters()
        assert len(new_ids) == 2
        assert await topic.dead_letters() == []
        replayed = await cluster.xrange(stream, min=new_ids[0])
        assert [f for _, f in replayed] == [BINARY, BINARY]
    finally:
        await decoded.aclose()


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def test_a_consumer_follows_its_stream_when_the_slot_migrates(
    cluster: RedisCluster,
) -> None:
    """Resharding moves a stream with MIGRATE, which deletes it on the source
    node: Redis wakes a XREADGROUP blocked there with the very reply it sends
    for a deleted stream (``UNBLOCKED the stream key no longer exists``). The
    consumer must not take that for a deletion: it asks again and follows the
    slot to its new node."""
    stream = "resharded"
    slot = key_slot(stream.encode())
    topic = Topic(cluster, stream)
    seen: list[str] = []
    consumer = StreamConsumer(cluster, stream, "g", start=StartFrom.EARLIEST, **FAST)

    @consumer.handler("job")
    async def job(msg: Message[Any]) -> None:
        seen.append(msg.id)

    source_node = cluster.get_node_from_key(stream)
    source = redis.Redis(host=source_node.host, port=source_node.port, decode_responses=True)
    target_node = next(n for n in cluster.get_primaries() if n.name != source_node.name)
    target = redis.Redis(host=target_node.host, port=target_node.port, decode_responses=True)
    try:
        async with consumer:
            first = await topic.publish("job", {})
            await until(lambda: first in seen)

            def reader_blocked() -> bool:
                clients = source.client_list()
                return any(c["cmd"] == "xreadgroup" and "b" in c["flags"] for c in clients)

            await until(reader_blocked)
            source_id, target_id = source.cluster("MYID"), target.cluster("MYID")
            target.cluster("SETSLOT", slot, "IMPORTING", source_id)
            source.cluster("SETSLOT", slot, "MIGRATING", target_id)
            keys = source.cluster("GETKEYSINSLOT", slot, 100)
            source.migrate(target_node.host, target_node.port, keys, 0, 5000)
            for node in (target, source):
                node.cluster("SETSLOT", slot, "NODE", target_id)
            for other in cluster.get_primaries():
                if other.name not in (source_node.name, target_node.name):
                    with redis.Redis(host=other.host, port=other.port) as third:
                        third.cluster("SETSLOT", slot, "NODE", target_id)

            second = await topic.publish("job", {})
            await until(lambda: second in seen, timeout=15.0)
            assert consumer.stop_reason is None
        assert sorted(seen) == [first, second]
        assert target.xlen(stream) == 2  # it lives on the new node
    finally:
        source.close()
        target.close()


async def test_a_connection_torn_down_by_the_cluster_client_is_a_transient_fault(
    cluster: RedisCluster,
) -> None:
    """redis-py's cluster client disconnects all its pooled connections from a
    background task when it re-initialises (every 5th MOVED, CLUSTERDOWN): a
    command on one of them at that moment fails with ``AttributeError`` inside
    redis-py. During a reshard this stopped consumers; it is a fault to retry."""
    if not hasattr(cluster.nodes_manager, "aclose"):
        pytest.skip("this redis-py's cluster client has no nodes_manager.aclose()")
    seen: list[BaseException] = []

    async def reinitialise(stop: anyio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(redis.RedisError, RedisClusterException):  # old clients
                await cluster.nodes_manager.aclose()  # what every 5th MOVED does
            await anyio.sleep(random.random() * 0.003)

    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(reinitialise, stop)
        with anyio.move_on_after(20):
            while not seen:
                try:
                    await cluster.get("k")
                except AttributeError as exc:
                    seen.append(exc)
                except (redis.RedisError, RedisClusterException):
                    pass  # (not a RedisError before redis-py 5.1)
        stop.set()
    if not seen:
        pytest.skip("this redis-py did not tear a connection down under a command")
    assert classify(seen[0]) is Fault.TRANSIENT
    with pytest.raises(AttributeError) as ours:  # one raised in our code is a bug
        getattr(None, "writelines")  # noqa: B009
    assert classify(ours.value) is Fault.FATAL


@pytest.mark.parametrize("stream", ["orders", "app{tenant-7}:orders"])
async def test_scheduled_messages_on_a_cluster(cluster: RedisCluster, stream: str) -> None:
    """The scheduling, moving and cancelling scripts name keys of one slot."""
    topic = Topic(cluster, stream)
    later = await topic.publish("job", {"n": 0}, delay=3600)
    await topic.publish_many([("job", {"n": n}) for n in (1, 2)], delay=0.2)
    seen: list[int] = []
    consumer = StreamConsumer(cluster, stream, "g", start=StartFrom.EARLIEST, **FAST)

    @consumer.handler("job")
    async def job(msg: Message[Any]) -> None:
        seen.append(msg.data["n"])

    async with consumer:
        await until(lambda: seen == [1, 2], timeout=10)
        assert (await topic.info()).scheduled == 1
        assert await topic.cancel_scheduled(later) is True
        await topic.terminate()
        # Without cluster pub/sub (redis-py < 5.1) the terminate notice cannot
        # arrive: the consumer sees the stream vanish and reports DELETED.
        expected = StopReason.TERMINATED if hasattr(cluster, "pubsub") else StopReason.DELETED
        assert await consumer.done() == expected
    assert await cluster.exists(topic.keys.scheduled, topic.keys.scheduled_data) == 0


async def test_a_partitioned_topic_spreads_over_every_master_and_keeps_key_order(
    cluster: RedisCluster,
) -> None:
    topic = Topic(cluster, "spread", partitions=6)
    streams = await topic.partition_streams()
    masters = collections.Counter(cluster.get_node_from_key(s).name for s in streams)
    assert sorted(masters.values()) == [2, 2, 2]
    log: list[tuple[str, int, int]] = []
    consumers = [StreamConsumer(cluster, "spread", "g", f"c{i}", **PARTS) for i in range(2)]
    for consumer in consumers:

        @consumer.handler("job")
        async def job(msg: Message[Any]) -> None:
            assert msg.key is not None
            assert msg.partition is not None
            log.append((msg.key, msg.data["n"], msg.partition))
            await anyio.sleep(random.random() / 1000)

    async with consumers[0], consumers[1]:
        await topic.publish_many(
            [("job", {"n": n}) for n in range(1000)], keys=[f"k{n % 30}" for n in range(1000)]
        )
        await until(lambda: len({n for _, n, _ in log}) == 1000, timeout=30)
        info = await topic.info()
        assert {row.node for row in info.partitions} == set(masters)
        assert info.groups[0].consumers == 2
    firsts: dict[str, list[int]] = collections.defaultdict(list)
    seen: set[int] = set()
    for key, n, _ in log:
        if n not in seen:
            seen.add(n)
            firsts[key].append(n)
    assert all(numbers == sorted(numbers) for numbers in firsts.values())
    await topic.terminate()
    for node in cluster.get_primaries():
        assert not await cluster.keys("*spread*", target_nodes=node)


async def test_the_cli_reaches_a_cluster_and_shows_partitions(
    cluster: RedisCluster, cluster_url: str
) -> None:
    from click.testing import CliRunner

    from redcurrent._cli._app import cli

    topic = Topic(cluster, "cli-parts", partitions=3)
    await topic.publish_many([("job", {"n": n}) for n in range(9)])
    url = cluster_url.replace("redis://", "redis+cluster://", 1)
    call = functools.partial(CliRunner().invoke, cli, ["info", "cli-parts", "--json", "--url", url])
    result = await anyio.to_thread.run_sync(call)
    assert result.exit_code == 0, (result.output, result.exception)
    info = json.loads(result.stdout)
    assert info["length"] == 9
    assert [row["length"] for row in info["partitions"]] == [3, 3, 3]
    publish = ["publish", "cli-parts", "job", "{}", "--key", "customer-7", "--url", url]
    result = await anyio.to_thread.run_sync(functools.partial(CliRunner().invoke, cli, publish))
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout.startswith(f"{partition_for('customer-7', 3)}:")
    pending = ["pending", "cli-parts", "g", "--url", url]
    result = await anyio.to_thread.run_sync(functools.partial(CliRunner().invoke, cli, pending))
    assert result.exit_code == 1
    assert "partitioned" in result.output
