"""Partitioned topics on a real Redis Cluster: three masters, three replicas.

One cluster for the module (``tests/chaos/_cluster.py``); consumers are
separate processes (``tests/chaos/_worker.py``, each with its own
``RedisCluster`` client) where order and exclusivity across processes are the
point, in-process consumers with clients of their own where the test has to
look at every consumer's ``partitions`` at one instant.

What is checked: the layout puts N/3 partition streams on every master; a
mismatched N is refused; keyed publishes always land in the key's partition
and ``publish_many`` returns ids in input order; messages of one key are first
handled in publish order by three consumer processes; a join or a leave moves
a bounded number of partitions and never has one partition read by two
consumers at once; ``terminate`` leaves no key of the topic on any master, and
a terminate killed halfway finishes on a rerun. Nothing is ever lost.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from helpers import wait_until
from redcurrent import Message, PartitionCountError, StartFrom, StreamConsumer, Topic, TopicKeys
from redcurrent._membership import Membership, member_id
from redcurrent.testing import find_redis_server

CHAOS = Path(__file__).resolve().parent / "chaos"
sys.path.insert(0, str(CHAOS))
from _cluster import LocalCluster  # noqa: E402
from _ledger import handled_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GROUP = "g"
KEYS = 100

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    binary = os.environ.get("REDCURRENT_REDIS_SERVER") or find_redis_server()
    if binary is None or not shutil.which("redis-cli"):
        pytest.skip("needs redis-server and redis-cli to build a local cluster")
    local = LocalCluster(binary, node_timeout_ms=3000)
    try:
        yield local.start()
    finally:
        local.stop()


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[RedisCluster]:
    redis_client = RedisCluster.from_url(cluster.url)
    await redis_client.initialize()
    try:
        yield redis_client
    finally:
        await redis_client.aclose()


def masters(cluster: LocalCluster) -> dict[int, tuple[tuple[int, int], ...]]:
    """Master port -> its slot ranges."""
    port = cluster.servers[0].port
    return {n.port: n.slots for n in cluster.nodes(port) if n.master and n.slots}


def master_of(table: dict[int, tuple[tuple[int, int], ...]], slot: int) -> int:
    return next(port for port, ranges in table.items() if any(a <= slot <= b for a, b in ranges))


def spawn_worker(root: Path, logs: Path, **options: Any) -> subprocess.Popen[bytes]:
    """``tests/chaos/_worker.py`` in a process of its own (prints ``ready``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), str(CHAOS), env.get("PYTHONPATH", "")) if p
    )
    opts = {"group": GROUP, "root": str(root), "cluster": True, "timed": True, **options}
    log = logs / f"{options['name']}.out"
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, str(CHAOS / "_worker.py"), json.dumps(opts)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def keys_of(cluster: LocalCluster, pattern: str) -> list[str]:
    """Every key matching ``pattern`` on every master."""
    found: list[str] = []
    for port in masters(cluster):
        with cluster.client(port) as direct:
            found += list(direct.scan_iter(match=pattern, count=1000))
    return found


async def group_settled(topic: Topic) -> bool:
    info = await topic.info()
    mine = [g for g in info.groups if g.name == GROUP]
    return bool(mine) and mine[0].pending == 0 and mine[0].lag == 0


# -- layout ---------------------------------------------------------------


@pytest.mark.parametrize("count", [3, 6, 12])
async def test_layout_puts_a_third_on_every_master(
    cluster: LocalCluster, client: RedisCluster, count: int
) -> None:
    """For 60 topic names, every master serves exactly ``count / 3`` of the
    partition streams (``redis-cli --cluster create`` splits the slots in
    three even ranges), as the cluster itself says (``CLUSTER KEYSLOT``) and
    as ``info().partitions`` reports."""
    table = masters(cluster)
    assert len(table) == 3
    uneven: dict[str, Counter[int]] = {}
    for index in range(60):
        name = f"layout-{count}-{index}"
        topic = Topic(client, name, partitions=count)
        streams = await topic.partition_streams()
        assert len(streams) == count == len(set(streams))
        slots = [key_slot(s.encode()) for s in streams]
        if index == 0:
            assert slots == [int(await client.cluster_keyslot(s)) for s in streams]
            info = await topic.info()
            nodes = [row.node for row in info.partitions]
            assert nodes == [f"127.0.0.1:{master_of(table, slot)}" for slot in slots]
        per_master = Counter(master_of(table, slot) for slot in slots)
        if sorted(per_master.values()) != [count // 3] * 3 or len(per_master) != 3:
            uneven[name] = per_master
    assert not uneven, f"partition streams per master: {uneven}"


async def test_partition_count_mismatch(client: RedisCluster) -> None:
    topic = Topic(client, "mismatch", partitions=6)
    streams = await topic.partition_streams()
    assert await Topic(client, "mismatch").partition_streams() == streams
    for wrong in (1, 4, 12):
        with pytest.raises(PartitionCountError):
            await Topic(client, "mismatch", partitions=wrong).partition_streams()
        with pytest.raises(PartitionCountError):
            await Topic(client, "mismatch", partitions=wrong).publish("a", {}, key="k")
    await client.xadd("plain-one", {"x": "1"})
    with pytest.raises(PartitionCountError):
        await Topic(client, "plain-one", partitions=3).partition_streams()
    await Topic(client, "mismatch").terminate()
    await Topic(client, "plain-one").terminate()


async def test_publish_many_keys_routes_and_keeps_input_order(client: RedisCluster) -> None:
    count = 6
    topic = Topic(client, "routed", partitions=count)
    streams = await topic.partition_streams()
    keys: list[str | None] = [None if i % 7 == 0 else f"key-{i % 45}" for i in range(600)]
    ids = await topic.publish_many([("a", {"i": i}) for i in range(600)], keys=keys)
    assert len(ids) == 600
    home: dict[str, set[int]] = defaultdict(set)
    per_partition: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for index, (key, message_id) in enumerate(zip(keys, ids, strict=True)):
        head, _, entry_id = message_id.partition(":")
        partition = int(head)
        per_partition[partition].append((entry_id, index))
        if key is not None:
            assert partition == zlib.crc32(key.encode()) % count
            home[key].add(partition)
    assert all(len(parts) == 1 for parts in home.values())
    # Within a partition, the ids grow with the input index and each names
    # the entry holding that input's key.
    for partition, rows in per_partition.items():
        entries = await client.xrange(streams[partition])
        assert [e[0].decode() for e in entries] == [entry_id for entry_id, _ in rows]
        for (_, fields), (_, index) in zip(entries, rows, strict=True):
            stored = fields.get(b"key")
            assert (stored.decode() if stored else None) == keys[index]
    # A single keyed publish goes where publish_many put that key.
    for key in ("key-1", "key-2", "key-44"):
        message_id = await topic.publish("a", {"i": -1}, key=key)
        assert {int(message_id.split(":")[0])} == home[key]
    assert (await topic.info()).length == 603
    await topic.terminate()


# -- consuming ------------------------------------------------------------


async def test_per_key_order_over_three_consumer_processes(
    cluster: LocalCluster, client: RedisCluster, tmp_path: Path
) -> None:
    """10 000 messages over 100 keys, 6 partitions, three consumer processes
    joining while the messages arrive: every message handled, and for every
    key the first deliveries started in publish order."""
    stream, total, count = "per-key", 10_000, 6
    root, logs = tmp_path / "ledger", tmp_path / "logs"
    root.mkdir()
    logs.mkdir()
    topic = Topic(client, stream, partitions=count)
    await topic.partition_streams()
    common = {"url": cluster.url, "stream": stream, "member_ttl": 3.0, "claim_idle": 2.0}
    workers = [spawn_worker(root, logs, name="c0", **common)]

    def ready(n: int) -> bool:
        return "ready" in (logs / f"c{n}.out").read_text().splitlines()

    try:
        await wait_until(lambda: ready(0), timeout=30)
        for start in range(0, total, 250):
            if start == total // 4:  # the others join under load: partitions move
                workers += [spawn_worker(root, logs, name=f"c{n}", **common) for n in (1, 2)]
            seqs = range(start, start + 250)
            await topic.publish_many(
                [("chaos", {"seq": s}) for s in seqs], keys=[f"k{s % KEYS}" for s in seqs]
            )
            await anyio.sleep(0.1)

        def handled() -> int:
            for n, proc in enumerate(workers):
                if proc.poll() is not None:
                    pytest.fail(f"c{n} exited:\n{(logs / f'c{n}.out').read_text()[-3000:]}")
            return len({row[0] for _, row in handled_rows(root)})

        await wait_until(lambda: handled() == total, timeout=120, interval=0.2)
        await wait_until(lambda: group_settled(topic), timeout=30)
    finally:
        for proc in workers:
            proc.terminate()
        for proc in workers:
            proc.wait(timeout=15)

    rows = [(name, row) for name, row in handled_rows(root)]
    deliveries = Counter(int(row[0]) for _, row in rows)
    assert set(deliveries) == set(range(total))  # nothing lost
    first: dict[int, tuple[float, float, int, str, int]] = {}
    for name, (seq_s, message_id, _, began, ended) in rows:
        seq = int(seq_s)
        record = (float(began), float(ended), seq, name, int(message_id.split(":")[0]))
        if seq not in first or record < first[seq]:
            first[seq] = record
    by_key: dict[int, list[tuple[float, float, int, str, int]]] = defaultdict(list)
    for seq, record in first.items():
        by_key[seq % KEYS].append(record)
    out_of_order = []
    for key, records in by_key.items():
        records.sort()
        seqs = [r[2] for r in records]
        if seqs != sorted(seqs):
            at = next(i for i in range(1, len(seqs)) if seqs[i] < seqs[i - 1])
            out_of_order.append((f"k{key}", records[at - 1], records[at]))
        assert len({r[4] for r in records}) == 1  # one partition per key
    duplicates = sum(deliveries.values()) - total
    consumers = Counter(name.split("-")[1] for name, _ in rows)
    print(f"per-key order: {total} handled, {duplicates} duplicates, by consumer {consumers}")
    assert not out_of_order, f"{len(out_of_order)} keys out of order, e.g. {out_of_order[:3]}"
    assert len(consumers) == 3
    await topic.terminate()


class Recorder:
    """In-process consumers of one topic, each on its own cluster client,
    recording who handled what in which partition, and when."""

    def __init__(self, url: str, stream: str, member_ttl: float = 1.5) -> None:
        self.url = url
        self.member_ttl = member_ttl
        self.stream = stream
        self.consumers: dict[str, StreamConsumer] = {}
        self.clients: dict[str, RedisCluster] = {}
        #: (partition, consumer, started, ended, seq)
        self.calls: list[tuple[int, str, float, float, int]] = []
        self.overlaps: list[str] = []
        #: (monotonic time, consumer, partition) each time a consumer's
        #: ``partitions`` gained one (as sampled every 10 ms).
        self.starts: list[tuple[float, str, int]] = []

    def consumer(self, name: str) -> StreamConsumer:
        redis_client = self.clients[name] = RedisCluster.from_url(self.url)
        consumer = StreamConsumer(
            redis_client,
            self.stream,
            GROUP,
            name,
            start=StartFrom.EARLIEST,
            member_ttl=self.member_ttl,
            claim_idle=1.0,
            block=0.2,
            shutdown_timeout=2.0,
        )

        @consumer.handler("a")
        async def handle(msg: Message[Any]) -> None:
            began = time.monotonic()
            await anyio.sleep(0.002)
            assert msg.partition is not None
            self.calls.append((msg.partition, name, began, time.monotonic(), msg.data["seq"]))

        self.consumers[name] = consumer
        return consumer

    def owned(self) -> dict[str, list[int]]:
        return {name: c.partitions or [] for name, c in self.consumers.items()}

    async def watch(self) -> None:
        """Every 10 ms: no partition in two consumers' ``partitions`` at once."""
        last: dict[str, set[int]] = defaultdict(set)
        while True:
            seen: dict[int, str] = {}
            for name, parts in self.owned().items():
                self.starts += [(time.monotonic(), name, p) for p in set(parts) - last[name]]
                last[name] = set(parts)
                for p in parts:
                    if p in seen:
                        self.overlaps.append(f"partition {p}: {seen[p]} and {name}")
                    seen[p] = name
            await anyio.sleep(0.01)

    def handler_overlaps(self) -> list[str]:
        """Handler calls of one partition by two consumers overlapping in time."""
        found = []
        by_partition: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
        for p, name, began, ended, _ in self.calls:
            by_partition[p].append((began, ended, name))
        for p, calls in by_partition.items():
            calls.sort()
            latest_end, latest_name = -math.inf, ""
            for began, ended, name in calls:
                if began < latest_end and name != latest_name:
                    found.append(f"partition {p}: {latest_name} and {name} at {began:.3f}")
                if ended > latest_end:
                    latest_end, latest_name = ended, name
        return found

    async def aclose(self) -> None:
        for redis_client in self.clients.values():
            await redis_client.aclose()


async def test_rebalance_on_join_and_leave(cluster: LocalCluster, client: RedisCluster) -> None:
    """1 -> 2 -> 3 consumers, then back to 1, under a steady keyed load, 12
    partitions: after each step the owned partitions add up to 12, match the
    owners ``info().partitions`` shows, are balanced, and only about the
    joiner's (leaver's) share moved; no partition was ever listed by two
    consumers at once nor had handlers of two consumers running at once."""
    stream, count = "rebalance", 12
    topic = Topic(client, stream, partitions=count)
    await topic.partition_streams()
    rec = Recorder(cluster.url, stream)
    published = attempted = 0

    async def produce() -> None:
        nonlocal published, attempted
        while True:
            seqs = range(published, published + 40)
            attempted = published + 40  # a cancelled publish may still be written
            await topic.publish_many(
                [("a", {"seq": s}) for s in seqs], keys=[f"k{s % 50}" for s in seqs]
            )
            published += 40
            await anyio.sleep(0.05)

    async def settled(names: list[str]) -> dict[int, str] | None:
        owned = rec.owned()
        mapping = {p: name for name in names for p in owned[name]}
        if sorted(mapping) != list(range(count)):
            return None
        if sum(len(owned[n]) for n in names) != count:
            return None
        if max(len(owned[n]) for n in names) > math.ceil(count / len(names)):
            return None
        rows = (await topic.info()).partitions
        if any(row.owners.get(GROUP) != mapping[row.partition] for row in rows):
            return None
        return mapping

    steps: list[tuple[str, int, int]] = []

    async def step(what: str, names: list[str], before: dict[int, str]) -> dict[int, str]:
        box: list[dict[int, str]] = []

        async def done() -> bool:
            mapping = await settled(names)
            if mapping is not None:
                box.append(mapping)
            return mapping is not None

        await wait_until(done, timeout=20)
        after = box[-1]
        moves = sum(before.get(p) != after[p] for p in range(count))
        # The joiner's or leaver's share (of the larger membership).
        share = math.ceil(count / max(len(names), len(set(before.values()))))
        steps.append((what, moves, share))
        return after

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(rec.watch)
            tg.start_soon(produce)
            async with rec.consumer("c1"):
                one = await step("join c1", ["c1"], {})
                async with rec.consumer("c2"):
                    two = await step("join c2", ["c1", "c2"], one)
                    async with rec.consumer("c3"):
                        three = await step("join c3", ["c1", "c2", "c3"], two)
                    two = await step("leave c3", ["c1", "c2"], three)
                await step("leave c2", ["c1"], two)
                tg.cancel_scope.cancel()
        async with rec.consumer("c1"):
            await wait_until(lambda: group_settled(topic), timeout=30)
    finally:
        await rec.aclose()
    print("rebalance moves (step, moved, share):", steps)
    assert not rec.overlaps, rec.overlaps[:5]
    assert not rec.handler_overlaps(), rec.handler_overlaps()[:5]
    for what, moves, share in steps:
        if what.startswith("join c1"):
            assert moves == count
        else:  # about the joiner's or leaver's share, never a reshuffle
            assert moves <= share + 1, (what, moves, share)
    handled = {seq for *_, seq in rec.calls}
    assert set(range(published)) <= handled <= set(range(attempted))
    await topic.terminate()


# -- terminate ------------------------------------------------------------


async def _populated(client: RedisCluster, name: str, count: int) -> Topic:
    """A partitioned topic with messages, a group on every partition, a dead
    letter, a stopped id and owner entries: keys of every kind."""
    topic = Topic(client, name, partitions=count)
    await topic.publish_many(
        [("a", {"i": i}) for i in range(120)], keys=[f"k{i % 17}" for i in range(120)]
    )
    consumer = StreamConsumer(
        client, name, GROUP, "t", start=StartFrom.EARLIEST, member_ttl=1.5, block=0.1
    )
    seen: list[str] = []

    @consumer.handler("a")
    async def handle(msg: Message[Any]) -> None:
        seen.append(msg.id)

    async with consumer:
        await wait_until(lambda: len(seen) >= 120, timeout=20)
    stop_id = await topic.publish("a", {"i": -1}, key="k1")
    await topic.stop_message(stop_id)
    return topic


async def test_terminate_leaves_no_key_on_any_master(
    cluster: LocalCluster, client: RedisCluster
) -> None:
    name = "doomed-topic"
    topic = await _populated(client, name, 6)
    assert await keys_of(cluster, f"*{name}*")
    await topic.terminate()
    assert await keys_of(cluster, f"*{name}*") == []


async def test_terminate_killed_halfway_finishes_on_rerun(
    cluster: LocalCluster, client: RedisCluster
) -> None:
    """A terminate that died after deleting three partitions' keys (by hand
    here), the meta hash left saying ``terminating``: a rerun, by a process
    that never saw the topic, removes the rest."""
    name = "half-doomed"
    topic = await _populated(client, name, 6)
    streams = await topic.partition_streams()
    meta = next(k for k in await keys_of(cluster, f"*{name}*") if k.endswith(":meta"))
    await client.hset(meta, "state", "terminating")
    for stream in streams[:3]:
        for key in await keys_of(cluster, f"*{stream}*"):
            await client.delete(key)
    left = await keys_of(cluster, f"*{name}*")
    assert meta in left
    assert any(streams[5] in k for k in left)
    fresh = RedisCluster.from_url(cluster.url)
    try:
        await Topic(fresh, name).terminate()
    finally:
        await fresh.aclose()
    assert await keys_of(cluster, f"*{name}*") == []


async def test_a_partition_handed_over_is_not_taken_back_on_a_late_reply(
    cluster: LocalCluster, client: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """c1's lease replies arrive 0.3 s late (a slow link; longer than its
    runtimes take to stop, member_ttl 3 s): when c3 joins (taking partitions
    0 and 1, so that the first lease c1 renews is of one it hands over), c1 hands
    partitions over, renewing their leases while they drain; a runtime that
    ends (and releases its partition to c3) while such a reply is on its way
    must not be started again by c1 on that reply (two readers), nor may the
    renewal take back a partition already released (churn): once c3 joined,
    c1 starts no partition."""
    stream, count = "late-reply", 4
    topic = Topic(client, stream, partitions=count)
    await topic.partition_streams()
    acquire = Membership.acquire

    async def late(self: Membership, *args: Any, **kwargs: Any) -> bool:
        taken = await acquire(self, *args, **kwargs)
        if self.name == "c1":
            await anyio.sleep(0.3)
        return taken

    monkeypatch.setattr(Membership, "acquire", late)
    rec = Recorder(cluster.url, stream, member_ttl=3.0)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(rec.watch)
            async with rec.consumer("c1"):
                # ... as the watcher saw it, so that later starts are new ones.
                await wait_until(
                    lambda: len({p for _, who, p in rec.starts if who == "c1"}) == count,
                    timeout=20,
                )
                joined = time.monotonic()
                async with rec.consumer("c3"):
                    await topic.publish_many(
                        [("a", {"seq": s}) for s in range(200)],
                        keys=[f"k{s % 20}" for s in range(200)],
                    )

                    def split() -> bool:
                        owned = rec.owned()
                        return len(owned["c1"]) == len(owned["c3"]) == count // 2

                    await wait_until(split, timeout=20)
                    # c1's membership loop has run again since: the
                    # rebalance that handed over (and its late replies) is over.
                    members, entry = TopicKeys(stream).members, member_id(GROUP, "c1")
                    beat = await client.zscore(members, entry)
                    await wait_until(
                        lambda: _later(client.zscore(members, entry), beat), timeout=20
                    )
                    await wait_until(lambda: group_settled(topic), timeout=20)
            tg.cancel_scope.cancel()
    finally:
        await rec.aclose()
    assert not rec.overlaps, rec.overlaps[:5]
    assert not rec.handler_overlaps(), rec.handler_overlaps()[:5]
    assert {seq for *_, seq in rec.calls} == set(range(200))
    restarted = [(p, at - joined) for at, name, p in rec.starts if name == "c1" and at > joined]
    assert not restarted, f"c1 took back partitions after c3 joined: {restarted}"
    await topic.terminate()


async def _later(score: Awaitable[float | None], than: float | None) -> bool:
    now = await score
    return now is not None and than is not None and now > than


async def test_a_failing_partition_raises_its_error_not_an_exception_group(
    client: RedisCluster,
) -> None:
    """A fan-out over partitions on several nodes fails with the error of the
    partition that failed (a RedisError, as for a plain topic), which callers
    catch and retry on; never an ExceptionGroup they would not catch."""
    topic = Topic(client, "one-broken", partitions=3)
    streams = await topic.partition_streams()
    await client.set(streams[1], "not a stream")
    with pytest.raises(redis.exceptions.ResponseError):
        await topic.publish_many([("a", {"i": i}) for i in range(30)])
    with pytest.raises(redis.exceptions.ResponseError):
        await topic.info()
    await client.delete(streams[1])
    await topic.terminate()
