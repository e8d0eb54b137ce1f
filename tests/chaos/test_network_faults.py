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

import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from _fleet import Fleet, drained
from _ledger import audit, read_published
from _proxy import ChaosProxy, Direction

from helpers import wait_until
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
