"""A chaos consumer process: ``python _worker.py '<json options>'``.

Consumes the chaos topic and logs every finished handler call to the ledger
(see ``_ledger.py``) before the acknowledgement, so a SIGKILL at any moment
leaves a log that at most misses the calls whose ack had not been sent either.

Options (JSON object): ``url``, ``stream``, ``group``, ``name``, ``root`` (the
ledger directory), and optionally ``cluster`` (bool), ``claim_idle`` (s),
``block`` (s), ``concurrency``, ``delay`` (s a handler takes), ``batch`` (a
batch size: use a batch handler), ``socket_timeout`` (s), ``start``.
Prints ``ready`` on stdout once the consumer runs.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio
from _ledger import CHAOS_TYPE, handled_log
from redis.asyncio.cluster import RedisCluster

from redcurrent import BatchConfig, Message, StreamConsumer


def client_for(options: dict[str, Any]) -> Any:
    kwargs: dict[str, Any] = {}
    if options.get("socket_timeout") is not None:
        kwargs["socket_timeout"] = options["socket_timeout"]
        kwargs["socket_connect_timeout"] = options["socket_timeout"]
    if options.get("cluster"):
        return RedisCluster.from_url(options["url"], **kwargs)
    return redis.asyncio.Redis.from_url(options["url"], **kwargs)


async def main(options: dict[str, Any]) -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s {options['name']} %(levelname)s %(name)s: %(message)s",
    )
    log = handled_log(Path(options["root"]), options["name"])
    client = client_for(options)
    delay = float(options.get("delay", 0.0))
    batch = options.get("batch")
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
    )

    if batch:

        @consumer.batch_handler(CHAOS_TYPE)
        async def handle_batch(messages: list[Message[Any]]) -> None:
            if delay:
                await anyio.sleep(delay)
            log.add_many((m.data["seq"], m.id, m.delivery_count) for m in messages)

    else:

        @consumer.handler(CHAOS_TYPE)
        async def handle(msg: Message[Any]) -> None:
            if delay:
                await anyio.sleep(delay)
            log.add(msg.data["seq"], msg.id, msg.delivery_count)

    async with consumer:
        print("ready", flush=True)
        await consumer.done()


if __name__ == "__main__":
    anyio.run(main, json.loads(sys.argv[1]))
