"""A chaos consumer process: ``python _worker.py '<json options>'``.

Consumes the chaos topic and logs every finished handler call to the ledger
(see ``_ledger.py``) before the acknowledgement, so a SIGKILL at any moment
leaves a log that at most misses the calls whose ack had not been sent either.

Options (JSON object): ``url``, ``stream``, ``group``, ``name``, ``root`` (the
ledger directory), and optionally ``cluster`` (bool), ``claim_idle`` (s),
``block`` (s), ``concurrency``, ``delay`` (s a handler takes), ``batch`` (a
batch size: use a batch handler), ``socket_timeout`` (s), ``start``,
``prefetch``, ``member_ttl`` (s, a partitioned topic's membership lease),
``timed`` (bool: each ledger line also carries the wall-clock times the
handler started and finished, to the microsecond) and ``urls`` (a list of URLs of a
master and its replicas: the client connects to whichever of them is master
now and follows a promotion, as a Sentinel client would; ``url`` is then
ignored), ``warm`` (on a cluster: open this many connections to every node at
start and leave them idle in the pool, as a busy application's client has).
Prints ``ready`` on stdout once the consumer runs.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio
from _ledger import CHAOS_TYPE, handled_log
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import MasterNotFoundError, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from redcurrent import BatchConfig, Message, StreamConsumer


class MasterOf:
    """Stands in for Redis Sentinel in front of a connection pool: the master
    is whichever of ``urls`` answers ``ROLE`` with ``master`` (the first such,
    while a failover briefly leaves two). redis-py's
    ``SentinelConnectionPool`` asks it on every new connection and drops a
    connection that meets READONLY, so clients follow a promotion."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        for url in self.urls:
            probe = redis.asyncio.Redis.from_url(
                url, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
            )
            try:
                role = await probe.execute_command("ROLE")
            except (RedisError, OSError):
                continue
            finally:
                await probe.aclose()
            if role[0] in (b"master", "master"):
                kwargs = probe.connection_pool.connection_kwargs
                return kwargs["host"], int(kwargs["port"])
        raise MasterNotFoundError(f"no master among {self.urls}")

    async def discover_slaves(self, service_name: str) -> list[tuple[str, int]]:
        return []


def client_for(options: dict[str, Any]) -> Any:
    kwargs: dict[str, Any] = {}
    if options.get("socket_timeout") is not None:
        kwargs["socket_timeout"] = options["socket_timeout"]
        kwargs["socket_connect_timeout"] = options["socket_timeout"]
    if options.get("urls"):
        pool = SentinelConnectionPool("chaos", MasterOf(list(options["urls"])), **kwargs)
        return redis.asyncio.Redis(connection_pool=pool)
    if options.get("cluster"):
        return RedisCluster.from_url(options["url"], **kwargs)
    return redis.asyncio.Redis.from_url(options["url"], **kwargs)


async def warm_pool(client: Any, options: dict[str, Any]) -> None:
    """Leave ``options["warm"]`` idle connections to every node in a cluster
    client's pool: with several, redis-py's ASKING and the command it should
    precede may leave on different connections (../shared/PARTITIONS.md)."""
    per_node = int(options.get("warm", 0))
    if not per_node or not isinstance(client, RedisCluster):
        return
    await client.initialize()
    async with anyio.create_task_group() as tg:
        for _ in range(per_node):
            tg.start_soon(
                functools.partial(client.execute_command, "PING", target_nodes=client.ALL_NODES)
            )


async def main(options: dict[str, Any]) -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s {options['name']} %(levelname)s %(name)s: %(message)s",
    )
    log = handled_log(Path(options["root"]), options["name"])
    client = client_for(options)
    await warm_pool(client, options)
    delay = float(options.get("delay", 0.0))
    batch = options.get("batch")
    timed = bool(options.get("timed"))
    extra: dict[str, Any] = {}
    if options.get("prefetch") is not None:
        extra["prefetch"] = int(options["prefetch"])
    if options.get("member_ttl") is not None:
        extra["member_ttl"] = float(options["member_ttl"])
    consumer = StreamConsumer(
        client,
        options["stream"],
        options["group"],
        options["name"],
        start=options.get("start", "0-0"),
        claim_idle=float(options.get("claim_idle", 2.0)),
        block=float(options.get("block", 0.5)),
        concurrency=int(options.get("concurrency", 16)),
        batch=BatchConfig(size=int(batch), timeout=0.05) if batch else None,
        shutdown_timeout=2.0,
        start_timeout=60.0,
        **extra,
    )

    if batch:

        @consumer.batch_handler(CHAOS_TYPE)
        async def handle_batch(messages: list[Message[Any]]) -> None:
            began = time.time()
            if delay:
                await anyio.sleep(delay)
            times = (f"{began:.6f}", f"{time.time():.6f}") if timed else ()
            log.add_many((m.data["seq"], m.id, m.delivery_count, *times) for m in messages)

    else:

        @consumer.handler(CHAOS_TYPE)
        async def handle(msg: Message[Any]) -> None:
            began = time.time()
            if delay:
                await anyio.sleep(delay)
            times = (f"{began:.6f}", f"{time.time():.6f}") if timed else ()
            log.add(msg.data["seq"], msg.id, msg.delivery_count, *times)

    async with consumer:
        print("ready", flush=True)
        await consumer.done()


if __name__ == "__main__":
    anyio.run(main, json.loads(sys.argv[1]))
