"""Faults on a partitioned topic on a local Redis Cluster (3 masters, 3 replicas).

Three consumer processes (``_worker.py``, ``member_ttl=2``, ``claim_idle=2``,
each on its own ``RedisCluster`` client) read a topic of six partitions while a
producer publishes keyed messages (100 keys); one fault per scenario:

- a member SIGKILLed: its partitions are taken over within about
  ``member_ttl`` and every message it held is handled by the others;
- a member SIGSTOPped past its lease: the others take its partitions over,
  and once thawed it starts no handler of those partitions while another
  member reads them (handler start/end times per partition never overlap
  between consumers after the takeover);
- a member restarted with the same name (a static member): it gets its own
  partitions back, without the others' map moving;
- ``CLUSTER FAILOVER`` of the master serving the most partitions;
- the slot of one partition migrated to another master (a reshard).

Every scenario ends drained and audited (``_ledger.py``): nothing lost, nothing
pending over all partitions, duplicates counted (a publish retried after an
error may have been written: ``producer_retries``), and how many keys saw their
first deliveries out of publish order (``keys_out_of_order``: a crash or a
freeze may reorder, see ../shared/PARTITIONS.md; a handover may not). One
cluster serves the module.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from _cluster import LocalCluster
from _fleet import Fleet, Proc
from _ledger import Audit, _dead_seqs, handled_rows, read_handled, read_published
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from redcurrent import Topic

GROUP = "chaos"
PARTITIONS = 6
KEYS = 100
TTL = 2.0
CHUNK = 50

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    binary = os.environ.get("REDCURRENT_REDIS_SERVER") or "/usr/bin/redis-server"
    if not (shutil.which(binary) and shutil.which("redis-cli")):
        pytest.skip(f"needs {binary} and redis-cli to build a local cluster")
    local = LocalCluster(binary, node_timeout_ms=1500)
    try:
        yield local.start()
    finally:
        local.stop()


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[RedisCluster]:
    cluster.wait_healthy()
    redis_client = RedisCluster.from_url(cluster.url)
    await redis_client.initialize()
    try:
        yield redis_client
    finally:
        await redis_client.aclose()


async def until(predicate: Callable[[], bool | Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:.0f}s waiting for {what}")
        await anyio.sleep(0.05)


class Scenario:
    """A topic, its fleet of processes and the ledger of one scenario."""

    def __init__(
        self, cluster: LocalCluster, client: RedisCluster, tmp: Path, stream: str, total: int
    ) -> None:
        self.cluster = cluster
        self.client = client
        self.stream = stream
        self.total = total
        self.root = tmp / "ledger"
        self.root.mkdir(exist_ok=True)
        logs = tmp / "logs"
        logs.mkdir(exist_ok=True)
        self.fleet = Fleet(self.root, logs, stream=stream, group=GROUP)
        self.topic = Topic(client, stream)
        self.workers: dict[str, Proc] = {}
        self.producer: Proc | None = None
        self.faults: list[str] = []
        self.extra: dict[str, Any] = {}

    #: seconds a handler takes: long enough that a member holds messages
    #: (running and prefetched) whenever a fault strikes it.
    delay = 0.05

    def worker(self, name: str, member_ttl: float = TTL) -> Proc:
        proc = self.fleet.worker(
            name,
            url=self.cluster.url,
            cluster=True,
            member_ttl=member_ttl,
            claim_idle=2.0,
            block=0.5,
            delay=self.delay,
            timed=True,
            socket_timeout=5.0,
        )
        self.workers[name] = proc
        return proc

    async def start(self, names: list[str], member_ttl: float = TTL) -> None:
        await Topic(self.client, self.stream, partitions=PARTITIONS).partition_streams()
        procs = [self.worker(n, member_ttl) for n in names]
        await until(lambda: self.fleet.ready(*procs), 60, "the consumers")
        await until(self.balanced, 30, "every partition owned")
        pause = 0.1
        self.producer = self.fleet.producer(
            "p",
            url=self.cluster.url,
            cluster=True,
            first=0,
            count=self.total,
            chunk=CHUNK,
            pause=pause,
            partitions=PARTITIONS,
            keys=KEYS,
            socket_timeout=5.0,
        )
        await until(lambda: self.published() >= self.total // 3, 60, "a third of the publishes")

    def kill(self, name: str) -> None:
        """SIGKILL a worker (no longer one that must keep running)."""
        proc = self.workers[name]
        proc.popen.kill()
        proc.popen.wait()
        self.fleet.procs.remove(proc)

    async def held(self, name: str) -> int:
        """Entries of the group's pending lists (all partitions) held by ``name``."""
        held = 0
        for stream in await self.topic.partition_streams():
            held += len(await self.client.xpending_range(stream, GROUP, "-", "+", 10_000, name))
        return held

    def published(self) -> int:
        return len(read_published(self.root))

    async def owners(self) -> dict[int, str]:
        rows = (await self.topic.info()).partitions
        return {row.partition: row.owners.get(GROUP, "") for row in rows}

    async def balanced(self) -> bool:
        """Every partition owned by a live worker, two each."""
        owners = await self.owners()
        live = {n for n, p in self.workers.items() if p.popen.poll() is None}
        return set(owners.values()) <= live and Counter(owners.values()) == dict.fromkeys(
            live, PARTITIONS // len(live)
        )

    async def drained(self) -> bool:
        self.fleet.check()
        if self.producer is None or self.producer.popen.poll() is None:
            return False
        info = await self.topic.info()
        mine = [g for g in info.groups if g.name == GROUP]
        if not mine or mine[0].pending or mine[0].lag:
            return False
        missing = read_published(self.root) - set(read_handled(self.root))
        if missing and info.dead_letters:
            missing -= (await _dead_seqs(self.topic))[0]
        return not missing

    async def audit(self, scenario: str, record: Callable[[Audit], Audit]) -> Audit:
        await until(self.drained, 120, "every message handled, nothing pending")
        published = read_published(self.root)
        handled = read_handled(self.root)
        dead, reasons = await _dead_seqs(self.topic)
        info = await self.topic.info()
        group = next(g for g in info.groups if g.name == GROUP)
        lost = sorted(published - set(handled) - dead)
        self.extra["keys_out_of_order"] = len(self.out_of_order())
        if self.producer is not None:  # publishes retried after an error (duplicates)
            self.extra["producer_retries"] = int(
                self.producer.output().split("done ")[-1].split()[0]
            )
        result = record(
            Audit(
                scenario=scenario,
                published=len(published),
                handled=len(handled),
                deliveries=sum(handled.values()),
                duplicates=sum(handled.values()) - len(handled),
                dead_letters=len(dead),
                lost=len(lost),
                pending=group.pending,
                lag=group.lag,
                faults=self.faults,
                lost_sample=lost[:20],
                dead_reasons=dict(reasons),
                extra=self.extra,
            )
        )
        assert result.published == self.total
        assert result.lost == 0, result.lost_sample
        assert result.pending == 0
        return result

    def calls(self) -> list[tuple[int, str, float, float, int]]:
        """Every handler call: (partition, consumer process, started, ended, seq)."""
        rows = []
        for log, (seq, message_id, _, began, ended) in handled_rows(self.root):
            partition = int(message_id.split(":")[0])
            rows.append((partition, log, float(began), float(ended), int(seq)))
        return rows

    def out_of_order(self) -> list[str]:
        """Keys whose first deliveries did not start in publish order (a
        crash may reorder: the dead member's messages are claimed later)."""
        first: dict[int, tuple[float, int]] = {}
        for _, _, began, _, seq in self.calls():
            if seq not in first or began < first[seq][0]:
                first[seq] = (began, seq)
        by_key: dict[int, list[tuple[float, int]]] = defaultdict(list)
        for seq, row in first.items():
            by_key[seq % KEYS].append(row)
        return [
            f"k{key}"
            for key, rows in by_key.items()
            if [s for _, s in sorted(rows)] != sorted(s for _, s in rows)
        ]

    def overlaps(self, partitions: set[int], since: float) -> list[str]:
        """Handler calls started after ``since`` in one of ``partitions`` that
        overlap a call of another consumer process in that partition."""
        by_partition: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
        for p, log, began, ended, _ in self.calls():
            if p in partitions and began >= since:
                by_partition[p].append((began, ended, log))
        found = []
        for p, calls in by_partition.items():
            calls.sort()
            latest_end, latest = -1.0, ""
            for began, ended, log in calls:
                if began < latest_end and log != latest:
                    found.append(f"partition {p}: {latest} and {log} at {began:.6f}")
                if ended > latest_end:
                    latest_end, latest = ended, log
        return found


@pytest.fixture
def scenario(
    cluster: LocalCluster, client: RedisCluster, tmp_path: Path, full_scale: bool
) -> Iterator[Callable[[str], Scenario]]:
    made: list[Scenario] = []

    def make(stream: str) -> Scenario:
        made.append(Scenario(cluster, client, tmp_path, stream, 12_000 if full_scale else 3_000))
        return made[-1]

    yield make
    for one in made:
        one.fleet.__exit__(None, None, None)


async def test_partition_member_killed(
    scenario: Callable[[str], Scenario], record: Callable[[Audit], Audit]
) -> None:
    run = scenario("p-killed")
    await run.start(["c0", "c1", "c2"])
    before = await run.owners()
    theirs = {p for p, who in before.items() if who == "c0"}
    held = await run.held("c0")
    run.kill("c0")
    killed = time.monotonic()
    run.extra["held_at_kill"] = held
    assert held, "c0 held no message when it was killed: nothing to take over"

    async def taken_over() -> bool:
        owners = await run.owners()
        return all(owners[p] in ("c1", "c2") for p in theirs)

    await until(taken_over, 30, "the killed member's partitions taken over")
    took = time.monotonic() - killed
    run.faults.append(f"SIGKILL c0 (partitions {sorted(theirs)}), taken over after {took:.1f}s")
    run.extra["takeover_s"] = round(took, 2)
    await until(run.balanced, 30, "three partitions each on c1 and c2")
    await run.audit("partitions-member-killed", record)
    # The lease runs member_ttl from its last renewal (every member_ttl / 3);
    # the others look every member_ttl / 3: about 1.3 x member_ttl, with room
    # for a loaded two-core machine.
    assert took < 3 * TTL


async def test_partition_member_frozen_fences_itself(
    scenario: Callable[[str], Scenario], record: Callable[[Audit], Audit]
) -> None:
    run = scenario("p-frozen")
    await run.start(["c0", "c1", "c2"])
    before = await run.owners()
    theirs = {p for p, who in before.items() if who == "c0"}
    victim = run.workers["c0"]
    held = await run.held("c0")
    victim.popen.send_signal(signal.SIGSTOP)
    frozen = time.monotonic()
    try:

        async def taken_over() -> bool:
            owners = await run.owners()
            return all(owners[p] in ("c1", "c2") for p in theirs)

        await until(taken_over, 30, "the frozen member's partitions taken over")
        takeover = time.time()
        took = time.monotonic() - frozen
        # Let the others work on them a while before the thaw.
        await anyio.sleep(TTL)
    finally:
        victim.popen.send_signal(signal.SIGCONT)
    run.faults.append(
        f"SIGSTOP c0 (partitions {sorted(theirs)}) for {time.monotonic() - frozen:.1f}s, "
        f"taken over after {took:.1f}s"
    )
    run.extra["takeover_s"] = round(took, 2)
    run.extra["held_at_freeze"] = held
    # Thawed, c0 rejoins the map and gets its share back through a handover.
    await until(run.balanced, 30, "two partitions each again")
    result = await run.audit("partitions-member-frozen", record)
    overlaps = run.overlaps(theirs, takeover)
    result.extra["overlaps"] = len(overlaps)
    assert not overlaps, overlaps[:5]


async def test_partition_static_member_restart(
    scenario: Callable[[str], Scenario], record: Callable[[Audit], Audit]
) -> None:
    """c0 SIGKILLed and started again at once under the same name, well within
    its member_ttl (5 s here): it takes its own partitions back (the same
    name may), and the others' partitions never move."""
    run = scenario("p-static")
    await run.start(["c0", "c1", "c2"], member_ttl=5.0)
    before = await run.owners()
    run.kill("c0")
    restarted = time.monotonic()
    again = run.worker("c0", member_ttl=5.0)
    moved: set[int] = set()

    async def back() -> bool:
        owners = await run.owners()
        moved.update(p for p, who in owners.items() if who not in (before[p], ""))
        return owners == before and run.fleet.ready(again)

    await until(back, 30, "c0's partitions back with c0")
    took = time.monotonic() - restarted
    run.faults.append(f"SIGKILL c0 and restart as c0: its partitions back after {took:.1f}s")
    run.extra["back_s"] = round(took, 2)
    await run.audit("partitions-static-restart", record)
    assert not moved, f"partitions moved to another member: {sorted(moved)}"


async def test_partition_cluster_failover(
    scenario: Callable[[str], Scenario],
    record: Callable[[Audit], Audit],
    cluster: LocalCluster,
) -> None:
    """CLUSTER FAILOVER of the master serving the most partitions (and the
    topic's meta hash or not), under load: nothing acknowledged may be lost."""
    run = scenario("p-failover")
    streams = await Topic(run.client, run.stream, partitions=PARTITIONS).partition_streams()
    slots = [key_slot(s.encode()) for s in streams]
    where = {slot: cluster.owner(slot) for slot in slots}
    (master, replica), served = Counter(where.values()).most_common(1)[0]
    moving = [slot for slot in slots if where[slot][0] == master]
    await run.start(["c0", "c1", "c2"])
    at = run.published()
    began = time.monotonic()
    cluster.call(replica, "CLUSTER", "FAILOVER")
    await until(
        lambda: all(cluster.owner(slot)[0] == replica for slot in moving),
        30,
        "the replica to take the slots",
    )
    await until(cluster.healthy, 30, "the cluster to settle")
    run.faults.append(
        f"CLUSTER FAILOVER {master}->{replica} ({served} partitions) at {at} published, "
        f"settled after {time.monotonic() - began:.1f}s"
    )
    result = await run.audit("partitions-cluster-failover", record)
    assert result.lost == 0


async def test_partition_slot_resharded(
    scenario: Callable[[str], Scenario],
    record: Callable[[Audit], Audit],
    cluster: LocalCluster,
) -> None:
    """The slot of one partition (its stream and every key of its tag: owner
    hash, dead letters, ...) migrated to another master under load, as
    ``redis-cli --cluster reshard`` does it (IMPORTING, MIGRATING, MIGRATE in
    small batches, SETSLOT NODE on every master): nothing lost."""
    run = scenario("p-reshard")
    streams = await Topic(run.client, run.stream, partitions=PARTITIONS).partition_streams()
    slot = key_slot(streams[0].encode())
    await run.start(["c0", "c1", "c2"])
    source, _ = cluster.owner(slot)
    masters = sorted(n.port for n in cluster.nodes(source) if n.master and n.slots)
    target = next(port for port in masters if port != source)
    source_id = cluster.call(source, "CLUSTER", "MYID")
    target_id = cluster.call(target, "CLUSTER", "MYID")
    at = run.published()
    began = time.monotonic()
    cluster.call(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    cluster.call(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    moved = 0
    while keys := cluster.call(source, "CLUSTER", "GETKEYSINSLOT", slot, 2):
        cluster.call(source, "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        moved += len(keys)
        await anyio.sleep(0.2)  # let the load run while the slot is split
    for port in [target, source, *(p for p in masters if p not in (source, target))]:
        cluster.call(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
    await until(lambda: cluster.owner(slot)[0] == target, 30, "every node to see the new owner")
    await until(cluster.healthy, 30, "the cluster to settle")
    run.faults.append(
        f"slot {slot} (partition 0, {moved} keys) migrated {source}->{target} at {at} "
        f"published, in {time.monotonic() - began:.1f}s"
    )
    await run.audit("partitions-reshard", record)
