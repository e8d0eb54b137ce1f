"""Faults on a cluster: a failover, a killed master and a resharded slot, under load.

Each scenario builds its own local cluster of three masters with one replica
each (``_cluster.py``), starts three consumer processes and a producer on
redis-py's asyncio ``RedisCluster``, injects its fault once about a third of
the messages are published, lets the producer finish and the group drain, and
audits the ledger (``_ledger.py``): every acknowledged publish handled or dead
lettered, the pending list empty, duplicates counted, every consumer still
running. ``recovery_s`` is the time from the fault to the first moment the
group had caught up again (nothing pending, nothing unread), the producer
still running.

What an automatic failover can undo: Redis replicates asynchronously, so a
master that dies may take with it writes it had already acknowledged but not
yet sent to its replica — publishes (lost), acks (their entries come back as
duplicates), claims and group positions (duplicates again). The killed-master
scenario therefore places a ``WAIT 1`` barrier just before the kill: seqs
acknowledged before it are known to be on the replica and must never be lost;
seqs acknowledged after it may be, and are reported apart
(``lost_unreplicated``) rather than hidden.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from _cluster import LocalCluster
from _ledger import Audit, _dead_seqs, audit, read_handled, read_published
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from conftest import spawn
from redcurrent import Topic, TopicKeys

STREAM = "orders"
GROUP = "chaos"
KEYS = TopicKeys(STREAM)
SLOT = key_slot(STREAM.encode())
CONSUMERS = 3
#: Seqs per publish of the producer.
CHUNK = 50
#: Idle connections every client keeps to every node in the reshard scenario.
WARM = 4
#: Keys sharing the topic's slot that the reshard migrates around the topic's own.
FILLERS = 40

pytestmark = pytest.mark.timeout(900)  # the full scale; short runs take well under 2 min


def _binary() -> str:
    binary = os.environ.get("REDCURRENT_REDIS_SERVER") or "/usr/bin/redis-server"
    if not (shutil.which(binary) and shutil.which("redis-cli")):
        pytest.skip(f"needs {binary} and redis-cli to build a local cluster")
    return binary


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    local = LocalCluster(_binary(), node_timeout_ms=1500)
    try:
        yield local.start()
    finally:
        local.stop()


async def until(predicate: Callable[[], bool | Awaitable[bool]], within: float, what: str) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``within`` s."""
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


@dataclass
class Run:
    """The processes and files of one scenario."""

    cluster: LocalCluster
    root: Path
    logs: Path
    total: int
    consumers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    producer: subprocess.Popen[bytes] | None = None
    faults: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    #: ``time.monotonic()`` when the last fault struck (``recovered`` counts from it).
    fault_at: float = 0.0

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def published(self) -> int:
        return len(read_published(self.root))

    def kill_all(self) -> None:
        for proc in [*self.consumers, self.producer]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def run(
    cluster: LocalCluster, ledger_root: Path, tmp_path: Path, full_scale: bool
) -> Iterator[Run]:
    logs = tmp_path / "logs"
    logs.mkdir()
    scenario = Run(cluster, ledger_root, logs, total=30_000 if full_scale else 5_000)
    try:
        yield scenario
    finally:
        scenario.kill_all()


async def start_load(run: Run, *, warm: int = 0) -> None:
    """Three consumers (ready), then a producer spreading ``run.total`` seqs
    over roughly 12 s (short) or a minute (full)."""
    common = {
        "url": run.cluster.url,
        "stream": STREAM,
        "root": str(run.root),
        "cluster": True,
        "socket_timeout": 5.0,
        "warm": warm,
    }
    for n in range(CONSUMERS):
        options = {**common, "group": GROUP, "name": f"c{n}", "claim_idle": 2.0, "block": 0.5}
        run.consumers.append(spawn("_worker.py", options, run.log(f"c{n}")))
    for n in range(CONSUMERS):
        await until(lambda n=n: "ready" in run.log(f"c{n}").read_text(), 60, f"consumer c{n}")
    pause = 0.1 if run.total <= 5_000 else 0.08
    options = {**common, "name": "p", "first": 0, "count": run.total, "chunk": CHUNK}
    run.producer = spawn("_producer.py", {**options, "pause": pause}, run.log("p"))
    await until(lambda: run.published() >= run.total // 3, 60, "a third of the publishes")


async def caught_up(run: Run, client: RedisCluster) -> bool:
    """Nothing pending and nothing unread in the group (the consumers alive)."""
    for n, proc in enumerate(run.consumers):
        if proc.poll() is not None:
            pytest.fail(f"consumer c{n} stopped:\n" + run.log(f"c{n}").read_text()[-3000:])
    try:
        info = await client.xinfo_stream(STREAM)
        groups = await client.xinfo_groups(STREAM)
    except Exception:  # the cluster may still be settling: look again
        return False
    group = next(g for g in groups if g["name"] in (GROUP, GROUP.encode()))
    return bool(group["pending"] == 0 and group["last-delivered-id"] == info["last-generated-id"])


async def recovered(run: Run, client: RedisCluster, since: int) -> float:
    """Seconds from the last fault to the first moment the group had caught
    up again, the producer still running (as the other chaos scenarios count),
    having handled seqs published after the fault (the producer had ``since``
    acknowledged before it; one chunk may have been in flight)."""

    async def back() -> bool:
        handled = read_handled(run.root)
        return max(handled, default=-1) >= since + CHUNK and await caught_up(run, client)

    await until(back, 120, "the group to catch up after the fault")
    return time.monotonic() - run.fault_at


async def drain(run: Run, client: RedisCluster) -> None:
    """Wait for the producer, then for the group to have read every entry and
    acknowledged them all."""
    assert run.producer is not None
    await until(lambda: run.producer.poll() is not None, 180, "the producer to finish")  # type: ignore[union-attr]
    assert run.producer.returncode == 0, run.log("p").read_text()[-2000:]
    run.extra["producer_retries"] = int(run.log("p").read_text().split("done ")[-1].split()[0])
    await until(lambda: caught_up(run, client), 120, "the group to read and ack every entry")


async def finish(
    run: Run,
    record: Callable[[Audit], Audit],
    scenario: str,
    client: RedisCluster,
    recovery: float,
) -> Audit:
    """Drain, audit and record; the consumers must still run."""
    await drain(run, client)
    alive = [proc.poll() is None for proc in run.consumers]
    result = record(
        await audit(
            scenario,
            run.root,
            client,  # type: ignore[arg-type]
            STREAM,
            GROUP,
            recovery_s=recovery,
            faults=run.faults,
            extra=run.extra,
        )
    )
    for n, ok in enumerate(alive):
        assert ok, f"consumer c{n} stopped:\n" + run.log(f"c{n}").read_text()[-3000:]
    assert result.published == run.total
    assert result.pending == 0
    return result


@pytest.fixture
async def client(cluster: LocalCluster) -> Any:
    """The test's own cluster client, for waiting and the audit."""
    redis_client = RedisCluster.from_url(cluster.url)
    await redis_client.initialize()  # knows every node, not just the one it may lose
    try:
        yield redis_client
    finally:
        await redis_client.aclose()


async def test_cluster_failover(
    run: Run, client: RedisCluster, record: Callable[[Audit], Audit]
) -> None:
    """``CLUSTER FAILOVER`` on the replica of the topic's master, under load:
    a coordinated switch, so nothing acknowledged may be lost."""
    cluster = run.cluster
    master, replica = cluster.owner(SLOT)
    await start_load(run)
    at = run.published()
    began = run.fault_at = time.monotonic()
    cluster.call(replica, "CLUSTER", "FAILOVER")
    await until(lambda: cluster.owner(SLOT)[0] == replica, 30, "the replica to take the slot")
    took = time.monotonic() - began
    recovery = await recovered(run, client, at)
    await until(cluster.healthy, 30, "the cluster to settle")
    run.faults.append(
        f"CLUSTER FAILOVER {master}->{replica} at {at} published, replica serving after {took:.1f}s"
    )
    result = await finish(run, record, "cluster-failover", client, recovery)
    assert result.lost == 0, result.lost_sample


async def test_cluster_master_killed(
    run: Run, client: RedisCluster, record: Callable[[Audit], Audit]
) -> None:
    """The topic's master SIGKILLed under load; its replica takes over
    automatically after ``cluster-node-timeout``. Losses are allowed only
    among seqs acknowledged after the last ``WAIT 1`` barrier (see the module
    docstring); the killed node comes back as a replica."""
    cluster = run.cluster
    master, replica = cluster.owner(SLOT)
    await start_load(run)
    # The barrier: a write of ours, then WAIT until the replica has it. Every
    # publish acknowledged before our write came first in the replication stream.
    replicated = read_published(run.root)
    with cluster.client(master) as direct:
        direct.incr(f"{KEYS.tag}:chaos-barrier")
        in_sync = int(direct.execute_command("WAIT", 1, 5000))
    at = run.published()
    began = run.fault_at = time.monotonic()
    cluster.server(master).kill()
    await until(lambda: cluster.owner(SLOT)[0] == replica, 60, "the replica to take over")
    took = time.monotonic() - began
    recovery = await recovered(run, client, at)
    await until(lambda: cluster.healthy(replicas=2), 60, "the cluster to settle")
    cluster.server(master).restart()
    await until(cluster.healthy, 60, "the killed master to rejoin as a replica")
    assert cluster.owner(SLOT) == (replica, master)
    run.faults.append(
        f"SIGKILL master {master} at {len(replicated)} published (WAIT barrier: "
        f"{in_sync} replica), replica {replica} serving after {took:.1f}s; "
        "old master restarted as replica"
    )
    await drain(run, client)
    published = read_published(run.root)
    handled = read_handled(run.root)
    dead, _ = await _dead_seqs(Topic(client, STREAM))
    lost = published - set(handled) - dead
    covered = lost & replicated if in_sync else set()
    run.extra["lost_unreplicated"] = len(lost - covered)
    result = await finish(run, record, "cluster-master-killed", client, recovery)
    assert in_sync == 1, "the replica never confirmed the barrier"
    assert not covered, f"lost seqs the replica had confirmed: {sorted(covered)[:20]}"
    assert result.lost == len(lost - covered)


async def test_cluster_reshard(
    run: Run, client: RedisCluster, record: Callable[[Audit], Audit]
) -> None:
    """The topic's slot migrated to another master under load, by hand as
    ``redis-cli --cluster reshard`` does it: IMPORTING on the target, MIGRATING
    on the source, MIGRATE in small batches (the stream alone, between filler
    keys of the same slot, so that its commands meet ASK while the rest of the
    slot is still on the source), then SETSLOT NODE on every master (clients
    that still point at the source meet MOVED). Every client keeps ``WARM``
    idle connections to every node, the case where redis-py's ASKING can
    leave on another connection than the command it should precede."""
    cluster = run.cluster
    source, _ = cluster.owner(SLOT)
    masters = sorted(n.port for n in cluster.nodes(source) if n.master and n.slots)
    target = next(port for port in masters if port != source)
    fillers = [f"{KEYS.tag}:filler:{n}" for n in range(FILLERS)]
    with cluster.client(source) as direct:
        direct.mset(dict.fromkeys(fillers, "x"))
    await start_load(run, warm=WARM)

    source_id = cluster.call(source, "CLUSTER", "MYID")
    target_id = cluster.call(target, "CLUSTER", "MYID")
    before = {port: cluster.errorstats(port) for port in masters}

    def redirects(code: str, port: int) -> int:
        return cluster.errorstats(port).get(code, 0) - before[port].get(code, 0)

    def migrate(keys: list[str]) -> None:
        cluster.call(source, "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)

    run.fault_at = time.monotonic()
    at = run.published()
    cluster.call(target, "CLUSTER", "SETSLOT", SLOT, "IMPORTING", source_id)
    cluster.call(source, "CLUSTER", "SETSLOT", SLOT, "MIGRATING", target_id)
    half = FILLERS // 2
    for n in range(0, half, 5):
        migrate(fillers[n : n + 5])
    migrate([STREAM])
    # While the rest of the slot is still on the source, every command on the
    # stream is redirected with ASK. Hold that state until the producer got
    # two chunks through it, or until clients have met ASK 200 times without
    # (they fail, see ``moved_by_importing_target``).
    moved_stream = time.monotonic()
    through = run.published()
    await until(
        lambda: run.published() >= through + 100 or redirects("ASK", source) >= 200,
        30,
        "publishes through the ASK window, or many ASK redirections",
    )
    ask_window_s = time.monotonic() - moved_stream
    progress = run.published()
    for n in range(half, FILLERS, 5):
        migrate(fillers[n : n + 5])
    while rest := cluster.call(source, "CLUSTER", "GETKEYSINSLOT", SLOT, 5):
        migrate(list(rest))
    importing_moved = redirects("MOVED", target)
    for port in [target, source, *(p for p in masters if p not in (source, target))]:
        cluster.call(port, "CLUSTER", "SETSLOT", SLOT, "NODE", target_id)
    migration_s = time.monotonic() - run.fault_at
    await until(lambda: cluster.owner(SLOT)[0] == target, 30, "every node to see the new owner")
    recovery = await recovered(run, client, at)
    await until(cluster.healthy, 30, "the cluster to settle")

    ask = sum(redirects("ASK", port) for port in masters)
    moved = sum(redirects("MOVED", port) for port in masters)
    run.extra.update(
        {
            "ask": ask,
            "moved": moved,
            # MOVED from the importing target before SETSLOT NODE: a command
            # that followed an ASK arrived there without its ASKING.
            "moved_by_importing_target": importing_moved,
            "ask_window_s": round(ask_window_s, 2),
            "published_during_ask_window": progress - through,
        }
    )
    run.faults.append(
        f"slot {SLOT} migrated {source}->{target} at {at} published "
        f"({FILLERS} filler keys, stream alone, {migration_s:.1f}s)"
    )
    result = await finish(run, record, "cluster-reshard", client, recovery)
    assert result.lost == 0, result.lost_sample
    assert ask > 0
    assert moved > 0
