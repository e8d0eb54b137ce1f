"""A chaos producer process: ``python _producer.py '<json options>'``.

Publishes seqs ``first .. first+count-1`` in chunks of ``chunk`` (a
``publish_many`` each), optionally pausing ``pause`` s between chunks, and logs
a chunk's seqs to the ledger only after Redis acknowledged it. A chunk that
fails (connection cut, server down, failover) is retried until it succeeds:
if the failed attempt was in fact written, its seqs are published twice and
show up as duplicates, never as losses.

Options (JSON object): ``url``, ``stream``, ``root``, ``name``, ``first``,
``count``, and optionally ``cluster``, ``chunk`` (default 100), ``pause`` (s),
``pad`` (bytes of padding per payload), ``partitions`` (create the topic
with that many partitions), ``keys`` (publish seq ``s`` with the message key
``f"k{s % keys}"``), ``socket_timeout`` (s), ``urls``
(follow the master among these, see ``_worker.py``), ``warm`` (idem).
Prints ``done <retries>`` when every seq is acknowledged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
from _ledger import CHAOS_TYPE, published_log
from _worker import client_for, warm_pool
from redis.exceptions import RedisError

from redcurrent import RedcurrentError, Topic


async def main(options: dict[str, Any]) -> None:
    log = published_log(Path(options["root"]), options["name"])
    client = client_for(options)
    await warm_pool(client, options)
    topic = Topic(client, options["stream"], partitions=options.get("partitions"))
    keys = int(options.get("keys", 0))
    first, count = int(options["first"]), int(options["count"])
    chunk = int(options.get("chunk", 100))
    pause = float(options.get("pause", 0.0))
    pad = "x" * int(options.get("pad", 0))
    retries = 0
    for start in range(first, first + count, chunk):
        seqs = range(start, min(start + chunk, first + count))
        items = [(CHAOS_TYPE, {"seq": s, "pad": pad}) for s in seqs]
        while True:
            try:
                if keys:
                    await topic.publish_many(items, keys=[f"k{s % keys}" for s in seqs])
                else:
                    await topic.publish_many(items)
                break
            except (RedisError, RedcurrentError, OSError):
                retries += 1
                await anyio.sleep(0.1)
        log.add_many((s,) for s in seqs)
        if pause:
            await anyio.sleep(pause)
    print(f"done {retries}", flush=True)


if __name__ == "__main__":
    anyio.run(main, json.loads(sys.argv[1]))
