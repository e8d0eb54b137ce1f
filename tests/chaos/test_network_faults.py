"""Network faults: connections cut in the middle of commands and replies.

Three consumer processes and a producer reach a private server only through
:class:`~_proxy.ChaosProxy`, which cuts every live connection ten times
under load, alternately half-way through a command (the server never gets
all of it) and half-way through a reply (the server ran the command, the
client never learns its result: an XREADGROUP whose entries are now pending
on a consumer that never saw them, an XACK or a publish that did happen).
Nothing may be lost, nothing left pending: a publish retried after a cut
reply is a duplicate, an entry read into a cut reply is claimed back after
``claim_idle``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from _fleet import Fleet, drained
from _ledger import _dead_seqs, audit, read_handled, read_published
from _proxy import ChaosProxy, Direction
from redis import exceptions as rex

from helpers import wait_until
from redcurrent import Topic
from redcurrent.testing import RedisServer

STREAM = "chaos-net"
GROUP = "workers"
CUTS = 10

pytestmark = pytest.mark.timeout(900)


async def test_connection_cuts(
    private_redis: RedisServer,
    ledger_root: Path,
    tmp_path: Path,
    full_scale: bool,
    record: Any,
) -> None:
    count = 100_000 if full_scale else 8_000
    # Publishing is spread over the ten cuts: about 30 s at full scale, 10 s short.
    pause = 0.02 if full_scale else 0.1
    async with (
        ChaosProxy(private_redis.port) as proxy,
        redis.asyncio.Redis.from_url(private_redis.url) as admin,
    ):
        with Fleet(ledger_root, tmp_path, stream=STREAM, group=GROUP) as fleet:
            common = {"url": proxy.url, "claim_idle": 1.0, "block": 0.5, "socket_timeout": 5}
            workers = [fleet.worker(f"w{i}", **common) for i in range(3)]
            await wait_until(lambda: fleet.ready(*workers), timeout=60, interval=0.1)
            producer = fleet.producer(
                "p", url=proxy.url, first=0, count=count, chunk=100, pause=pause
            )
            faults: list[str] = []
            last_fault = time.monotonic()
            for i in range(CUTS):
                # Under load: each cut once a further share of the messages is out.
                share = (i + 1) * count // (CUTS + 2)
                await wait_until(
                    lambda share=share: fleet.check() or len(read_published(ledger_root)) >= share,
                    timeout=60,
                    interval=0.05,
                )
                direction: Direction = "up" if i % 2 == 0 else "down"
                cut = await proxy.cut(direction)
                assert cut.partial >= 1, cut  # at least one inside a command or reply
                faults.append(f"cut {direction}: {cut.partial} mid-chunk, {cut.closed} idle")
                last_fault = cut.at

            await wait_until(lambda: fleet.finished(producer), timeout=300, interval=0.1)
            await wait_until(
                lambda: fleet.check() or drained(admin, ledger_root, STREAM, GROUP),
                timeout=300,
                interval=0.25,
            )
            recovery = time.monotonic() - last_fault

        result = record(
            await audit(
                "connection-cuts",
                ledger_root,
                admin,
                STREAM,
                GROUP,
                recovery_s=recovery,
                faults=faults,
                extra={
                    "producer_retries": _retries(producer.output()),
                    "connections": proxy.accepted,
                },
            )
        )
    assert result.published == count
    assert result.lost == 0, result
    assert result.pending == 0, result
    assert result.lag == 0, result


def _retries(output: str) -> int | None:
    for line in output.splitlines():
        if line.startswith("done "):
            return int(line.split()[1])
    return None


@pytest.fixture
def replica_pair(redis_server_binary: str | None) -> Iterator[tuple[RedisServer, RedisServer]]:
    """Two private servers for a failover. No AOF: a server that just loaded a
    full sync rewrites its AOF and refuses SIGTERM meanwhile (see
    ``tests/test_faults.py``); no diskless-sync delay."""
    if redis_server_binary is None:
        pytest.skip("no redis-server binary")
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

    await wait_until(synced, timeout=30, interval=0.05)


async def test_replica_promoted_under_load(
    replica_pair: tuple[RedisServer, RedisServer],
    ledger_root: Path,
    tmp_path: Path,
    full_scale: bool,
    record: Any,
) -> None:
    """B replicates A; three consumers and a producer run against A. Then the
    failover a Sentinel would do, by hand: B promoted (REPLICAOF NO ONE), A
    made B's replica. Clients follow the master (``urls``: they ask ``ROLE``
    on every new connection and drop one that answers READONLY).

    Replication is asynchronous, so a publish A acknowledged but had not yet
    sent to B when B took over is gone: the test puts a ``WAIT 1`` barrier
    just before the failover, asserts that nothing acknowledged before it is
    lost, and reports what was lost after it."""
    a, b = replica_pair
    stream = "chaos-failover"
    count = 60_000 if full_scale else 6_000
    async with (
        redis.asyncio.Redis.from_url(a.url) as admin_a,
        redis.asyncio.Redis.from_url(b.url) as admin_b,
    ):
        await _replicate(admin_b, a)
        with Fleet(ledger_root, tmp_path, stream=stream, group=GROUP) as fleet:
            urls = [a.url, b.url]
            common = {"urls": urls, "claim_idle": 1.0, "block": 0.5, "socket_timeout": 5}
            workers = [fleet.worker(f"w{i}", **common) for i in range(3)]
            await wait_until(lambda: fleet.ready(*workers), timeout=60, interval=0.1)
            producer = fleet.producer(
                "p", urls=urls, first=0, count=count, chunk=100, pause=0.05, socket_timeout=5
            )
            await wait_until(
                lambda: fleet.check() or len(read_published(ledger_root)) >= count // 2,
                timeout=120,
                interval=0.05,
            )
            # Everything acknowledged so far precedes the barrier write in A's
            # replication stream; WAIT returns once B has all of it.
            before = read_published(ledger_root)
            await admin_a.set("chaos:barrier", "1")
            assert int(await admin_a.execute_command("WAIT", 1, 5000)) == 1
            await admin_b.execute_command("REPLICAOF", "NO", "ONE")
            await _replicate(admin_a, b)
            failed_over = time.monotonic()

            await wait_until(lambda: fleet.finished(producer), timeout=300, interval=0.1)
            await wait_until(
                lambda: fleet.check() or _settled(admin_b, ledger_root, stream),
                timeout=300,
                interval=0.25,
            )
            recovery = time.monotonic() - failed_over

        lost = await _unaccounted(admin_b, ledger_root, stream)
        result = record(
            await audit(
                "replica-promotion",
                ledger_root,
                admin_b,
                stream,
                GROUP,
                recovery_s=recovery,
                faults=["B promoted (REPLICAOF NO ONE), A made B's replica"],
                extra={
                    "acknowledged_before_barrier": len(before),
                    "lost_before_barrier": len(lost & before),
                    "lost_after_barrier": len(lost - before),
                    "producer_retries": _retries(producer.output()),
                },
            )
        )
    assert len(lost & before) == 0, result
    assert result.pending == 0, result
    assert result.lag == 0, result


async def _unaccounted(client: redis.asyncio.Redis, root: Path, stream: str) -> set[int]:
    """Acknowledged seqs neither handled nor dead-lettered."""
    missing = read_published(root) - set(read_handled(root))
    if missing:
        missing -= (await _dead_seqs(Topic(client, stream)))[0]
    return missing


async def _in_stream(client: redis.asyncio.Redis, stream: str) -> set[int]:
    seqs: set[int] = set()
    start = "-"
    while True:
        page = await client.xrange(stream, start, "+", count=1000)
        for _, fields in page:
            seqs.add(json.loads(fields[b"data"])["seq"])
        if len(page) < 1000:
            return seqs
        start = "(" + page[-1][0].decode()


async def _settled(client: redis.asyncio.Redis, root: Path, stream: str) -> bool:
    """Nothing pending or unread on the master, and every acknowledged seq
    handled, dead-lettered or not in the stream at all (undone by the
    failover: it can never be handled)."""
    info = await Topic(client, stream).info()
    group = [g for g in info.groups if g.name == GROUP]
    if not group or group[0].pending or group[0].lag:
        return False
    missing = await _unaccounted(client, root, stream)
    return not missing or not (missing & await _in_stream(client, stream))
