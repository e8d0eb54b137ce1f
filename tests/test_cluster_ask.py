"""A cluster slot in the ASK window (migration under way), by hand, on a local cluster.

redis-py's asyncio cluster client (8.1 and earlier) sends ``ASKING`` and the
redirected command on different pooled connections: with an even number of
idle connections to the importing node every write to a key not yet migrated
ping-pongs MOVED/ASK until ``ClusterError("TTL exhausted.")``
(``tools/repro_redis_py_ask.py``). ``redcurrent._cluster_ask`` works around
it; consumers treat the error as transient. Also: cluster errors ``classify``
must retry (real ones, from real servers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio
from redis import exceptions as rex
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from helpers import wait_until as until
from redcurrent import Message, StartFrom, StreamConsumer, Topic
from redcurrent._cluster_ask import execute_command, is_ask_ping_pong, run_script
from redcurrent._faults import Fault, classify, error_code
from redcurrent.testing import RedisServer, find_redis_server
from test_cluster import (  # the local three-master cluster of test_cluster.py
    _cluster_ports,
    _collect_dropped_cluster_nodes,  # noqa: F401
    cluster,  # noqa: F401
    cluster_url,  # noqa: F401
)

# Each ping-pong closes all the client's connections every 5th MOVED and
# re-initialises, dropping ClusterNodes with their connections open (redis-py);
# collected during a test, their ResourceWarnings would fail it. The imported
# module fixture collects the rest when the module ends.
# redis-py 5.0's connections, collected after the loop closed, raise from __del__.
pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


FAST: dict[str, Any] = {"claim_idle": 0.5, "block": 0.3, "shutdown_timeout": 1.0}


@dataclass
class Window:
    """The slot of ``tag`` MIGRATING on ``source``, IMPORTING on ``target``."""

    slot: int
    source: redis.Redis
    target: redis.Redis
    source_node: ClusterNode
    target_node: ClusterNode
    primaries: list[ClusterNode]

    def migrate(self, *keys: str) -> None:
        self.source.migrate(self.target_node.host, self.target_node.port, list(keys), 0, 5000)

    def on_target(self, *args: Any) -> Any:
        """A command to the importing node for a key of the slot (ASKING first)."""
        with self.target.pipeline(transaction=False) as pipe:
            pipe.execute_command("ASKING")
            pipe.execute_command(*args)
            return pipe.execute()[1]

    def finish(self) -> None:
        """The slot is the target's, on every node (as redis-cli --cluster does)."""
        target_id = self.target.cluster("MYID")
        for node in self.primaries:
            with redis.Redis(host=node.host, port=node.port) as each:
                each.cluster("SETSLOT", self.slot, "NODE", target_id)


@contextlib.contextmanager
def ask_window(
    cluster: RedisCluster,  # noqa: F811
    tag: str,
    strings: Mapping[str, str] | None = None,
) -> Iterator[Window]:
    """The window for ``tag``'s slot; ``strings`` set on the source before it opens."""
    slot = key_slot(tag.encode())
    source_node = cluster.get_node_from_key(tag)
    target_node = next(n for n in cluster.get_primaries() if n.name != source_node.name)
    source = redis.Redis(host=source_node.host, port=source_node.port, decode_responses=True)
    target = redis.Redis(host=target_node.host, port=target_node.port, decode_responses=True)
    window = Window(slot, source, target, source_node, target_node, cluster.get_primaries())
    try:
        if strings:
            source.mset(dict(strings))
        target.cluster("SETSLOT", slot, "IMPORTING", source.cluster("MYID"))
        source.cluster("SETSLOT", slot, "MIGRATING", target.cluster("MYID"))
        yield window
    finally:
        with contextlib.suppress(redis.RedisError):
            window.finish()  # never leave the module's cluster mid-migration
        source.close()
        target.close()


async def _ping_many(cluster: RedisCluster, node: ClusterNode, count: int) -> None:  # noqa: F811
    """Leave ``count`` connections to ``node`` idle in its pool, as a busy client
    has: concurrent commands take one each."""
    results: list[Any] = []

    async def one() -> None:
        for attempt in range(5):
            try:
                results.append(await cluster.execute_command("PING", target_nodes=node))
                return
            except rex.ConnectionError:
                # redis-py closes every connection of the client on some
                # redirects, which a consumer on the same client may be
                # following right now: try again on a fresh one.
                if attempt == 4:
                    raise

    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(one)
    assert len(results) == count


async def test_writes_in_the_ask_window_succeed_through_the_workaround(
    cluster: RedisCluster,  # noqa: F811
) -> None:
    topic = Topic(cluster, "ask{w}:orders")
    with ask_window(cluster, "{w}", {"{w}moved": "1"}) as window:
        window.migrate("{w}moved")  # the window proper: a key of the slot has moved

        # The bug, when this redis-py has it: a transient fault, never a stop.
        await _ping_many(cluster, window.target_node, 2)
        plain: list[BaseException] = []
        try:
            await cluster.set("{w}plain", "1")
        except rex.RedisError as exc:
            plain.append(exc)
        assert all(is_ask_ping_pong(e) and classify(e) is Fault.TRANSIENT for e in plain), plain

        ids = []
        for n in range(5):
            await _ping_many(cluster, window.target_node, 2)
            args = topic._xadd_args("job", {"n": n}, None, None)
            ids.append(await execute_command(cluster, topic.name, *args))
        # A script (what keyed and batched publishes run) takes the same path.
        script = cluster.register_script(
            "return redis.call('XADD', KEYS[1], '*', 'type', ARGV[1], 'data', '{}')"
        )
        for _ in range(2):  # NOSCRIPT (then loaded), then cached
            await _ping_many(cluster, window.target_node, 2)
            ids.append(await run_script(cluster, script, [topic.name], ["job"]))
        assert window.on_target("XLEN", topic.name) == len(ids)
        with pytest.raises(rex.ResponseError) as asked:  # not on the migrating node
            window.source.exists(topic.name)
        assert error_code(asked.value) == "ASK"

        window.finish()
        # The migration done: the owner answers MOVED and redis-py takes over again.
        args = topic._xadd_args("job", {"n": "after"}, None, None)
        ids.append(await execute_command(cluster, topic.name, *args))
        assert len(set(ids)) == len(ids)
        assert [e[0] for e in window.target.xrange(topic.name)] == [
            i.decode() if isinstance(i, bytes) else i for i in ids
        ]


async def test_topic_publish_in_the_ask_window(cluster: RedisCluster) -> None:  # noqa: F811
    topic = Topic(cluster, "ask{p}:orders")
    with ask_window(cluster, "{p}", {"{p}moved": "1"}) as window:
        window.migrate("{p}moved")
        for n in range(3):
            await _ping_many(cluster, window.target_node, 2)
            await topic.publish("job", {"n": n})
        # The new stream lives on the importing node: ASKING to look at it there.
        pipe = window.target.pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.xlen(topic.name)
        assert pipe.execute()[1] == 3


async def test_a_consumer_rides_out_the_ask_window(cluster: RedisCluster) -> None:  # noqa: F811
    """The stream itself migrated, the slot not yet handed over: every command of
    the consumer on it is redirected (and ping-pongs while the bug bites). The
    consumer retries and goes on once the slot is handed over."""
    stream = "ask{c}:orders"
    topic = Topic(cluster, stream)
    seen: list[str] = []
    consumer = StreamConsumer(cluster, stream, "g", start=StartFrom.EARLIEST, **FAST)

    @consumer.handler("job")
    async def job(msg: Message[Any]) -> None:
        seen.append(msg.id)

    async with consumer:
        first = await topic.publish("job", {})
        await until(lambda: first in seen)
        with ask_window(cluster, "{c}") as window:
            window.migrate(stream)
            faults: list[BaseException] = []
            for _ in range(3):
                await _ping_many(cluster, window.target_node, 2)
                try:
                    await cluster.xlen(stream)
                except rex.RedisError as exc:
                    faults.append(exc)
            assert all(classify(f) is Fault.TRANSIENT for f in faults), faults
            args = topic._xadd_args("job", {"during": 1}, None, None)
            second = await execute_command(cluster, stream, *args)
            # The consumer meets the redirects (the ping-pong: an outage) and goes on.
            await until(lambda: consumer.health().outage_seconds is not None, timeout=10.0)
            assert consumer.stop_reason is None
        # The window is closed (the slot is the target's) on leaving the block.
        second_id = second.decode() if isinstance(second, bytes) else second
        await until(lambda: second_id in seen, timeout=10.0)
        assert consumer.stop_reason is None


async def test_classify_cluster_errors(cluster: RedisCluster, cluster_url: str) -> None:  # noqa: F811
    """Real errors of a cluster: all transient."""
    errors: dict[str, BaseException] = {}
    # TRYAGAIN: a multi-key command whose keys are split by a migration.
    with ask_window(cluster, "{t}", {"{t}a": "1", "{t}b": "2"}) as window:
        window.migrate("{t}a")
        with pytest.raises(rex.ResponseError) as tryagain:  # TryAgainError in redis-py 8
            window.source.mget("{t}a", "{t}b")
        errors["TRYAGAIN"] = tryagain.value

    # MaxConnectionsError: every connection to the node busy (a blocked read).
    small = RedisCluster.from_url(cluster_url, max_connections=1)
    try:
        await small.initialize()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: small.blpop(["{m}list"], timeout=1))
            await anyio.sleep(0.2)
            with pytest.raises(rex.MaxConnectionsError) as busy:
                await small.get("{m}other")
            errors["MaxConnectionsError"] = busy.value
    finally:
        await small.aclose()

    # CLUSTERDOWN: a cluster node that serves no slot.
    binary = find_redis_server()
    assert binary is not None
    args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
    with RedisServer(binary, port=_cluster_ports(1)[0], extra_args=args) as lone:
        async with redis.asyncio.Redis(port=lone.port) as node:
            with pytest.raises(rex.ResponseError) as down:  # ClusterDownError in redis-py 8
                await node.xadd("s", {"a": "b"})
            errors["CLUSTERDOWN"] = down.value

    faults = {name: classify(exc) for name, exc in errors.items()}
    assert faults == dict.fromkeys(errors, Fault.TRANSIENT), {n: repr(e) for n, e in errors.items()}


async def test_asking_helper_is_plain_on_a_single_server(redis_client: redis.asyncio.Redis) -> None:
    assert await execute_command(redis_client, "k", "SET", "k", "v") is True
    assert await execute_command(redis_client, "k", "GET", "k") in (b"v", "v")
